"""Beam's fixed part of a run: what a job costs outside its shards, in fresh processes,
alternating, with `--variant` for another checkout (as `bench.py`'s).

A 30 s bench run moves by 10–30% from one round to the next on this VM, which hides a
change of half a second. Here the job is (a)'s (MobileNetV2 224, four mean-pooled outputs)
over 8 shards of 8 images, so the part that does not grow with the data dominates:

* `outside` — the pipeline's seconds (its summary: from building the Beam graph to the end
  of the commit) less the time spent inside the shards (`ShardProcessor.process`: reading,
  the model, writing). That is Beam's graph, its runner proto and start, the hand-over
  between shards and the commit's stages;
* `build`, `proto` — building the job's graph and turning it into its runner proto, once
  more in the same process after the run (warm), and `transforms`, its leaf transforms.

    python scripts/bench_fixed.py [--rounds 6] [--variant NAME=PYTHON]   # makes data/bench-64-8 first

2026-11-28, 6 rounds against aae3574 (the commit's steps over a whole collection as
`ToList`/`Count.Globally`): `outside` median 1.02 s (0.76–1.20) against 1.46 s
(1.33–1.56), lower in every round; build 0.33 against 0.70 s, proto 0.21 against 0.39 s;
31 transforms against 74. The pipeline's whole seconds (5.2–6.1 against 5.3–5.6 s) are
within the noise of the model's first call, which dominates a job this small.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N, SHARDS = 64, 8


def _bench():
    """scripts/bench.py, for its dataset and scenario (a)'s config (as bench_reader.py does)."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _child(data: str, out: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import apache_beam as beam

    import layerbeam.run
    from layerbeam.config import load_config
    from layerbeam.plan import prepare

    run_mod = sys.modules["layerbeam.run"]  # the module (`layerbeam.run` is also the function)
    cfg = load_config(raw=_bench()._config(argparse.Namespace(scenario="a", data=data, batch_size=32), out))
    plan = prepare(cfg)
    manifest = run_mod.run_job(cfg, [], plan)
    timing = {k: sum(i["timing"][k] for i in manifest["inputs"]) for k in ("input_wait", "model", "write_and_other")}
    inside = sum(timing.values())
    t = time.perf_counter()
    p = beam.Pipeline()
    run_mod.build_pipeline(p, plan)
    build = time.perf_counter() - t
    t = time.perf_counter()
    proto = p.to_runner_api()
    return {
        "seconds": manifest["_seconds"], "inside": inside, "outside": manifest["_seconds"] - inside,
        "build": build, "proto": time.perf_counter() - t, **timing,
        "transforms": sum(1 for x in proto.components.transforms.values() if not x.subtransforms),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PYTHON", help="also run another checkout's layerbeam with this interpreter")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.data, a.child)))
        return 0
    a.data = _bench()._dataset(N, SHARDS)
    kinds = [("layerbeam", sys.executable)] + [tuple(v.split("=", 1)) for v in a.variant]
    runs: dict[str, list[dict]] = {k: [] for k, _ in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as tmp:
        for r in range(a.rounds):
            for name, python in kinds if r % 2 == 0 else kinds[::-1]:
                p = subprocess.run([python, __file__, "--data", a.data, "--child", f"{tmp}/{name}"], capture_output=True, text=True)
                lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
                if p.returncode or not lines:
                    raise SystemExit(f"bench_fixed: {name} failed:\n{p.stderr[-3000:]}")
                res = json.loads(lines[0])
                runs[name].append(res)
                print(f"round {r + 1}: {name:<16} outside {res['outside']:.2f}s of {res['seconds']:.2f}s", file=sys.stderr, flush=True)
    print(f"{a.rounds} rounds alternating, {SHARDS} shards of {N // SHARDS} images, medians (min–max)")
    print(f"  {'run':<16} {'outside s':>18} {'seconds':>18} {'build s':>8} {'proto s':>8} {'transforms':>11}")
    for name, rs in runs.items():
        def m(k):
            v = sorted(x[k] for x in rs)
            return v[len(v) // 2], v[0], v[-1]

        o, s, b, pr = m("outside"), m("seconds"), m("build"), m("proto")
        print(f"  {name:<16} {o[0]:6.2f} ({o[1]:.2f}–{o[2]:.2f}) {s[0]:6.2f} ({s[1]:.2f}–{s[2]:.2f}) {b[0]:8.2f} {pr[0]:8.2f} {rs[0]['transforms']:>11}")
    if len(runs) > 1:
        base = sorted(x["outside"] for x in runs["layerbeam"])[a.rounds // 2]
        for name, rs in list(runs.items())[1:]:
            other = sorted(x["outside"] for x in rs)[a.rounds // 2]
            print(f"  layerbeam's outside / {name}'s: {base / other:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
