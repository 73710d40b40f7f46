"""Benchmark layerbeam against the limit and against a RunInference baseline, side by side.

One invocation, same data, same machine, same model weights:

* **limit** — an in-process loop, no Beam, no writing: one tf.data pipeline (read, decode,
  resize, preprocess, batch, prefetch) feeding the same multi-output extractor.
* **layerbeam** — the real pipeline through `layerbeam.run.run_job` on the default
  (in-process FnApiRunner) runner, writing Parquet.
* **baseline** — the same job written the way Beam's docs suggest: ReadFromTFRecord →
  per-element decode in a Map → RunInference with a keyed Keras model handler → rows →
  WriteToParquet.

Each measurement runs in its own subprocess (fresh TensorFlow, honest peak RSS).

    python scripts/bench.py                       # scenario a, N=2048
    python scripts/bench.py --scenario all --json
    python scripts/bench.py --scenario a --n 512 --rss   # also layerbeam at 4N for peak RSS

The limit uses the pipeline's tf.data options (autotuning off, see
`layerbeam.transforms.readers._common.without_autotune`); LAYERBEAM_BENCH_LIMIT_AUTOTUNE=1 measures it with
tf.data's default autotuning instead.

Scenarios: (a) MobileNetV2 224px, four mean-pooled outputs; (b) the same plus one
unreduced mid-layer output in float16; (c) ResNet50 224px, `all` layers mean-pooled.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = {
    "a": {
        "title": "MobileNetV2, 4 mean-pooled outputs",
        "source": "keras.applications.MobileNetV2",
        "select": ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "out_relu"],
    },
    "b": {
        "title": "MobileNetV2, 4 mean-pooled + 1 unreduced float16",
        "source": "keras.applications.MobileNetV2",
        "select": [
            "block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "out_relu",
            {"layer": "block_6_expand_relu", "as": "block_6_map", "reduce": "none", "dtype": "float16"},
        ],
    },
    "c": {
        "title": "ResNet50, all layers mean-pooled",
        "source": "keras.applications.ResNet50",
        "select": ["all"],
    },
}


def _config(scenario: str, data: str, out: str, batch_size: int) -> dict:
    s = SCENARIOS[scenario]
    return {
        "input": {"pattern": f"{data}/*.tfrecord", "key_feature": "image/key", "label_feature": "image/class/label", "image_size": [224, 224]},
        "model": {"source": s["source"], "weights": None, "seed": 0},
        "layers": {"select": s["select"], "reduce": "mean", "max_bytes_per_example": 1 << 30},
        "batching": {"batch_size": batch_size},
        "output": {"path": out, "overwrite": True},
    }


def _dataset(n: int, shards: int) -> str:
    folder = ROOT / "data" / f"bench-{n}-{shards}"
    if not (folder / "_DONE").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(folder), "--images", str(n), "--shards", str(shards), "--size", "256"],
            check=True,
        )
        (folder / "_DONE").write_text("")
    return str(folder)


# --------------------------------------------------------------------------- the three measurements


def _measure_limit(cfg: dict) -> dict:
    """tf.data → extractor in a loop; no Beam, no writing."""
    import tensorflow as tf

    from layerbeam.config import load_config
    from layerbeam.transforms.layers import trace_and_select
    from layerbeam.transforms.extractor import Extractor, extractor_model
    from layerbeam.transforms.layers import ModelGraph
    from layerbeam.transforms.models import load_model, preprocess_fn
    from layerbeam.transforms.readers._common import without_autotune as _without_autotune
    from layerbeam.transforms.readers.images import decode_image as _decode_image

    t_start = time.perf_counter()
    c = load_config(raw=cfg)
    model = load_model(c.model)
    graph, specs = trace_and_select(c, model)  # the pipeline's own extractor, float16 outputs included
    ex = Extractor(extractor_model(graph, specs))
    (name, shape), = graph.input_shapes.items()
    pre = preprocess_fn("auto", c.model.source)
    files = sorted(tf.io.gfile.glob(c.input.pattern))
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}

    def parse(r):
        return _decode_image(tf.io.parse_single_example(r, spec)["image/encoded"], shape, c.input, pre)

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(c.batching.batch_size).prefetch(tf.data.AUTOTUNE)
    if os.environ.get("LAYERBEAM_BENCH_LIMIT_AUTOTUNE", "0") != "1":
        # The pipeline's own tf.data options: on 2 cores the autotuner's model thread costs
        # the model CPU time, and a limit slowed by it would flatter layerbeam.
        ds = _without_autotune(ds)
    n = 0
    first = None
    t0 = time.perf_counter()
    for batch in ds:
        ex({name: batch})
        n += int(batch.shape[0])
        if first is None:
            first = time.perf_counter() - t_start
    secs = time.perf_counter() - t0
    return {"images": n, "seconds": secs, "first_batch_s": first}


def _measure_layerbeam(cfg: dict) -> dict:
    from layerbeam.plan import prepare
    from layerbeam.run import run_job
    from layerbeam.config import load_config

    t_start = time.time()
    c = load_config(raw=cfg)
    plan = prepare(c)
    t0 = time.perf_counter()
    manifest = run_job(c, [], plan)
    secs = time.perf_counter() - t0
    files = manifest["files"]
    first = manifest.get("_first_batch_unix")
    timing: dict = {}
    for i in manifest["inputs"]:
        for k, v in (i.get("timing") or {}).items():
            timing[k] = timing.get(k, 0.0) + v
    return {
        "images": manifest["counts"]["rows_written"],
        "seconds": secs,
        "first_batch_s": (first - t_start) if first else None,
        "bytes_written": sum(f["bytes"] for f in files),
        "bytes_per_example": manifest["bytes_per_example"],
        "time_in_shards": {k: round(v, 2) for k, v in timing.items()},
    }


def _measure_baseline(cfg: dict) -> dict:
    """Beam's documented style: per-element decode in a Map, RunInference, WriteToParquet."""
    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    import tensorflow as tf
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from layerbeam.config import load_config
    from layerbeam.transforms.layers import trace_and_select
    from layerbeam.transforms.models import load_model, preprocess_fn

    c = load_config(raw=cfg)
    shape = (224, 224, 3)
    source = c.model.source

    from apache_beam.ml.inference import utils as inference_utils

    class KerasFeatureHandler(ModelHandler):
        """What Beam's TFModelHandlerNumpy does (apache_beam/ml/inference/tensorflow_inference.py,
        not imported: it drags in tensorflow_hub and tf_keras): stack the batch, call the model
        eagerly, split the outputs per element with Beam's own `_convert_to_result`."""

        def load_model(self):
            job = load_config(raw=cfg)
            graph, specs = trace_and_select(job, load_model(job.model))
            return extractor_model(graph, specs)

        def run_inference(self, batch, model, inference_args=None):
            predictions = model(np.stack(batch, axis=0), **(inference_args or {}))
            return inference_utils._convert_to_result(batch, predictions)

    pre = preprocess_fn("auto", source)

    def decode(record: bytes):
        ex = tf.io.parse_single_example(record, {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/key": tf.io.FixedLenFeature([], tf.string)})
        img = tf.image.resize(tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False), shape[:2])
        return ex["image/key"].numpy().decode(), pre(tf.cast(img, tf.float32)).numpy()

    def to_row(kv):
        key, result = kv  # (key, PredictionResult) from the keyed handler
        row = {"key": key}
        row.update({k: np.asarray(v, np.float32).ravel().tolist() for k, v in result.inference.items()})
        return row

    probe = KerasFeatureHandler().load_model()
    fields = [("key", pa.string())] + [(k, pa.list_(pa.float32())) for k in probe.output.keys()]
    del probe
    out = tempfile.mkdtemp(prefix="bench-baseline-")
    t0 = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (
            p
            | beam.io.ReadFromTFRecord(c.input.pattern)
            | "Decode" >> beam.Map(decode)
            | RunInference(KeyedModelHandler(KerasFeatureHandler()))
            | "ToRow" >> beam.Map(to_row)
            | beam.io.WriteToParquet(f"{out}/part", pa.schema(fields), file_name_suffix=".parquet")
        )
    secs = time.perf_counter() - t0
    import pyarrow.dataset as ds

    n = ds.dataset(out, format="parquet").count_rows()
    return {"images": n, "seconds": secs, "first_batch_s": None}


def _child(kind: str, cfg: dict) -> dict:
    fn = {"limit": _measure_limit, "layerbeam": _measure_layerbeam, "baseline": _measure_baseline}[kind]
    res = fn(cfg)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["images_per_s"] = res["images"] / res["seconds"]
    return res


def _run_child(kind: str, cfg: dict) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run([sys.executable, __file__, "--child", kind, "--config-json", json.dumps(cfg)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: the {kind} run failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="layerbeam vs limit vs RunInference baseline")
    ap.add_argument("--scenario", default="a", choices=["a", "b", "c", "all"])
    ap.add_argument("--n", type=int, default=2048, help="images")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-baseline", action="store_true", help="skip the RunInference baseline")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each kind, interleaved; the best is reported (VMs are noisy)")
    ap.add_argument("--rss", action="store_true", help="also run layerbeam at 4N and compare peak RSS")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, json.loads(args.config_json))))
        return 0

    scenarios = ["a", "b", "c"] if args.scenario == "all" else [args.scenario]
    data = _dataset(args.n, args.shards)
    report = {"n": args.n, "shards": args.shards, "batch_size": args.batch_size, "cpus": os.cpu_count(), "scenarios": {}}
    for s in scenarios:
        out = tempfile.mkdtemp(prefix=f"bench-{s}-")
        cfg = _config(s, data, f"{out}/out", args.batch_size)
        r = {"title": SCENARIOS[s]["title"], "repeat": args.repeat}
        kinds = ["limit", "layerbeam"] + (["baseline"] if s == "a" and not args.no_baseline else [])
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every kind alike
            for k in kinds:
                runs[k].append(_run_child(k, cfg))
        for k in kinds:
            r[k] = max(runs[k], key=lambda v: v["images_per_s"])
            r[k]["all_images_per_s"] = [round(v["images_per_s"], 1) for v in runs[k]]
        lb = r["layerbeam"]
        r["layerbeam/limit"] = lb["images_per_s"] / r["limit"]["images_per_s"]
        if "baseline" in r:
            r["layerbeam/baseline"] = lb["images_per_s"] / r["baseline"]["images_per_s"]
        if lb.get("bytes_per_example"):
            r["mb_per_s_written"] = lb["bytes_written"] / lb["seconds"] / 1e6
        if args.rss:
            data4 = _dataset(4 * args.n, args.shards * 4)
            r["layerbeam_4n"] = _run_child("layerbeam", _config(s, data4, f"{out}/out4", args.batch_size))
            r["rss_4n/rss_n"] = r["layerbeam_4n"]["peak_rss_mb"] / lb["peak_rss_mb"]
        report["scenarios"][s] = r
        if not args.json:
            _print(s, r, args.n)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _print(s: str, r: dict, n: int) -> None:
    print(f"\nscenario {s}: {r['title']} · N={n} · best of {r['repeat']} interleaved runs")
    print(f"  {'run':<12} {'images/s':>9} {'seconds':>8} {'peak RSS MB':>12} {'first batch s':>14}   every run's images/s")
    for k in ("limit", "layerbeam", "baseline", "layerbeam_4n"):
        if k in r:
            v = r[k]
            fb = f"{v['first_batch_s']:.1f}" if v.get("first_batch_s") is not None else "-"
            every = ", ".join(map(str, v.get("all_images_per_s", [])))
            print(f"  {k:<12} {v['images_per_s']:>9.1f} {v['seconds']:>8.1f} {v['peak_rss_mb']:>12.0f} {fb:>14}   {every}")
    line = f"  layerbeam/limit = {r['layerbeam/limit']:.2f}"
    if "layerbeam/baseline" in r:
        line += f" · layerbeam/baseline = {r['layerbeam/baseline']:.2f}"
    if "mb_per_s_written" in r:
        line += f" · {r['mb_per_s_written']:.1f} MB/s written (compressed)"
    if "rss_4n/rss_n" in r:
        line += f" · peak RSS 4N/N = {r['rss_4n/rss_n']:.2f}"
    print(line)
    t = r["layerbeam"].get("time_in_shards") or {}
    if t:
        total = sum(t.values()) or 1.0
        print("  layerbeam time in shards: " + ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)" for k, v in t.items()))


if __name__ == "__main__":
    sys.exit(main())
