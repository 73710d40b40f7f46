"""The commit at scale, without a model: synthetic staged runs (real Parquet files, key
hashes, markers, as workers leave them) committed by the real commit code.

    python scripts/bench_commit.py rss --rows 1000000 10000000      # peak RSS of the final step
    python scripts/bench_commit.py requests --files 200             # storage requests per data file (local, S3, GCS)
    python scripts/bench_commit.py wall --files 10000               # wall time of the commit, local disk
    python scripts/bench_commit.py wall --files 2000 --store s3 gcs # ... on the S3 and GCS API servers

`rss` runs each step in a fresh process and prints the peak RSS of the final step
(`finalize`, the only step on one worker) and of the largest dedupe bucket. `requests`
starts moto and fake-gcs-server (tests/objectstores.py) behind the counting proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python scripts/bench_commit.py`: the tests import `scripts.…`
    sys.path.insert(0, ROOT)


def manifest_base(out: str, run_id: str, overwrite: bool = False) -> dict:
    return {
        "run_id": run_id,
        "config": {"input": {"pattern": "synthetic"}, "output": {"path": out, "overwrite": overwrite, "partition_by": [], "format": "parquet"}},
        "model": {"fingerprint": "fp"},
    }


def stage_run(out: str, run_id: str, shards: int, rows: int, repeat_every: int = 0, files_per_shard: int = 1, write_rows: bool = True, threads: int = 1) -> tuple[list[dict], list]:
    """Stage `shards` shards of `rows` rows as workers would; return (results, shards).

    `repeat_every`: every that many shards, the shard's first 10 keys repeat the previous
    shard's (cross-shard duplicates the commit must drop). `write_rows=False` writes one
    tiny row per file but reports `rows` in the marker's counts (for the RSS benchmark:
    what grows is the key hashes, which are written in full).
    """
    from layerbeam.transforms._fs import content_id
    from layerbeam.transforms.readers import Shard
    from layerbeam.transforms.staging import OutputLayout, key_hashes

    layout = OutputLayout(out, run_id)
    fs = layout.fs
    results, listed = [], []

    def one(i: int):
        sid = f"s{i:05d}"
        attempt = layout.new_attempt()
        start = i * rows
        keys = np.array([f"k{start + j:012d}" for j in range(rows)], dtype=object)
        if repeat_every and i and i % repeat_every == 0:
            keys[:10] = [f"k{(i - 1) * rows + j:012d}" for j in range(10)]
        if not write_rows:
            keys = keys[:files_per_shard]
        files = []
        per = -(-rows // files_per_shard)
        for k in range(files_per_shard):
            part = keys[k * per : (k + 1) * per] if write_rows else keys[k : k + 1]
            name = f"part-{run_id[:8]}-{sid}-{k}.parquet"
            path = f"{layout.shard_dir(sid, attempt)}/{name}"
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            table = pa.table({"key": pa.array(list(part), pa.string()), "v": pa.array(np.arange(len(part), dtype=np.float32))})
            with fs.open(path, "wb") as f:
                pq.write_table(table, f)
            info = fs.info(path)  # as the Parquet writer does: size and the store's identity of the bytes
            cid = content_id(fs, info)
            files.append({"path": name, "final_path": name, "rows": len(part), "bytes": int(info["size"]), **({"content_id": cid} if cid else {})})
        n = sum(f["rows"] for f in files)
        if write_rows:
            layout.write_keys(sid, attempt, key_hashes(keys), np.arange(n, dtype=np.int64))
        else:  # the RSS benchmark: `rows` distinct key hashes per shard, tiny files
            h = np.frombuffer(np.random.default_rng(i).bytes(16 * rows), dtype="S16")
            layout.write_keys(sid, attempt, h, np.arange(rows, dtype=np.int64))
        r = {"shard": sid, "paths": [f"in/{sid}.tfrecord"], "bytes_in": 100, "read": n, "rows": n, "dead_letters": 0, "dead_reasons": {},
             "shard_errors": [], "files": files, "model_fingerprint": "fp", "seconds": 0.0, "timing": None, "resumed": False, "attempt": attempt, "input_version": ""}
        layout.write_marker(sid, r)
        return r, Shard(sid, (f"in/{sid}.tfrecord",), 100)

    # workers stage in parallel; a pool keeps staging 10^4 shards on an API server in minutes
    with ThreadPoolExecutor(threads) as pool:
        for r, sh in pool.map(one, range(shards)):
            results.append(r)
            listed.append(sh)
    return results, listed


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS of this process so far (VmHWM), less its RSS once the imports were done:
    what the step itself added."""
    return round(_status_mb("VmHWM") - _BASE, 1)


