"""The input side alone: CPU time per image of layerbeam's reader against the bench's limit
dataset, no model, in one process, alternating.

On a 2-core worker the model takes both cores, so every CPU millisecond the reader spends
per image comes out of the model's time; this prints how many the file-pattern path spends
beyond a plain tf.data pipeline (TFRecord → parse → decode → resize → preprocess → batch),
and what the reader's options cost (`--no-exif`, `--no-cap`).

    python scripts/bench.py --n 2048 --kinds limit_noat --rounds 1   # makes data/bench-2048-8
    python scripts/bench_reader.py [--n 2048] [--rounds 3] [--no-exif] [--no-cap]
    python scripts/bench_reader.py --first-batch [--variant NAME=PYTHON]

`--first-batch` times a worker's first reader pipeline instead: from asking `read_shard`
for the first shard (the model already built) to its first batch, against the plain
dataset from building it to its first batch, each in a fresh process, alternating
(`--variant` adds another checkout's layerbeam, as `bench.py`'s does). 2026-11-28, 3
rounds: layerbeam 0.88–1.02 s at 4377762, layerbeam@a7afdc5 (before the reader's start-up
was cut: a `tf.cond` per format in the pixel cap, a larger EXIF reading) 1.20–1.65 s, the
plain dataset 0.21–0.26 s. Those two layerbeam figures also held about 0.3 s of draining the
rest of the shard (the generator was dropped before the clock stopped); timed as now, the
same reader gives 0.67–0.68 s in 3 fresh processes, against 0.95–1.29 s timed the old way.

On 2 CPU cores (2026-11-28, N=2048, 3 rounds): layerbeam 1.71–1.78 ms of CPU per image,
the plain dataset 1.23–1.52; without the EXIF test and the pixel cap 1.61–1.73 against
1.36–1.48. The rest is the reader's bookkeeping per record (the sentinel, the running byte
count, the record index, the per-record tagged `cond`, keys, `ignore_errors`) that makes
dead letters and the end-of-file check possible."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-exif", action="store_true", help="input.exif_orientation: false")
    ap.add_argument("--no-cap", action="store_true", help="input.max_image_pixels: null")
    ap.add_argument("--first-batch", action="store_true", help="time to the first reader pipeline's first batch, fresh processes")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHON", help="with --first-batch: also another checkout's layerbeam")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.first_batch and not a.child:
        return first_batches(a)

    spec_ = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    data = bench._dataset(a.n, a.shards)

    from layerbeam.config import load_config, to_spec
    from layerbeam.transforms.readers import match_shards, read_shard
    from layerbeam.transforms.shard import ShardProcessor

    # scenario (a)'s config, as bench.py's layerbeam kind reads it
    a.scenario, a.data, a.batch_size = "a", data, 32
    raw = bench._config(a, "/tmp/bench-reader-out")
    if a.no_exif:
        raw["input"]["exif_orientation"] = False
    if a.no_cap:
        raw["input"]["max_image_pixels"] = None
    cfg = load_config(raw=raw)
    spec = to_spec(cfg)
    shards = match_shards(cfg.input.pattern, cfg.input.format, cfg.input.files_per_shard, spec=spec.input)
    if a.child == "plain":
        t0 = time.perf_counter()
        next(iter(bench._plain_dataset(data, a.scenario, a.batch_size, autotune=False)))
        print(json.dumps({"first_batch_s": time.perf_counter() - t0}))
        return
    p = ShardProcessor(spec, f"bench-reader-{time.time_ns()}")  # builds the reader as a worker does
    if a.child == "layerbeam":
        t0 = time.perf_counter()
        reading = read_shard(shards[0], p.cfg.input, p.input_shapes, p.preprocess, p.batch_size, None, p.input_dtypes, p.readers)
        next(reading)
        first = time.perf_counter() - t0
        # Held until timed: a dropped generator closes at once, and closing it part-way
        # drains the rest of the shard (`_end_pipeline`), which counted ~0.3 s into the
        # first batch before 2026-11-28's ninth pass.
        reading.close()
        print(json.dumps({"first_batch_s": first}))
        return

    def layerbeam_reader() -> int:
        n = 0
        for s in shards:
            for batch, _ in read_shard(s, p.cfg.input, p.input_shapes, p.preprocess, p.batch_size, None, p.input_dtypes, p.readers):
                if batch is None:
                    break
                n += len(batch)
        return n

    def plain() -> int:
        return sum(len(keys) for keys, _ in bench._plain_dataset(data, a.scenario, a.batch_size, autotune=False))

    kinds = {"layerbeam": layerbeam_reader, "plain": plain}
    for f in kinds.values():  # warm: traces, the long-lived pipeline
        f()
    per: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.rounds):
        for k, f in kinds.items():
            c0, t0 = os.times(), time.perf_counter()
            n = f()
            wall, c1 = time.perf_counter() - t0, os.times()
            cpu = c1.user - c0.user + c1.system - c0.system
            per[k].append(1000 * cpu / n)
            print(f"round {r + 1} {k:<10} {n} images  wall {wall:5.2f}s  cpu {cpu:5.2f}s  {1000 * cpu / n:.2f} ms CPU/image", flush=True)
    lb, pl = min(per["layerbeam"]), min(per["plain"])
    print(f"best: layerbeam {lb:.2f} ms CPU/image, plain {pl:.2f} · layerbeam/plain = {lb / pl:.2f}")


def first_batches(a) -> None:
    """Each kind's first batch, in a fresh process per run, rounds interleaved."""
    base = [f"--n={a.n}", f"--shards={a.shards}"] + (["--no-exif"] if a.no_exif else []) + (["--no-cap"] if a.no_cap else [])
    runs = {"layerbeam": (sys.executable, "layerbeam"), "plain": (sys.executable, "plain")}
    for v in a.variant:
        name, python = v.split("=", 1)
        runs[f"layerbeam@{name}"] = (python, "layerbeam")
    got: dict[str, list[float]] = {k: [] for k in runs}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for r in range(a.rounds):
        for k, (python, child) in runs.items():
            out = subprocess.run([python, __file__, *base, f"--child={child}"], capture_output=True, text=True, env=env, check=True).stdout
            got[k].append(json.loads(out.strip().splitlines()[-1])["first_batch_s"])
            print(f"round {r + 1} {k:<18} first batch {got[k][-1]:.3f}s", flush=True)
    for k, v in got.items():
        print(f"{k:<18} first batch {min(v):.3f}–{max(v):.3f}s")


if __name__ == "__main__":
    main()
