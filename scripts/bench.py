"""layerbeam against an independent limit and against Beam's own RunInference handler.

One invocation, same data (photo crops at 256 px in TFRecord shards, resized to 224), same
machine, same architecture and seeded weights; every measurement in a fresh subprocess;
rounds interleaved so drift on a shared machine hits every kind alike; the best of rounds
is reported and ratios are only ever taken within this one invocation.

* **limit** / **limit_noat** — a plain in-process loop written without any layerbeam code:
  `TFRecordDataset → parse → decode_image → resize → preprocess → batch → prefetch`
  (AUTOTUNE everywhere, tf.data's default options) feeding a `tf.function` of the plain
  Keras sub-model (the scenario's layers, mean-pooled by `GlobalAveragePooling2D`), outputs
  copied to NumPy; nothing written. `limit` keeps tf.data's autotuning on (its default),
  `limit_noat` turns it off (`options.autotune.enabled = False`).
* **layerbeam** — the real job: `prepare` + `run_job` on the default runner (in-process
  FnApiRunner), writing Parquet; seconds are the pipeline's from the run's summary (from
  building the Beam pipeline to the end of its commit; `run_job`'s whole time, with Beam's
  import and the output's lock, is printed beside it), "first batch" is from launching the
  process to the first extracted batch. `--variant NAME=PYTHON`
  adds `layerbeam@NAME` (and `extract@NAME`, `extract_layers@NAME` where those run) run by
  another interpreter (another checkout's venv), interleaved with the rest: that is how a
  change is measured before/after in one invocation.
* **peer** (scenario a) — the job the way Beam's docs write it: `ReadFromTFRecord →
  Map(decode) → RunInference(KeyedModelHandler(TFModelHandlerTensor(model_uri=...))) →
  Map(to row) → WriteToParquet` on the in-process FnApiRunner. `TFModelHandlerTensor` is
  Beam's own class; it needs the `bench` extra (`pip install -e .[bench]`: tensorflow_hub,
  tf_keras) and loads the `.keras` file this script saves with `tf.keras.models.load_model`.
* **extract** / **extract_layers** / **extract_layers_eager** — `layerbeam.extract(model,
  dataset, output=...)` (the notebook path, fed by the limit's own tf.data pipeline),
  `ReadFromTFRecord → (key, bytes) → layerbeam.DecodeImages → ExtractLayers → WriteLayers`
  (the RunInference path), and the same with each element decoded eagerly in a `Map` in
  place of `DecodeImages`, as Beam's RunInference examples decode; skipped, with a note,
  where this checkout has no such API.

Round 1 also checks that the kinds compute the same thing: the first batch's `out_relu`
(or the last output) of the limit against layerbeam's and the peer's rows for those keys.

    python scripts/bench.py                                  # scenario a, N=2048, 2 rounds
    python scripts/bench.py --scenario b --kinds limit,limit_noat,layerbeam
    python scripts/bench.py --n 512 --rounds 1 --rss         # smoke, + layerbeam at 4N for peak RSS
    python scripts/bench.py --variant before=/work/main/.venv/bin/python --kinds limit_noat,layerbeam

Scenarios: (a) MobileNetV2 224, four mean-pooled outputs; (b) the same plus one unreduced
28×28×192 float16 map; (c) ResNet50 224, `all` layers mean-pooled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
MNV2_LAYERS = ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "out_relu"]

SCENARIOS = {
    "a": {"title": "MobileNetV2, 4 mean-pooled outputs", "source": "MobileNetV2", "select": MNV2_LAYERS, "map": None},
    "b": {
        "title": "MobileNetV2, 4 mean-pooled + 1 unreduced 28x28x192 float16",
        "source": "MobileNetV2",
        "select": [*MNV2_LAYERS, {"layer": "block_6_expand_relu", "as": "block_6_map", "reduce": "none", "dtype": "float16"}],
        "map": ("block_6_expand_relu", "block_6_map"),
    },
    "c": {"title": "ResNet50, all layers mean-pooled", "source": "ResNet50", "select": ["all"], "map": None},
}
KINDS = ("limit", "limit_noat", "layerbeam", "peer", "extract", "extract_layers", "extract_layers_eager")
VARIED = ("layerbeam", "extract", "extract_layers", "extract_layers_eager")  # the kinds `--variant` runs with another interpreter too


def _dataset(n: int, shards: int) -> str:
    folder = ROOT / "data" / f"bench-{n}-{shards}"
    if not (folder / "_DONE").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(folder), "--images", str(n), "--shards", str(shards), "--size", "256"],
            check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        (folder / "_DONE").write_text("")
    return str(folder)


# --------------------------------------------------------------------------- independent pieces (no layerbeam code)


def _plain_model(scenario: str):
    """The scenario's sub-model in plain Keras, dict outputs: each layer mean-pooled over
    height and width (`all`: every layer but the input; rank-2 outputs as they are), plus
    the unreduced float16 map of (b). Seeded as layerbeam seeds `weights: null`."""
    import keras

    s = SCENARIOS[scenario]
    keras.utils.set_random_seed(0)
    base = getattr(keras.applications, s["source"])(input_shape=(SIZE, SIZE, 3), weights=None)
    names = [layer.name for layer in base.layers[1:]] if s["select"] == ["all"] else MNV2_LAYERS

    def pooled(t):
        return keras.layers.GlobalAveragePooling2D()(t) if len(t.shape) == 4 else t

    outs = {n: pooled(base.get_layer(n).output) for n in names}
    if s["map"]:
        layer, name = s["map"]
        outs[name] = keras.layers.Activation("linear", dtype="float16")(base.get_layer(layer).output)
    return keras.Model(base.input, outs)


def _preprocess_for(scenario: str):
    import keras

    mod = keras.applications.resnet50 if SCENARIOS[scenario]["source"] == "ResNet50" else keras.applications.mobilenet_v2
    return mod.preprocess_input


def _plain_dataset(data: str, scenario: str, batch_size: int, autotune: bool):
    """TFRecord → parse → decode → resize → preprocess → batch → prefetch, tf.data defaults."""
    import tensorflow as tf

    pre = _preprocess_for(scenario)
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/key": tf.io.FixedLenFeature([], tf.string)}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        img = tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False)
        img = tf.ensure_shape(tf.image.resize(img, (SIZE, SIZE)), (SIZE, SIZE, 3))  # bilinear, float32
        return ex["image/key"], pre(img)

    files = sorted(tf.io.gfile.glob(f"{data}/*.tfrecord"))
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if not autotune:
        o = tf.data.Options()
        o.autotune.enabled = False
        ds = ds.with_options(o)
    return ds


def _check_name(outputs) -> str:
    return "out_relu" if "out_relu" in outputs else sorted(outputs)[-1]


# --------------------------------------------------------------------------- children


def _limit(a) -> dict:
    import numpy as np
    import tensorflow as tf

    model = _plain_model(a.scenario)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)])
    ds = _plain_dataset(a.data, a.scenario, a.batch_size, autotune=a.child == "limit")
    n, first, sample = 0, None, None
    t0 = time.perf_counter()
    for keys, x in ds:
        out = {k: v.numpy() for k, v in fn(x).items()}
        n += len(keys)
        if first is None:
            first = time.time() - a.launched
            name = _check_name(out)
            sample = (np.array([k.decode() for k in keys.numpy()]), out[name], name)
    secs = time.perf_counter() - t0
    if a.check:
        np.savez(a.check, keys=sample[0], values=sample[1].astype(np.float32), name=sample[2], outputs=len(out))
    return {"images": n, "seconds": secs, "first_batch_s": first, "outputs": len(out)}


def _config(a, out: str) -> dict:
    s = SCENARIOS[a.scenario]
    return {
        "input": {"pattern": f"{a.data}/*.tfrecord", "key_feature": "image/key", "image_size": [SIZE, SIZE]},
        "model": {"source": f"keras.applications.{s['source']}", "weights": None, "seed": 0},
        "layers": {"select": s["select"], "reduce": "mean", "max_bytes_per_example": 1 << 30},
        "batching": {"batch_size": a.batch_size},
        "output": {"path": out, "overwrite": True},
    }


def _layerbeam(a) -> dict:
    from layerbeam.config import load_config
    from layerbeam.plan import prepare
    from layerbeam.run import run_job

    out = f"{a.work}/out"
    c = load_config(raw=_config(a, out))
    plan = prepare(c)
    t0 = time.perf_counter()
    manifest = run_job(c, [], plan)
    run_job_s = time.perf_counter() - t0
    # The pipeline's time from the run's summary (what `layerbeam run` prints, and what the
    # issue measured): from building the Beam pipeline to its end, the commit included.
    # run_job's whole time adds importing Beam, taking the output's lock and reading the
    # manifest back (about 1 s): printed beside it.
    secs = manifest["_seconds"]
    first = manifest.get("_first_batch_unix")
    timing: dict = {}
    for i in manifest["inputs"]:
        for k, v in (i.get("timing") or {}).items():
            timing[k] = timing.get(k, 0.0) + v
    res = {
        "images": manifest["counts"]["rows_written"], "seconds": secs, "run_job_s": round(run_job_s, 2),
        "first_batch_s": (first - a.launched) if first else None,
        "bytes_written": sum(f["bytes"] for f in manifest["files"]),
        "time_in_shards": {k: round(v, 2) for k, v in timing.items()},
        "outputs": len(plan.outputs),
    }
    if a.check:
        res["check"] = _compare(a.check, out)
    return res


def _peer(a) -> dict:
    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    import tensorflow as tf
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    pre = _preprocess_for(a.scenario)
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/key": tf.io.FixedLenFeature([], tf.string)}

    def decode(record: bytes):
        ex = tf.io.parse_single_example(record, spec)
        img = tf.image.resize(tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False), (SIZE, SIZE))
        return ex["image/key"].numpy().decode(), pre(img)

    def to_row(kv):
        key, result = kv  # (key, PredictionResult)
        row = {"key": key}
        row.update({k: np.asarray(v, np.float32).ravel().tolist() for k, v in result.inference.items()})
        return row

    names = list(_plain_model(a.scenario).output.keys())
    schema = pa.schema([("key", pa.string())] + [(k, pa.list_(pa.float32())) for k in names])
    out = f"{a.work}/out"
    handler = KeyedModelHandler(TFModelHandlerTensor(model_uri=a.model_path, min_batch_size=a.batch_size, max_batch_size=a.batch_size))
    t0 = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (
            p
            | beam.io.ReadFromTFRecord(f"{a.data}/*.tfrecord")
            | "Decode" >> beam.Map(decode)
            | RunInference(handler)
            | "ToRow" >> beam.Map(to_row)
            | beam.io.WriteToParquet(f"{out}/part", schema, file_name_suffix=".parquet")
        )
    secs = time.perf_counter() - t0
    res = {"images": _rows(out), "seconds": secs, "first_batch_s": None}
    if a.check:
        res["check"] = _compare(a.check, out)
    return res


def _extract(a) -> dict:
    import layerbeam

    model = _plain_model_base(a.scenario)
    ds = _plain_dataset(a.data, a.scenario, a.batch_size, autotune=False).map(lambda k, x: x)
    out = f"{a.work}/out"
    t0 = time.perf_counter()
    layerbeam.extract(model, ds, select=SCENARIOS[a.scenario]["select"], batch_size=a.batch_size, output=out)
    secs = time.perf_counter() - t0
    return {"images": _rows(out), "seconds": secs, "first_batch_s": None}


def _extract_layers(a) -> dict:
    """ReadFromTFRecord → (key, image bytes) → layerbeam.DecodeImages → ExtractLayers → WriteLayers."""
    import apache_beam as beam
    import tensorflow as tf

    import layerbeam

    def key_and_bytes(record: bytes):
        f = tf.train.Example.FromString(record).features.feature
        return f["image/key"].bytes_list.value[0].decode(), f["image/encoded"].bytes_list.value[0]

    return _run_extract_layers(a, lambda s: (
        "KeyAndBytes" >> beam.Map(key_and_bytes),
        layerbeam.DecodeImages((SIZE, SIZE), f"keras.applications.{s['source']}", batch_size=a.batch_size),
    ))


def _extract_layers_eager(a) -> dict:
    """The same, decoding each element eagerly in a Map, as Beam's RunInference examples do."""
    import apache_beam as beam
    import tensorflow as tf

    pre = _preprocess_for(a.scenario)
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string), "image/key": tf.io.FixedLenFeature([], tf.string)}

    def decode(record: bytes):
        ex = tf.io.parse_single_example(record, spec)
        img = tf.image.resize(tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False), (SIZE, SIZE))
        return ex["image/key"].numpy().decode(), pre(img).numpy()

    return _run_extract_layers(a, lambda s: ("Decode" >> beam.Map(decode),))


