#!/usr/bin/env python3
"""CPU cost of what a shard does with its rows after the model (issue 17, scenario b).

Scenario (b): MobileNetV2 224 with four mean-pooled float32 outputs (96/144/192/1280
values) plus one unreduced 28×28×192 output kept as float16. The rows are synthetic but
shaped like the real ones: ReLU-like activations (max(0, N(μ, σ_channel)), about half
exact zeros), keys as strings, an int64 label. Each stage is timed on its own, in
CPU-seconds (`time.process_time`, every thread of the process) per 1000 rows, best of
--reps:

  to_record_batch   numpy outputs → the canonical Arrow batch (`schema.to_record_batch`)
  stats.update      per-output statistics over the stored values (`stats.ShardStats`)
  to_stored[enc]    canonical batch → the Parquet encoding's batch (`schema.to_stored_batch`)
  write[enc,codec]  `ParquetShardWriter.write_shard` to a local temporary folder (this
                    includes to_stored[enc]; the file is deleted after each repetition)

    python scripts/bench_map_write.py                       # this checkout
    python scripts/bench_map_write.py --old main            # side by side with main's code
    python scripts/bench_map_write.py --old main --check    # and check the files are byte-identical

`--old REF` loads `transforms/` as it is at git REF (via `git archive`) into a temporary
package and times both implementations in the same process, interleaved repetition by
repetition, so a load that comes and goes affects both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLED = {"block_1_expand_relu": 96, "block_3_expand_relu": 144, "block_6_expand_relu": 192, "out_relu": 1280}
MAP = ("block_6_map", (28, 28, 192))
ENCODINGS = ("portable", "list", "arrow_tensor", "nested_float16")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The fields of `layers.OutputSpec` that the schema uses (importing layers would pull in Keras)."""

    name: str
    shape: tuple
    dtype: str
    reduce: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "reduce": self.reduce}


