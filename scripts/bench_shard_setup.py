"""Per-shard set-up of the TFRecord reader: seconds from calling `read_shard` to its first
batch, and to the end of the shard, for the first few shards of a folder (the first shard
also pays the one-time costs; later ones show what every shard pays).

    python scripts/bench_shard_setup.py data/bench-2048-8 --shards 4
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of TFRecord shards made by scripts/make_demo_data.py")
    ap.add_argument("--shards", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.perf_counter()
    from layerbeam.config import load_config, to_spec
    from layerbeam.transforms.models import preprocess_fn
    from layerbeam.transforms.readers import match_shards, read_shard

    cfg = load_config(raw={
        "input": {"pattern": f"{a.folder}/*.tfrecord", "key_feature": "image/key", "image_size": [224, 224]},
        "model": {"source": "keras.applications.MobileNetV2", "weights": None},
        "layers": {"select": ["out_relu"]},
        "output": {"path": "/tmp/unused-bench-shard-setup"},
    })
    spec = to_spec(cfg).input
    pre = preprocess_fn("auto", "keras.applications.MobileNetV2")
    print(f"imports {time.perf_counter() - t0:.2f}s · load avg {os.getloadavg()[0]:.1f}")
    for shard in match_shards(spec.pattern, "tfrecord", spec=spec)[: a.shards]:
        t, first, n = time.perf_counter(), None, 0
        for batch, _ in read_shard(shard, spec, {"input_layer": (224, 224, 3)}, pre, 32):
            first = first if first is not None else time.perf_counter() - t
            n += len(batch) if batch is not None else 0
        print(f"{shard.id}: first batch {first:.2f}s, whole shard {time.perf_counter() - t:.2f}s ({n} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