def _run_extract_layers(a, decoding) -> dict:
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    import layerbeam

    out = f"{a.work}/out"
    s = SCENARIOS[a.scenario]
    # A saved file, not `keras.applications.<Name>`: built twice in one process (launcher,
    # then the in-process worker), Keras names the second copy's input `input_layer_1`,
    # which the launcher's element conversion does not know (seen with main at a87f8b1).
    source = f"{a.work}/model.keras"
    _plain_model_base(a.scenario).save(source)
    t0 = time.perf_counter()
    with beam.Pipeline(runner=FnApiRunner()) as p:
        pcoll = p | beam.io.ReadFromTFRecord(f"{a.data}/*.tfrecord")
        for step in decoding(s):
            pcoll = pcoll | step
        _ = (
            pcoll
            | layerbeam.ExtractLayers(source, select=s["select"], batch_size=a.batch_size)
            | layerbeam.WriteLayers(out, overwrite=True)
        )
    secs = time.perf_counter() - t0
    return {"images": _rows(out), "seconds": secs, "first_batch_s": None}


def _plain_model_base(scenario: str):
    import keras

    keras.utils.set_random_seed(0)
    return getattr(keras.applications, SCENARIOS[scenario]["source"])(input_shape=(SIZE, SIZE, 3), weights=None)


