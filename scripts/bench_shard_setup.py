"""Per-shard set-up of the TFRecord reader: seconds from calling `read_shard` to its first
batch, and to the end of the shard, for the first few shards of a folder (the first shard
also pays the one-time costs; later ones show what every shard pays), read the way a worker
reads them (one long-lived pipeline, `ShardReaders`) and, with `--per-shard`, through a
pipeline of each shard's own (what every shard paid before `ShardReaders`).

    python scripts/bench_shard_setup.py data/bench-2048-8 --shards 4
    python scripts/bench_shard_setup.py data/bench-2048-8 --shards 4 --per-shard
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of TFRecord shards made by scripts/make_demo_data.py")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", action="store_true", help="a tf.data pipeline per shard instead of the worker's long-lived one")
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.perf_counter()
    from layerbeam.config import load_config, to_spec
    from layerbeam.transforms.models import preprocess_fn
    from layerbeam.transforms.readers import ShardReaders, match_shards, read_shard

    cfg = load_config(raw={
        "input": {"pattern": f"{a.folder}/*.tfrecord", "key_feature": "image/key", "image_size": [224, 224]},
        "model": {"source": "keras.applications.MobileNetV2", "weights": None},
        "layers": {"select": ["out_relu"]},
        "output": {"path": "/tmp/unused-bench-shard-setup"},
    })
    spec = to_spec(cfg).input
    pre = preprocess_fn("auto", "keras.applications.MobileNetV2")
    readers = None if a.per_shard else ShardReaders(spec, {"input_layer": (224, 224, 3)}, pre, 32)
    print(f"imports {time.perf_counter() - t0:.2f}s · load avg {os.getloadavg()[0]:.1f} · {'a pipeline per shard' if a.per_shard else 'one long-lived pipeline'}")
    for shard in match_shards(spec.pattern, "tfrecord", spec=spec)[: a.shards]:
        t, first, n = time.perf_counter(), None, 0
        for batch, _ in read_shard(shard, spec, {"input_layer": (224, 224, 3)}, pre, 32, None, None, readers):
            first = first if first is not None else time.perf_counter() - t
            n += len(batch) if batch is not None else 0
        print(f"{shard.id}: first batch {first:.2f}s, whole shard {time.perf_counter() - t:.2f}s ({n} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