_BASE = 0.0


def _child(args) -> None:
    """One step in a fresh process; prints JSON with its peak RSS."""
    from layerbeam.transforms import commit
    from layerbeam.transforms.staging import OutputLayout

    with open(args.state) as f:
        st = json.load(f)
    layout = OutputLayout(st["out"], st["run_id"])
    base = manifest_base(st["out"], st["run_id"])
    global _BASE
    _BASE = _status_mb("VmRSS")
    t = time.perf_counter()
    if args.child == "bucket":  # the largest dedupe bucket: its parts from every shard
        parts = []
        for r in st["results"]:
            for b, part in commit.key_parts(layout, r, commit.DEDUPE_BUCKETS):
                if b == 0:
                    parts.append(part)
        commit.find_repeats(parts)
    elif args.child == "finalize":
        summaries = [commit.publish_shard(layout, r, ()) for r in st["results"]]  # a worker's step, timed apart
        rss_before = _peak_rss_mb()
        _BASE = _status_mb("VmRSS")  # finalize alone; the summaries are its input
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        t = time.perf_counter()
        commit.finalize(layout, summaries, base)
        print(json.dumps({"step": "finalize", "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before, "seconds": time.perf_counter() - t}))
        return
    print(json.dumps({"step": args.child, "peak_rss_mb": _peak_rss_mb(), "seconds": time.perf_counter() - t}))


def bench_rss(rows_list: list[int], shards: int) -> None:
    for rows in rows_list:
        with tempfile.TemporaryDirectory() as d:
            out = f"{d}/out"
            results, _ = stage_run(out, "rss0000000000000", shards, rows // shards, write_rows=False)
            state = f"{d}/state.json"
            with open(state, "w") as f:
                json.dump({"out": out, "run_id": "rss0000000000000", "results": results}, f)
            for step in ("bucket", "finalize"):
                p = subprocess.run([sys.executable, __file__, "--child", step, "--state", state], capture_output=True, text=True, check=True)
                print(json.dumps({"rows": rows, "shards": shards, **json.loads(p.stdout.strip().splitlines()[-1])}))


def bench_wall(files: int, stores: list[str] | None = None) -> None:
    stores = stores or ["local"]
    if set(stores) - {"local"}:  # the API servers are the tests' fixtures: run through pytest
        import pytest

        os.environ["BENCH_WALL_FILES"] = str(files)
        os.environ["BENCH_WALL_STORES"] = ",".join(s for s in stores if s != "local")
        code = pytest.main(["-q", "-s", "-p", "no:cacheprovider", os.path.join(os.path.dirname(__file__), "..", "tests", "test_commit.py"), "-k", "wall_time"])
        if code or "local" not in stores:
            sys.exit(code)
    _bench_wall_local(files)


def _bench_wall_local(files: int) -> None:
    from layerbeam.transforms.commit import commit_run

    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/out"
        t = time.perf_counter()
        results, listed = stage_run(out, "wall000000000000", files, 10, threads=4)
        staged = time.perf_counter() - t
        t = time.perf_counter()
        counts = commit_run(results, listed, manifest_base(out, "wall000000000000"), "wall000000000000")
        print(json.dumps({"store": "local", "files": files, "stage_s": round(staged, 1), "commit_s": round(time.perf_counter() - t, 2), "rows": counts["rows_written"]}))


STEPS = ("check", "keys", "publish", "finalize", "cleanup")


def count_commit(store, files: int, files_per_shard: int, run_id: str = "rq", replace: int = 0) -> dict:
    """Stage `files` data files (`files_per_shard` per shard) on `store` (a
    tests/objectstores.py `Store`) and commit them step by step, counting each step's requests
    at the server. `replace`: first commit an output of that many one-file shards, so the
    measured commit is an overwrite (`finalize` then deletes the old files).

    Returns {step: RequestCount, "files": files}; `commit` is everything from the check to
    `_SUCCESS`, `cleanup` the staging deletes after it."""
    from scripts._request_counter import count_requests

    from layerbeam.transforms import commit
    from layerbeam.transforms.staging import OutputLayout

    out = f"{store.url}/out-{run_id}"
    if replace:
        old, old_shards = stage_run(out, f"{run_id}old", replace, 2)
        commit.commit_run(old, old_shards, manifest_base(out, f"{run_id}old"), f"{run_id}old")
    results, shards = stage_run(out, run_id, files // files_per_shard, 8, files_per_shard=files_per_shard)
    layout = OutputLayout(out, run_id)
    base = manifest_base(out, run_id, overwrite=bool(replace))
    got: dict = {"files": files, "files_per_shard": files_per_shard}
    with count_requests(store=store.name) as c:
        assert commit.check_results([commit.brief(r) for r in results], shards, base, run_id)
    got["check"] = c
    with count_requests(store=store.name) as c:
        buckets: dict = {}
        for r in results:  # a worker per shard in the Beam job
            for b, part in commit.key_parts(layout, r):
                buckets.setdefault(b, []).append(part)
        assert not any(commit.find_repeats(p) for p in buckets.values())
    got["keys"] = c
    with count_requests(store=store.name) as c:
        summaries = [commit.publish_shard(layout, r, ()) for r in results]  # a worker per shard
    got["publish"] = c
    with count_requests(store=store.name) as c:
        commit.finalize(layout, summaries, base)
    got["finalize"] = c
    with count_requests(store=store.name) as c:
        for r in results:
            commit.cleanup_shard(layout, r["shard"])
        commit.cleanup_run(layout)
    got["cleanup"] = c
    return got


def requests_table(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of `count_commit` results: requests by step, and per data file."""
    head = "| store | files (per shard) | " + " | ".join(STEPS) + " | per file (keys + publish) | per run (check + finalize) | kinds (check → finalize) |"
    lines = [head, "|" + "---|" * (len(STEPS) + 5)]
    for name, g in rows:
        n = g["files"]
        per = {k: g[k].total for k in STEPS}
        kinds: dict = {}
        for k in STEPS[:-1]:
            for kind, v in g[k].by_kind.items():
                kinds[kind] = kinds.get(kind, 0) + v
        lines.append(
            f"| {name} | {n} ({g['files_per_shard']}) | " + " | ".join(str(per[k]) for k in STEPS)
            + f" | **{(per['keys'] + per['publish']) / n:.2f}** | {per['check'] + per['finalize']} | {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} |"
        )
    return "\n".join(lines)


def wall_on_store(store, files: int, threads: int = 16) -> dict:
    """Stage `files` one-file shards on `store` (a tests/objectstores.py `Store`) and time
    `commit_run` (the in-process commit: key reads and publishing on `threads` threads),
    counting its requests at the server: their number, how many were in flight at once, and
    their mean latency (the figures that scale it to other sizes and round-trip times)."""
    from scripts._request_counter import count_requests

    from layerbeam.transforms import commit
    from layerbeam.transforms.commit import commit_run

    out, run_id = f"{store.url}/wall", "wall000000000000"
    t = time.perf_counter()
    results, listed = stage_run(out, run_id, files, 10, threads=threads)
    staged = time.perf_counter() - t
    committed = []
    real_cleanup = commit.cleanup_run

    def cleanup_run(layout):  # called right after `_SUCCESS`: the output is complete here
        committed.append(time.perf_counter())
        return real_cleanup(layout)

    commit.cleanup_run = cleanup_run
    try:
        with count_requests(store=store.name) as c:
            t = time.perf_counter()
            counts = commit_run(results, listed, manifest_base(out, run_id), run_id, threads=threads)
            took = time.perf_counter() - t
    finally:
        commit.cleanup_run = real_cleanup
    success = committed[0] - t
    lat = [r.end - r.start for r in c.requests]
    return {
        "store": store.name, "files": files, "threads": threads, "stage_s": round(staged, 1), "commit_s": round(took, 2),
        "until_success_s": round(success, 2), "rows": counts["rows_written"],
        "requests": c.total, "per_file": round(c.total / files, 3), "peak_in_flight": c.peak_concurrency,
        "mean_latency_ms": round(1000 * sum(lat) / max(1, len(lat)), 2), "kinds": c.by_kind,
    }


def bench_requests(files: int) -> None:
    import pytest

    os.environ["BENCH_FILES"] = str(files)
    sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", os.path.join(os.path.dirname(__file__), "..", "tests", "test_commit.py"), "-k", "requests_per_file"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["rss", "requests", "wall"])
    ap.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--store", nargs="*", default=["local"], choices=["local", "s3", "gcs"], help="wall: where to stage and commit")
    ap.add_argument("--child")
    ap.add_argument("--state")
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.what == "rss":
        bench_rss(args.rows, args.shards)
    elif args.what == "wall":
        bench_wall(args.files, args.store)
    elif args.what == "requests":
        bench_requests(args.files)


if __name__ == "__main__":
    main()