def _rows(out: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(out, format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."]).count_rows()


def _compare(check: str, out: str) -> dict:
    """Largest absolute difference between the limit's first batch and this kind's rows for
    the same keys (one output), relative to that output's largest magnitude."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ref = np.load(check)
    name = str(ref["name"])
    keys = [str(k) for k in ref["keys"]]
    d = pads.dataset(out, format="parquet", ignore_prefixes=["_", "."], partitioning="hive")
    col = next((c for c in d.schema.names if c == name or c.endswith(name)), None)
    if col is None:
        return {"output": name, "error": f"no column for {name} in {d.schema.names[:8]}"}
    t = d.to_table(columns=["key", col], filter=pc.field("key").isin(keys))
    got = dict(zip(t.column("key").to_pylist(), t.column(col).to_pylist()))
    if len(got) != len(keys):
        return {"output": name, "error": f"{len(got)} of {len(keys)} keys found"}
    mine = np.array([np.asarray(got[k], np.float32).ravel() for k in keys])
    want = ref["values"].reshape(len(keys), -1)
    scale = float(np.abs(want).max()) or 1.0
    return {"output": name, "rows": len(keys), "max_rel_diff": float(np.abs(mine - want).max()) / scale}


def _save_model(a) -> dict:
    _plain_model(a.scenario).save(a.model_path)
    return {}


CHILDREN = {"limit": _limit, "limit_noat": _limit, "layerbeam": _layerbeam, "peer": _peer, "extract": _extract,
            "extract_layers": _extract_layers, "extract_layers_eager": _extract_layers_eager, "save_model": _save_model}


def _available(kind: str, python: str) -> str | None:
    """None when `kind` can run here, else why not."""
    probes = {
        "peer": ("import tensorflow_hub, tf_keras", "needs the bench extra: pip install -e .[bench] (tensorflow_hub, tf_keras)"),
        "extract": ("import importlib.util as u, sys; sys.exit(u.find_spec('layerbeam.extract') is None)", "this checkout has no layerbeam.extract yet"),
        "extract_layers": ("import sys, layerbeam.transforms.beam as b; sys.exit(not hasattr(b, 'DecodeImages'))", "this checkout has no layerbeam.DecodeImages yet"),
        "extract_layers_eager": ("import sys, layerbeam.transforms.beam as b; sys.exit(not hasattr(b, 'ExtractLayers'))", "this checkout has no layerbeam.ExtractLayers yet"),
    }
    if kind not in probes:
        return None
    code, why = probes[kind]
    ok = subprocess.run([python, "-c", code], capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).returncode == 0
    return None if ok else why


def _run_child(kind: str, python: str, a, check: str | None) -> dict:
    work = tempfile.mkdtemp(prefix=f"bench-{kind.replace('@', '-')}-", dir=a.tmp)
    base = kind.split("@")[0]
    cmd = [python, __file__, "--child", base, "--scenario", a.scenario, "--data", a.data, "--batch-size", str(a.batch_size),
           "--model-path", a.model_path, "--work", work, "--launched", repr(time.time())]
    if check:
        cmd += ["--check", check]
    p = subprocess.run(cmd, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"bench: the {kind} run failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"  {kind:<16} {res['images_per_s']:7.1f} img/s  ({res['seconds']:.1f}s)", file=sys.stderr, flush=True)
    return res


def _scenario(s: str, a, kinds: list[tuple[str, str]], skipped: dict) -> dict:
    a.scenario = s
    a.model_path = f"{a.tmp}/model-{s}.keras"
    if any(k == "peer" for k, _ in kinds):
        subprocess.run([sys.executable, __file__, "--child", "save_model", "--scenario", s, "--model-path", a.model_path],
                       check=True, capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    check = f"{a.tmp}/check-{s}.npz"
    runs: dict[str, list[dict]] = {k: [] for k, _ in kinds}
    checks: dict[str, dict] = {}
    for r in range(a.rounds):  # interleaved, so drift on a shared machine hits every kind alike
        print(f"scenario {s}, round {r + 1}/{a.rounds} (load avg {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        # Round 1 keeps the given order (the limit writes the check the others compare with);
        # later rounds shuffle it (seeded), so no kind always runs last when the load changes.
        order = list(kinds) if r == 0 else random.Random(r).sample(kinds, len(kinds))
        for k, python in order:
            first = r == 0 and not a.no_check
            res = _run_child(k, python, a, check if first and k.split("@")[0] in ("limit", "layerbeam", "peer") and "limit" in runs else None)
            if "check" in res:
                checks[k] = res.pop("check")
            runs[k].append(res)
    best = {k: max(v, key=lambda x: x["images_per_s"]) for k, v in runs.items()}
    rep = {"title": SCENARIOS[s]["title"], "best": best, "every": {k: [round(x["images_per_s"], 1) for x in v] for k, v in runs.items()},
           "checks": checks, "skipped": skipped}
    lim = max((best[k]["images_per_s"] for k in ("limit", "limit_noat") if k in best), default=None)
    rep["limit_best"] = lim
    if a.rss and "layerbeam" in best:
        a4 = argparse.Namespace(**vars(a))
        a4.data = _dataset(4 * a.n, 4 * a.shards)
        rep["layerbeam_4n"] = _run_child("layerbeam", sys.executable, a4, None)
        rep["rss_4n/rss_n"] = rep["layerbeam_4n"]["peak_rss_mb"] / best["layerbeam"]["peak_rss_mb"]
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="a", choices=["a", "b", "c", "all"])
    ap.add_argument("--n", type=int, default=2048, help="images")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of them is reported")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which to run (peer runs in scenario a only unless named with --peer-everywhere)")
    ap.add_argument("--peer-everywhere", action="store_true", help="run the peer in scenarios b and c too")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHON", help="also run layerbeam, extract and extract_layers (those in --kinds) with this interpreter (another checkout's venv), as KIND@NAME")
    ap.add_argument("--rss", action="store_true", help="also run layerbeam at 4N and compare peak RSS")
    ap.add_argument("--no-check", action="store_true", help="skip the equal-outputs check of round 1")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    for hidden in ("--child", "--data", "--model-path", "--work", "--check"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        res = CHILDREN[a.child](a)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if "images" in res:
            res["images_per_s"] = res["images"] / res["seconds"]
        print(json.dumps(res))
        return 0

    a.data = _dataset(a.n, a.shards)
    a.tmp = tempfile.mkdtemp(prefix="bench-")
    report = {"n": a.n, "shards": a.shards, "batch_size": a.batch_size, "rounds": a.rounds, "cpus": os.cpu_count(),
              "load_avg_before": os.getloadavg(), "commit": _commit(), "scenarios": {}}
    t_all = time.perf_counter()
    for s in ["a", "b", "c"] if a.scenario == "all" else [a.scenario]:
        kinds, skipped = [], {}
        for k in a.kinds.split(","):
            if k not in KINDS:
                raise SystemExit(f"bench: unknown kind {k!r}; use some of {', '.join(KINDS)}")
            if k == "peer" and s != "a" and not a.peer_everywhere:
                continue
            why = _available(k, sys.executable)
            if why:
                skipped[k] = why
                continue
            kinds.append((k, sys.executable))
            if k in VARIED:
                kinds += [(f"{k}@{v.split('=', 1)[0]}", v.split("=", 1)[1]) for v in a.variant]
        report["scenarios"][s] = _scenario(s, a, kinds, skipped)
    report["load_avg_after"] = os.getloadavg()
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    shutil.rmtree(a.tmp, ignore_errors=True)
    print(json.dumps(report, indent=1) if a.json else _table(report))
    return 0


def _commit() -> str:
    p = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return (p.stdout.strip() or "?") + ("+changes" if dirty else "")


def _table(r: dict) -> str:
    lines = [f"N={r['n']} in {r['shards']} shards · batch {r['batch_size']} · {r['cpus']} CPUs · best of {r['rounds']} interleaved rounds · "
             f"load avg {r['load_avg_before'][0]:.1f} before, {r['load_avg_after'][0]:.1f} after · layerbeam {r['commit']} · {r['total_s']:.0f}s"]
    for s, v in r["scenarios"].items():
        best, lim = v["best"], v["limit_best"]
        lines.append(f"\nscenario {s}: {v['title']}")
        lines.append(f"  {'run':<16} {'images/s':>9} {'/limit':>7} {'seconds':>8} {'peak RSS MB':>12} {'first batch s':>14}   every round's images/s")
        for k, b in best.items():
            fb = f"{b['first_batch_s']:.1f}" if b.get("first_batch_s") is not None else "-"
            ratio = f"{b['images_per_s'] / lim:.2f}" if lim else "-"
            every = ", ".join(map(str, v["every"][k]))
            lines.append(f"  {k:<16} {b['images_per_s']:>9.1f} {ratio:>7} {b['seconds']:>8.1f} {b['peak_rss_mb']:>12.0f} {fb:>14}   {every}")
        lines.append("  /limit is against the faster of limit and limit_noat")
        if "layerbeam" in best:
            lb = best["layerbeam"]["images_per_s"]
            ratios = [f"layerbeam/{k} = {lb / best[k]['images_per_s']:.2f}" for k in best if k != "layerbeam" and not k.startswith("layerbeam@")]
            ratios += [f"layerbeam/{k} = {lb / best[k]['images_per_s']:.2f}" for k in best if k.startswith("layerbeam@")]
            ratios += [f"{k}/layerbeam = {best[k]['images_per_s'] / lb:.2f}" for k in best if k.split("@")[0] in ("extract", "extract_layers", "extract_layers_eager")]
            if ratios:  # layerbeam alone (`--kinds layerbeam --rss`) has nothing to compare with
                lines.append("  " + " · ".join(ratios))
            rj = best["layerbeam"].get("run_job_s")
            if rj:
                per_s = best["layerbeam"]["images"] / rj
                of_limit = f", {per_s / lim:.2f} of the limit" if lim else ""
                lines.append(f"  layerbeam seconds are the pipeline's (its summary); run_job took {rj:.1f}s with Beam's import and the lock: {per_s:.1f} img/s{of_limit}")
            t = best["layerbeam"].get("time_in_shards") or {}
            if t:
                # input_wait and model are the extracting thread's; to_arrow is the writer's thread's (older checkouts: the
                # extracting thread's), overlapped; write_and_other is the extracting thread's wait for the writer and bookkeeping
                lines.append("  layerbeam time in shards: " + ", ".join(f"{k} {x:.1f}s" for k, x in t.items()))
        if "layerbeam_4n" in v:
            b4 = v["layerbeam_4n"]
            lines.append(f"  layerbeam at 4N: {b4['images_per_s']:.1f} img/s, peak RSS {b4['peak_rss_mb']:.0f} MB · 4N/N = {v['rss_4n/rss_n']:.2f}")
        for k, c in v["checks"].items():
            lines.append(f"  check {k} vs limit: " + (c.get("error") or f"{c['output']} on {c['rows']} rows, max |diff| / max |value| = {c['max_rel_diff']:.1e}"))
        for k, why in v["skipped"].items():
            lines.append(f"  skipped {k}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
