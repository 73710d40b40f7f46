#!/usr/bin/env python3
"""Benchmark of the candidate Parquet encodings for layer outputs (issue 14).

Standalone: numpy + pyarrow only. Builds one realistic table (key string, label int64,
four pooled float32 outputs of 32/64/192/1280 values, one unreduced 14×14×96 map kept as
float16; values are ReLU-like activations: max(0, N(0, σ_channel)), about half zeros),
writes it with each candidate encoding (zstd level 1, dictionary only on key/label,
row groups of ~64 MiB as layerbeam does) and reads it back with pyarrow.

    python scripts/bench_encodings.py                 # 4096 rows, table on stdout
    python scripts/bench_encodings.py --rows 512 --keep /tmp/cands   # keep the files

MB/s are source megabytes (the numpy arrays as produced: the map counted as float16)
per second of wall time, best of --reps. Write time includes building the Arrow arrays
from numpy (the widening, the nesting), because a writer pays for it.

Candidates (name → what the tensor columns are):
  A_ext_f16_bss     the old default, now output.parquet_encoding=arrow_tensor: fixed_shape_tensor extension, float16 kept, BSS on all tensor leaves
  A_ext_f16_nobss16 same, BSS only on float32 leaves (the old float16_byte_stream_split=False)
  B_fsl_f32_bss     flat fixed_size_list<float32> (float16 widened), shape in field + schema metadata, BSS
  B_fsl_f32         same without BSS
  C_nested_f32_bss  nested fixed_size_list<...<float32>> (list of list of list for [14,14,96]), BSS: the portable default
  C_nested_f32      same without BSS
  D_list_f32_bss    plain list<float32> (the old parquet_compat, now output.parquet_encoding=list), BSS
  D_list_f32        same without BSS
  E_ext_f32_bss     fixed_shape_tensor<float32> (widened, extension kept), BSS
  F_fsl_f16_bss     flat fixed_size_list<float16> + metadata, BSS
  F_fsl_f16         same without BSS
  G_nested_f16      nested fixed_size_list<float16>, no BSS (output.parquet_encoding=nested_float16)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

POOLED = {"pool32": 32, "pool64": 64, "pool192": 192, "pool1280": 1280}
MAP_SHAPE = (14, 14, 96)
MAP = "map16"


def make_source(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The numpy arrays a run produces: keys, labels, pooled float32, one float16 map."""
    rng = np.random.default_rng(seed)
    src: dict[str, np.ndarray] = {
        "key": np.array([f"img-{i:08d}.jpg" for i in range(rows)], dtype=object),
        "label": rng.integers(0, 10, rows).astype(np.int64),
    }
    for name, n in POOLED.items():
        # pooled ReLU outputs: means of rectified values, a few exact zeros (dead channels)
        scale = rng.gamma(2.0, 0.5, n).astype(np.float32)
        v = np.maximum(0, rng.normal(0.2, 1.0, (rows, n)).astype(np.float32)) * scale
        v[:, rng.random(n) < 0.1] = 0
        src[name] = v
    scale = rng.gamma(2.0, 0.5, MAP_SHAPE[-1]).astype(np.float32)
    m = np.maximum(0, rng.normal(-0.1, 1.0, (rows, *MAP_SHAPE)).astype(np.float32)) * scale
    src[MAP] = m.astype(np.float16)
    return src


def source_bytes(src: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for k, v in src.items() if k not in ("key",)) + sum(len(s) for s in src["key"])


# --------------------------------------------------------------------------- encodings


def _flat(a: np.ndarray, widen: bool) -> pa.Array:
    flat = a.reshape(-1)
    if widen and flat.dtype == np.float16:
        flat = flat.astype(np.float32)
    return pa.array(flat)