def make_rows(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    columns = {"key": np.array([f"gs://bucket/imagenet/train/n{i:08d}.JPEG".encode() for i in range(rows)], dtype=object), "label": rng.integers(0, 1000, rows).astype(np.int64)}
    outputs = {}
    for name, n in POOLED.items():
        scale = rng.gamma(2.0, 0.5, n).astype(np.float32)
        v = np.maximum(0, rng.normal(0.2, 1.0, (rows, n)).astype(np.float32)) * scale
        v[:, rng.random(n) < 0.1] = 0
        outputs[name] = v
    name, shape = MAP
    scale = rng.gamma(2.0, 0.5, shape[-1]).astype(np.float32)
    outputs[name] = (np.maximum(0, rng.normal(-0.1, 1.0, (rows, *shape)).astype(np.float32)) * scale).astype(np.float16)
    specs = [Spec(n, (c,), "float32", "mean") for n, c in POOLED.items()] + [Spec(name, shape, "float16", "none")]
    return columns, outputs, specs


def load_old(ref: str, tmp: str):
    """`transforms/` at `ref` as the top-level package `lb_old_transforms`."""
    data = subprocess.run(["git", "-C", HERE, "archive", ref, "transforms"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        t.extractall(tmp, filter="data")
    os.rename(os.path.join(tmp, "transforms"), os.path.join(tmp, "lb_old_transforms"))
    sys.path.insert(0, tmp)
    return "lb_old_transforms"


def modules(pkg: str):
    return {m: importlib.import_module(f"{pkg}.{m}") for m in ("schema", "stats", "formats.parquet")}


def stages(mods, columns, outputs, specs, workdir, batch):
    """{stage name: zero-argument callable}; each call does the stage once over all rows,
    in batches of `batch` rows as a shard does (the model's batch size)."""
    schema_m, stats_m, parquet_m = mods["schema"], mods["stats"], mods["formats.parquet"]
    import pyarrow as pa

    types = {"key": pa.string(), "label": pa.int64()}
    schema = schema_m.output_schema(specs, types)
    rows = len(columns["key"])
    cuts = [(lo, min(lo + batch, rows)) for lo in range(0, rows, batch)]

    def record_batches():
        return [schema_m.to_record_batch(schema, {k: v[lo:hi] for k, v in columns.items()}, {k: v[lo:hi] for k, v in outputs.items()}) for lo, hi in cuts]

    rbs = record_batches()
    out = {"to_record_batch": record_batches}

    def stats():
        s = stats_m.ShardStats([s.name for s in specs])
        for rb in rbs:
            s.update(rb)
        return s

    out["stats.update"] = stats
    for enc in ENCODINGS:
        stored = schema_m.stored_schema(schema, enc)
        out[f"to_stored[{enc}]"] = lambda stored=stored: [schema_m.to_stored_batch(stored, rb) for rb in rbs]
    for enc in ENCODINGS:
        for codec in ("none", "zstd"):
            w = parquet_m.ParquetShardWriter(schema, compression=codec, compression_level=1 if codec == "zstd" else None, encoding=enc)

            def write(w=w, enc=enc, codec=codec):
                d = tempfile.mkdtemp(dir=workdir)
                try:
                    w.write_shard(rbs, d, "part")
                finally:
                    shutil.rmtree(d)

            out[f"write[{enc},{codec}]"] = write
    return out


def check_identical(impls, columns, outputs, specs, workdir) -> bool:
    """Every encoding and codec, in batches of 32 and 7 rows (with NaN in the map and a
    file cap that splits the shard): the files each implementation writes, byte by byte."""
    import hashlib

    import pyarrow as pa

    outputs = dict(outputs, **{MAP[0]: outputs[MAP[0]].copy()})
    outputs[MAP[0]].reshape(-1)[::997] = np.nan
    rows, same = len(columns["key"]), True
    for batch in (32, 7):
        for enc in ENCODINGS:
            for codec in ("zstd", "none"):
                digests = []
                for mods in impls.values():
                    S = mods["schema"]
                    schema = S.output_schema(specs, {"key": pa.string(), "label": pa.int64()})
                    rbs = [S.to_record_batch(schema, {k: v[i : i + batch] for k, v in columns.items()}, {k: v[i : i + batch] for k, v in outputs.items()}) for i in range(0, rows, batch)]
                    w = mods["formats.parquet"].ParquetShardWriter(schema, compression=codec, compression_level=1 if codec == "zstd" else None, encoding=enc, row_group_bytes=16 << 20, max_rows_per_file=rows * 3 // 4)
                    d = tempfile.mkdtemp(dir=workdir)
                    files = w.write_shard(rbs, d, "part")
                    digests.append([(f.path, f.rows, hashlib.sha256(open(os.path.join(d, f.path), "rb").read()).hexdigest()) for f in files])
                    shutil.rmtree(d)
                ok = all(x == digests[0] for x in digests)
                same &= ok
                print(f"check batch={batch:<3} {enc:<15} {codec:<5} {'byte-identical' if ok else 'DIFFERENT'} ({len(digests[0])} files)")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="rows per batch (the model's batch size; default 32 as in the config)")
    ap.add_argument("--old", metavar="REF", help="also time transforms/ as at this git ref (e.g. main)")
    ap.add_argument("--only", help="comma-separated stage-name prefixes to time (default all)")
    ap.add_argument("--check", action="store_true", help="with --old: check that both write byte-identical files first")
    ap.add_argument("--workdir", default=None, help="where the Parquet files go (default: a temporary folder)")
    a = ap.parse_args()

    columns, outputs, specs = make_rows(a.rows)
    tmp = tempfile.mkdtemp(prefix="bench_map_write-")
    workdir = a.workdir or tmp
    try:
        impls = {"new": modules("layerbeam.transforms")}
        if a.old:
            impls = {"old": modules(load_old(a.old, tmp)), **impls}
        if a.check and len(impls) == 2 and not check_identical(impls, columns, outputs, specs, workdir):
            sys.exit("the implementations write different files")
        runs = {name: stages(m, columns, outputs, specs, workdir, a.batch) for name, m in impls.items()}
        names = list(runs[next(iter(runs))])
        if a.only:
            names = [n for n in names if any(n.startswith(p) for p in a.only.split(","))]
        best = {(impl, n): float("inf") for impl in runs for n in names}
        for n in names:
            for impl in runs:
                runs[impl][n]()  # warm-up: first-call costs (imports, allocations) are not per-row costs
            for _ in range(a.reps):
                for impl in runs:  # interleaved: a passing load hits old and new alike
                    t = time.process_time()
                    runs[impl][n]()
                    best[impl, n] = min(best[impl, n], time.process_time() - t)
        per = 1000 / a.rows
        mb = sum(v.nbytes for v in outputs.values()) / a.rows / 1e6
        print(f"{a.rows} rows in batches of {a.batch}, {mb:.3f} MB of outputs per row (map float16 {np.prod(MAP[1])} values); CPU-s per 1000 rows, best of {a.reps}")
        head = "".join(f"{impl:>10}" for impl in runs) + ("   new/old" if len(runs) == 2 else "")
        print(f"{'stage':<28}{head}")
        for n in names:
            vals = [best[impl, n] * per for impl in runs]
            ratio = f"{vals[1] / vals[0]:>10.2f}" if len(vals) == 2 and vals[0] > 0 else ""
            print(f"{n:<28}" + "".join(f"{v:>10.3f}" for v in vals) + ratio)
        default = ["to_record_batch", "stats.update", "write[portable,zstd]"]
        if all(d in names for d in default):
            print(f"{'default path (sum of 3)':<28}" + "".join(f"{sum(best[impl, d] for d in default) * per:>10.3f}" for impl in runs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
