#!/usr/bin/env python3
"""Which real client reads which candidate Parquet encoding (issue 14).

Writes a few rows of the bench table (scripts/bench_encodings.py) with each candidate,
then reads each file with every installed client (tests/reader_clients.py) and prints a
matrix: ok (nested: shape from the data / flat), bit-exact or not, or the client's error.
Then the partition and sidecar-file matrix on Hive-partitioned folders.

    /work/venv-h14/bin/python scripts/reader_matrix.py [--clients spark hf_datasets] [--rows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

import bench_encodings as be  # noqa: E402
import reader_clients as rc  # noqa: E402

MATRIX = ["A_ext_f16_bss", "A_ext_f16_nobss16", "E_ext_f32_bss", "B_fsl_f32_bss", "C_nested_f32_bss",
          "C_nested_f32", "D_list_f32_bss", "F_fsl_f16_bss", "F_fsl_f16", "G_nested_f16"]


def check(read: rc.Read, src: dict, column: str, want_labels=True) -> str:
    order = np.argsort(np.array(read.keys))
    keys = np.array(read.keys)[order]
    ref_order = np.argsort(src["key"].astype(str))
    if read.rows != len(src["key"]) or not (keys == src["key"].astype(str)[ref_order]).all():
        return f"WRONG rows/keys ({read.rows})"
    got = read.tensor[order].reshape(read.rows, -1)
    ref = src[column][ref_order].astype(np.float32).reshape(read.rows, -1)
    exact = got.shape == ref.shape and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    shape = "nested" + str(tuple(read.tensor.shape[1:])).replace(" ", "") if read.nested else "flat"
    lab = ""
    if want_labels:
        if read.labels is None:
            lab = " label:MISSING"
        else:
            ok = np.array_equal(np.array(read.labels)[order], src["label"][ref_order])
            lab = " label:ok" if ok else " label:WRONG"
    return f"ok {shape} {'exact' if exact else 'NOT-EXACT'}{lab}"


def write_partitioned(src: dict, cand: str, folder: Path, in_files: bool, sidecars: tuple[str, ...]) -> None:
    c = be.CANDIDATES[cand]
    table = be.build_table(src, c["layout"], c["widen"])
    for lab in sorted(set(src["label"].tolist())):
        part = table.filter(pa.compute.equal(table["label"], lab))
        if not in_files:
            part = part.drop_columns(["label"])
        d = folder / f"label={lab}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, d / "part-0.parquet", **be.write_options(part, c["bss"]))
    for s in sidecars:
        (folder / s).write_text(json.dumps({"files": []}) if s.endswith(".json") else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--clients", nargs="*", default=list(rc.CLIENTS))
    ap.add_argument("--candidates", nargs="*", default=MATRIX)
    ap.add_argument("--partition-candidate", default="C_nested_f32_bss")
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--skip-partitions", action="store_true")
    args = ap.parse_args(argv)

    clients = [c for c in args.clients if rc.available(c)]
    print("clients:", ", ".join(f"{c} {rc.version(c)}" for c in clients))
    missing = [c for c in args.clients if c not in clients]
    if missing:
        print("not installed:", ", ".join(missing))
    src = be.make_source(args.rows, seed=1)
    src["label"] = (np.arange(args.rows) % 3).astype(np.int64)
    tmp = Path(tempfile.mkdtemp(prefix="reader_matrix_"))
    try:
        if not args.skip_files:
            print("\n## single file per candidate: column map16 (float16 source, 14x14x96)")
            for cand in args.candidates:
                path = tmp / f"{cand}.parquet"
                be.write_candidate(src, cand, str(path))
                for cl in clients:
                    read, err = rc.try_read(cl, str(path), be.MAP, hive=False)
                    res = check(read, src, be.MAP) + f" [{read.raw_type[:60]}]" if read else f"FAIL {err}"
                    print(f"{cand:<18} | {cl:<12} | {res}", flush=True)
        if not args.skip_partitions:
            print(f"\n## Hive-partitioned folders (label=N/part-0.parquet), candidate {args.partition_candidate}")
            layouts = {
                "hive_only+_sidecars": (False, ("_manifest.json", "_SUCCESS")),
                "hive_and_file+_sidecars": (True, ("_manifest.json", "_SUCCESS")),
                "hive_only+.sidecars": (False, (".manifest.json", ".SUCCESS")),
                "hive_only,no_sidecars": (False, ()),
                "hive_and_file,no_sidecars": (True, ()),
                "data/ subfolder, sidecars in root": (False, ("_manifest.json", "_SUCCESS")),
            }
            variants = [(c, rc.CLIENTS[c][1]) for c in clients]
            if "polars" in clients:
                variants.append(("polars_glob", rc.read_polars_glob))
            if "hf_datasets" in clients:
                variants.append(("hf_glob", rc.read_hf_glob))
            for lay, (in_files, side) in layouts.items():
                folder = tmp / lay.replace(" ", "_").replace("/", "").replace(",", "")
                sub = "data" if lay.startswith("data/") else ""
                write_partitioned(src, args.partition_candidate, folder / sub, in_files, ())
                for s in side:
                    (folder / s).write_text(json.dumps({"files": []}) if s.endswith(".json") else "")
                folder = folder / sub
                for name, fn in variants:
                    try:
                        read = fn(str(folder), "pool64", True)
                        res = check(read, src, "pool64")
                    except Exception as e:  # noqa: BLE001
                        res = f"FAIL {rc.first_line(e)}"
                    print(f"{lay:<26} | {name:<12} | {res}", flush=True)
    finally:
        rc.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