def tensor_array(a: np.ndarray, layout: str, widen: bool) -> pa.Array:
    """One tensor column (rows, *shape) in the given layout."""
    rows, shape = a.shape[0], a.shape[1:]
    size = int(np.prod(shape))
    values = _flat(a, widen)
    if layout == "ext":
        storage = pa.FixedSizeListArray.from_arrays(values, size)
        return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(values.type, list(shape)), storage)
    if layout == "fsl":
        return pa.FixedSizeListArray.from_arrays(values, size)
    if layout == "nested":
        arr = values
        for d in reversed(shape):
            arr = pa.FixedSizeListArray.from_arrays(arr, d)
        return arr
    if layout == "list":
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * size)
        return pa.ListArray.from_arrays(offsets, values)
    raise ValueError(layout)


def leaf_path(name: str, typ: pa.DataType) -> str:
    """The Parquet column path of a (nested) list column's leaf, as pyarrow names it."""
    path = name
    if isinstance(typ, pa.BaseExtensionType):
        typ = typ.storage_type
    while pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ):
        path += ".list.element"
        typ = typ.value_type
    return path


CANDIDATES: dict[str, dict] = {
    "A_ext_f16_bss": dict(layout="ext", widen=False, bss="all"),
    "A_ext_f16_nobss16": dict(layout="ext", widen=False, bss="f32"),
    "B_fsl_f32_bss": dict(layout="fsl", widen=True, bss="all"),
    "B_fsl_f32": dict(layout="fsl", widen=True, bss="none"),
    "C_nested_f32_bss": dict(layout="nested", widen=True, bss="all"),
    "C_nested_f32": dict(layout="nested", widen=True, bss="none"),
    "D_list_f32_bss": dict(layout="list", widen=True, bss="all"),
    "D_list_f32": dict(layout="list", widen=True, bss="none"),
    "E_ext_f32_bss": dict(layout="ext", widen=True, bss="all"),
    "F_fsl_f16_bss": dict(layout="fsl", widen=False, bss="all"),
    "F_fsl_f16": dict(layout="fsl", widen=False, bss="none"),
    "G_nested_f16": dict(layout="nested", widen=False, bss="none"),
}


def build_table(src: dict[str, np.ndarray], layout: str, widen: bool) -> pa.Table:
    cols, fields, shapes = [], [], {}
    cols.append(pa.array(src["key"].tolist(), pa.string()))
    fields.append(pa.field("key", pa.string(), nullable=False))
    cols.append(pa.array(src["label"]))
    fields.append(pa.field("label", pa.int64(), nullable=False))
    for name, a in src.items():
        if name in ("key", "label"):
            continue
        arr = tensor_array(a, layout, widen)
        meta = {"shape": json.dumps(list(a.shape[1:])), "dtype": str(a.dtype)}
        shapes[name] = {"shape": list(a.shape[1:]), "dtype": str(a.dtype), "stored": str(arr.type).split("<")[0]}
        cols.append(arr)
        fields.append(pa.field(name, arr.type, nullable=False, metadata=meta))
    schema = pa.schema(fields, metadata={"layerbeam": json.dumps({"columns": shapes})})
    return pa.Table.from_arrays(cols, schema=schema)


def write_options(table: pa.Table, bss: str, row_group_bytes: int = 64 << 20) -> dict:
    tensor = [f for f in table.schema if f.name not in ("key", "label")]

    def leaf_width(f):
        t = f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type
        while hasattr(t, "value_type"):
            t = t.value_type
        return t.bit_width // 8

    if bss == "all":
        split = [leaf_path(f.name, f.type) for f in tensor]
    elif bss == "f32":
        split = [leaf_path(f.name, f.type) for f in tensor if leaf_width(f) == 4]
    else:
        split = []
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    return dict(
        compression="zstd",
        compression_level=1,
        use_dictionary=["key", "label"],
        use_byte_stream_split=split or False,
        write_statistics=["key", "label"],
        row_group_size=max(1, min(1 << 20, row_group_bytes // row_bytes)),
    )


def write_candidate(src: dict[str, np.ndarray], name: str, path: str) -> None:
    c = CANDIDATES[name]
    table = build_table(src, c["layout"], c["widen"])
    pq.write_table(table, path, **write_options(table, c["bss"]))


def layerbeam_writer(src: dict[str, np.ndarray], encoding: str, folder: str, batch: int = 64):
    """A function writing `src` through layerbeam's own Parquet writer (`output.parquet_encoding`
    = `encoding`), in batches of `batch` rows as the pipeline hands them over, unpartitioned;
    it returns the bytes written."""
    from layerbeam.transforms.formats import WriteSpec, make_writer
    from layerbeam.transforms.layers import OutputSpec
    from layerbeam.transforms.schema import output_schema, to_record_batch

    specs = [OutputSpec(name=n, path=n, layer_type="Dense", reduce="mean", dtype="float32", shape=(k,)) for n, k in POOLED.items()]
    specs.append(OutputSpec(name=MAP, path=MAP, layer_type="Conv2D", reduce="none", dtype="float16", shape=MAP_SHAPE))
    schema = output_schema(specs, {"key": pa.string(), "label": pa.int64()})
    tensors = [*POOLED, MAP]
    n = len(src["key"])
    batches = [to_record_batch(schema, {"key": src["key"][i : i + batch], "label": src["label"][i : i + batch]}, {t: src[t][i : i + batch] for t in tensors}) for i in range(0, n, batch)]

    def write() -> int:
        shutil.rmtree(folder, ignore_errors=True)
        writer = make_writer(WriteSpec(path=folder, parquet_encoding=encoding), schema)
        return sum(f.bytes for f in writer.write_shard(iter(batches), folder, "part-bench"))

    return write


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="candidate names (default all)")
    ap.add_argument("--keep", help="write the candidate files to this folder and keep them")
    ap.add_argument("--layerbeam", nargs="*", metavar="ENCODING", help="also write through layerbeam's own writer with these output.parquet_encoding values (needs layerbeam installed)")
    args = ap.parse_args(argv)

    src = make_source(args.rows)
    mb = source_bytes(src) / 1e6
    zeros = float((src[MAP] == 0).mean())
    print(f"pyarrow {pa.__version__}, numpy {np.__version__}; {args.rows} rows, {mb:.1f} MB source "
          f"(map {MAP_SHAPE} float16: {src[MAP].nbytes / 1e6:.1f} MB, {zeros:.0%} zeros), best of {args.reps}, "
          f"cpu_count {os.cpu_count()}")
    folder = args.keep or tempfile.mkdtemp(prefix="bench_enc_")
    os.makedirs(folder, exist_ok=True)
    names = args.only or list(CANDIDATES)
    rows = []
    try:
        for name in names:
            path = os.path.join(folder, f"{name}.parquet")
            w = _best(lambda: write_candidate(src, name, path), args.reps)
            size = os.path.getsize(path)
            r = _best(lambda: pq.read_table(path), args.reps)
            rows.append((name, size, w, r))
        for enc in args.layerbeam or ():
            sub = os.path.join(folder, f"layerbeam_{enc}")
            write = layerbeam_writer(src, enc, sub)
            w = _best(write, args.reps)
            size = write()
            r = _best(lambda: pq.read_table(sub), args.reps)
            rows.append((f"layerbeam:{enc}", size, w, r))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    base = next((x for x in rows if x[0] == "A_ext_f16_bss"), rows[0])
    print(f"{'candidate':<20} {'size MB':>8} {'×size':>6} {'write MB/s':>10} {'×write':>6} {'read MB/s':>9} {'×read':>6}")
    for name, size, w, r in rows:
        print(f"{name:<20} {size / 1e6:8.1f} {size / base[1]:6.2f} {mb / w:10.0f} {base[2] / w:6.2f} {mb / r:9.0f} {base[3] / r:6.2f}")
    print(f"(× columns are relative to {base[0]}: size ratio, speed ratio; higher speed ratio = faster)")


if __name__ == "__main__":
    main()
