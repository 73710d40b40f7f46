"""Images per second of the Keras forward pass alone on a GPU, outputs copied to host NumPy:
the rate a GPU worker's CPUs would have to decode at (docs/scale.md, "Feeding a GPU").

Models are the ones `scripts/bench.py` builds (imported from it, so they are the same
construction and the same seed, `keras.utils.set_random_seed(0)`, weights=None):

* `a`      — MobileNetV2 224, sub-model with block_1/3/6_expand_relu and out_relu, each
             mean-pooled by GlobalAveragePooling2D (bench.py scenario a, `_plain_model("a")`);
* `c`      — ResNet50 224, every layer but the input mean-pooled (scenario c, 176 outputs);
* `a_full`, `c_full` — the plain full models (with their classifier), for reference.

What is timed: one batch of random float32 input in the model's preprocessed range, already
on the device, run again and again; each call's outputs are copied to host NumPy before the
next call starts (`img/s`), which is what layerbeam does with every batch. Two warm-up calls
(the first one compiles under jax) are excluded; each rate is timed over at least `--seconds`
and 3 calls. `dev img/s` (at `--device-only` batch sizes) is the forward alone: the same
number of calls queued back to back, one device synchronisation at the end, nothing copied.
No decoding, no host-to-device copy of the input, no writing.

Backends, each in a subprocess of its own, one after the other (never two on the GPU at once):

* `torch` — `model(x, training=False)` under `torch.no_grad()` (eager, as Keras' own
  `predict_on_batch` runs it); outputs to host with `keras.ops.convert_to_numpy`, one per output;
* `jax`   — `jax.jit` of `model.stateless_call(...)` (what Keras' predict path jit-compiles);
  outputs to host with one `jax.device_get` of the dict.

Precisions: `float32` (Keras' default policy) and Keras mixed precision (`mixed_bfloat16`,
`mixed_float16`: float32 weights, compute and outputs in the 16-bit type).

Correctness: on the first float32 batch of `a` and `c` (batch = the smallest measured), the
GPU outputs and weights are saved; at the end another subprocess builds the same model on
the CPU (torch: KERAS_TORCH_DEVICE=cpu; jax: JAX_PLATFORMS=cpu), loads those weights, runs
the same batch eagerly and prints the worst max |diff| / max |value| over the outputs.

A hard time budget (`--budget`, seconds, the whole run) decides what is measured: work runs
in priority order (float32 and mixed_bfloat16 sub-models first, then the full models, then
mixed_float16) and whatever would not fit is printed as skipped; each backend's subprocess
is killed at its deadline, keeping what it had measured (one JSON line per result).
Results go to stdout (a table at the end) and, with `--out`, to a JSON file.

    KERAS_BACKEND is set per subprocess; Keras 3 and torch and/or jax must be importable:
    python scripts/bench_gpu_model.py --budget 350 --out results.json          # GPU machine
    python scripts/bench_gpu_model.py --backends jax --models c,c_full --batches 32,256 \\
        --mnv2-extra "" --budget 150 --check-reserve 50                        # what 350 s left out
    python scripts/bench_gpu_model.py --backends torch --batches 2 --seconds 0.2 \\
        --models a,c --precisions float32 --budget 120                         # CPU smoke test

On an H200 (2026-11-28, docs/bench-2026-11-28.md) the first command measured every torch
rate and, under jax, (a) at every size, (c) to batch 256 (mixed_bfloat16 to 128) and the
full MobileNetV2 in 355 s (jax spent 2-18 s compiling each batch size and ~9 s building each
model); the second measured the rest of (c) under jax and the full ResNet50.

It needs no TensorFlow (bench.py imports none at module level): it was written to run on a
GPU machine where TensorFlow could not be installed. Rates from Keras on torch or jax are
not those of layerbeam's TensorFlow backend; they say what order of rate one GPU reaches
with the same Keras model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent / "scripts"):
    if (_p / "bench.py").exists():
        sys.path.insert(0, str(_p))
        break

MODELS = {
    "a": "MobileNetV2 224, 4 mean-pooled outputs (bench.py scenario a)",
    "c": "ResNet50 224, all layers mean-pooled (bench.py scenario c)",
    "a_full": "MobileNetV2 224, full model",
    "c_full": "ResNet50 224, full model",
}
POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def _plan(a) -> list[dict]:
    """Steps in priority order; each step builds one model under one precision."""
    models = a.models.split(",")
    precisions = a.precisions.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    big = [int(b) for b in a.mnv2_extra.split(",") if b]
    full_batches = [int(b) for b in a.full_batches.split(",")]
    steps = []

    def add(model, precision, bs):
        if model in models and precision in precisions:
            steps.append({"model": model, "precision": precision, "batches": bs})

    for precision in ("float32", "bf16"):
        add("a", precision, batches + big)
        add("c", precision, batches)
    for precision in ("float32", "bf16"):
        add("a_full", precision, full_batches)
        add("c_full", precision, full_batches)
    add("a", "fp16", full_batches)
    add("c", "fp16", full_batches)
    return steps


# --------------------------------------------------------------------------- child: one backend


def _build(model: str):
    import bench

    scenario = model[0]
    return bench._plain_model_base(scenario) if model.endswith("_full") else bench._plain_model(scenario)


def _input(model: str, batch: int):
    """Random float32 in the preprocessed range: MobileNetV2 [-1, 1]; ResNet50 caffe-style
    (BGR, ImageNet means subtracted, no scaling)."""
    import numpy as np

    rng = np.random.default_rng(1)
    if model.startswith("a"):
        return rng.uniform(-1.0, 1.0, (batch, 224, 224, 3)).astype("float32")
    return (rng.uniform(0.0, 255.0, (batch, 224, 224, 3)) - np.array([103.939, 116.779, 123.68])).astype("float32")


def _forward(model, backend: str):
    """(run(x) -> outputs on device, to_host(outputs) -> dict of NumPy, sync(outputs))."""
    import keras

    if backend == "torch":
        import torch

        def run(x):
            with torch.no_grad():
                return model(x, training=False)

        def to_host(y):
            return {k: keras.ops.convert_to_numpy(v) for k, v in _as_dict(model, y).items()}

        def sync(y):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        return run, to_host, sync
    if backend == "jax":
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def fwd(tv, ntv, x):
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            return y

        return (lambda x: fwd(tv, ntv, x)), (lambda y: jax.device_get(_as_dict(model, y))), jax.block_until_ready

    def run(x):  # any other backend (a local smoke test): Keras' own predict step
        return model.predict_on_batch(x)

    return run, (lambda y: _as_dict(model, y)), (lambda y: None)


def _as_dict(model, y) -> dict:
    if isinstance(y, dict):
        return y
    return {model.output_names[0] if hasattr(model, "output_names") else "output": y}


def _to_device(x, backend: str):
    if backend == "jax":
        import jax

        return jax.device_put(x)
    if backend == "torch":
        import torch

        return torch.from_numpy(x).to("cuda" if torch.cuda.is_available() else "cpu")
    return x


def _time_loop(run, post, x, seconds: float, min_iters: int = 3) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while True:
        post(run(x))
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds and n >= min_iters:
            return n, el


def _child(a) -> int:
    import numpy as np
    import keras

    backend = keras.backend.backend()
    out = open(a.jsonl, "a", buffering=1)

    def emit(rec):
        rec = {"backend": backend, **rec}
        out.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def left():
        return a.deadline - time.time()

    info = {"event": "start", "keras": keras.__version__}
    try:
        _describe(info, backend)
    except Exception as e:  # noqa: BLE001
        info["describe_error"] = f"{type(e).__name__}: {e}"
    emit(info)


    # seconds one compile/build and one warm-up are assumed to take, to decide what still fits
    heavy = {"a": 6, "c": 20, "a_full": 6, "c_full": 15} if backend == "jax" else {"a": 2, "c": 5, "a_full": 2, "c_full": 4}
    check_batch = min(int(b) for b in a.batches.split(","))
    for step in json.loads(a.plan):
        m, prec = step["model"], step["precision"]
        if left() < heavy[m] + a.seconds + 2:
            emit({"event": "skipped", "model": m, "precision": prec, "why": f"time ({left():.0f}s left)"})
            continue
        model = run = None
        try:
            keras.mixed_precision.set_global_policy(POLICIES[prec])
            keras.backend.clear_session()
            t = time.perf_counter()
            model = _build(m)
            build_s = time.perf_counter() - t
            run, to_host, sync = _forward(model, backend)
            for b in step["batches"]:
                if left() < heavy[m] + a.seconds + 1:
                    emit({"event": "skipped", "model": m, "precision": prec, "batch": b, "why": f"time ({left():.0f}s left)"})
                    continue
                try:
                    xh = _input(m, b)
                    x = _to_device(xh, backend)
                    t = time.perf_counter()
                    for _ in range(2):
                        y = to_host(run(x))
                    warm_s = time.perf_counter() - t
                    n, el = _time_loop(run, to_host, x, a.seconds)
                    rec = {"event": "rate", "model": m, "precision": prec, "policy": POLICIES[prec], "batch": b,
                           "img_s": n * b / el, "ms_per_batch": 1000 * el / n, "iters": n, "seconds": el,
                           "warmup_s": warm_s, "build_s": build_s, "outputs": len(y),
                           "out_dtype": str(next(iter(y.values())).dtype)}
                    if b in a.device_only_list and not m.endswith("_full") and left() > a.seconds + 2:
                        k = max(3, int(a.seconds / (el / n)) + 1)
                        yy = run(x)
                        sync(yy)
                        t = time.perf_counter()
                        for _ in range(k):
                            yy = run(x)
                        sync(yy)
                        dt = time.perf_counter() - t
                        rec.update(dev_img_s=k * b / dt, dev_iters=k, dev_seconds=dt)
                        del yy
                    emit(rec)
                    if prec == "float32" and m in ("a", "c") and b == check_batch and a.check_dir:
                        _save_check(a.check_dir, backend, m, model, xh, y)
                    del x, y
                except Exception as e:  # noqa: BLE001 - a failed size must not stop the others
                    emit({"event": "error", "model": m, "precision": prec, "batch": b, "error": f"{type(e).__name__}: {e}"[:500]})
                    gc.collect()
        except Exception as e:  # noqa: BLE001
            emit({"event": "error", "model": m, "precision": prec, "error": f"{type(e).__name__}: {e}"[:500]})
        finally:
            del model, run
            gc.collect()
            _free(backend)
    emit({"event": "done"})
    return 0


def _describe(info: dict, backend: str) -> None:
    if backend == "torch":
        import torch

        cuda = torch.cuda.is_available()
        info.update(torch=torch.__version__, cuda=cuda, device=torch.cuda.get_device_name(0) if cuda else "cpu",
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    elif backend == "jax":
        import jax

        info.update(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                    default_matmul_precision=str(jax.config.jax_default_matmul_precision))


def _free(backend: str):
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif backend == "jax":
            import jax

            jax.clear_caches()
    except Exception:  # noqa: BLE001
        pass


def _save_check(folder: str, backend: str, m: str, model, x, y):
    import numpy as np

    arrays = {"x": x}
    for i, w in enumerate(model.get_weights()):
        arrays[f"w{i:04d}"] = w
    for k, v in y.items():
        arrays[f"out:{k}"] = np.asarray(v, dtype="float32")
    np.savez(os.path.join(folder, f"check-{backend}-{m}.npz"), **arrays)


def _cpu_check(a) -> int:
    """Same model on the CPU, with the GPU run's weights, on the GPU run's batch."""
    import numpy as np
    import keras

    backend = keras.backend.backend()
    keras.mixed_precision.set_global_policy("float32")
    for m in ("a", "c"):
        path = os.path.join(a.check_dir, f"check-{backend}-{m}.npz")
        if not os.path.exists(path):
            continue
        try:
            t = time.perf_counter()
            data = np.load(path)
            model = _build(m)
            model.set_weights([data[k] for k in sorted(k for k in data.files if k.startswith("w"))])
            if backend == "torch":
                import torch

                with torch.no_grad():
                    y = model(data["x"], training=False)
            else:
                y = model(data["x"], training=False)
            y = {k: keras.ops.convert_to_numpy(v) for k, v in _as_dict(model, y).items()}
            worst, worst_name, biggest = -1.0, None, 0.0
            for k, v in y.items():
                g = data[f"out:{k}"]
                rel = float(np.max(np.abs(g - v)) / max(float(np.max(np.abs(v))), 1e-30))
                biggest = max(biggest, float(np.max(np.abs(v))))
                if rel > worst:  # the first output even when every diff is 0
                    worst, worst_name = rel, k
            rec = {"backend": backend, "event": "check", "model": m, "batch": int(data["x"].shape[0]),
                   "outputs": len(y), "worst_rel_diff": worst, "worst_output": worst_name, "max_abs_value": biggest,
                   "seconds": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001
            rec = {"backend": backend, "event": "check", "model": m, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(rec), flush=True)
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


# --------------------------------------------------------------------------- parent


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({type(e).__name__}: {e})"


def _spawn(a, args: list[str], env: dict, deadline: float) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--jsonl", a.jsonl, "--deadline", str(deadline),
           "--check-dir", a.check_dir, "--seconds", str(a.seconds), "--batches", a.batches,
           "--device-only", a.device_only]
    try:
        subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, timeout=max(1.0, deadline - time.time() + 5))
    except subprocess.TimeoutExpired:
        print(f"# {args} killed at its deadline", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"# {args} failed: {type(e).__name__}: {e}", flush=True)


def _table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("event") == "rate"]
    lines = ["| backend | model | precision | batch | img/s (outputs to host) | ms/batch | dev img/s (forward only) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = f"{r['dev_img_s']:.0f}" if "dev_img_s" in r else ""
        lines.append(f"| {r['backend']} | {r['model']} | {r['policy']} | {r['batch']} | {r['img_s']:.0f} | {r['ms_per_batch']:.1f} | {dev} |")
    for r in records:
        if r.get("event") == "check":
            if "error" in r:
                lines.append(f"check {r['backend']} {r['model']}: ERROR {r['error']}")
            else:
                lines.append(f"check {r['backend']} {r['model']}: GPU vs CPU float32, batch {r['batch']}, {r['outputs']} outputs,"
                             f" worst max |diff| / max |value| = {r['worst_rel_diff']:.1e} ({r['worst_output']})")
        elif r.get("event") in ("error", "skipped"):
            lines.append(f"{r['event']} {r['backend']} {r.get('model')} {r.get('precision')} {r.get('batch', '')}: {r.get('error') or r.get('why')}")
    return "\n".join(lines)


def _parent(a) -> int:
    t0 = time.time()
    end = t0 + a.budget
    os.makedirs(a.check_dir, exist_ok=True)
    if os.path.exists(a.jsonl):
        os.remove(a.jsonl)
    env_info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": _sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"]),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
        if os.path.exists("/proc/cpuinfo") else None,
        "python": platform.python_version(),
        "argv": sys.argv[1:],
    }
    print("# " + json.dumps(env_info), flush=True)
    plan = _plan(a)
    backends = a.backends.split(",")
    check_reserve = a.check_reserve if a.check else 0
    for i, backend in enumerate(backends):
        remaining = end - check_reserve - time.time()
        # the first backend gets its share; the last gets all that is left
        share = remaining if i == len(backends) - 1 else remaining * a.first_share
        print(f"# backend {backend}: {share:.0f}s", flush=True)
        _spawn(a, ["--child", "--plan", json.dumps(plan)], {"KERAS_BACKEND": backend}, time.time() + share)
    if a.check:
        for backend in backends:
            if end - time.time() < 8:
                print(f"# check {backend} skipped: no time left", flush=True)
                continue
            env = {"KERAS_BACKEND": backend}
            env.update({"KERAS_TORCH_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""} if backend == "torch" else {"JAX_PLATFORMS": "cpu"})
            share = (end - time.time()) / (2 if backend == backends[0] and len(backends) > 1 else 1)
            _spawn(a, ["--cpu-check"], env, time.time() + share)
    records = [json.loads(l) for l in open(a.jsonl)] if os.path.exists(a.jsonl) else []
    table = _table(records)
    print("\n" + table, flush=True)
    print(f"\n# total {time.time() - t0:.0f}s", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env_info, "plan": plan, "records": records, "table": table, "total_s": time.time() - t0}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--models", default="a,c,a_full,c_full")
    p.add_argument("--precisions", default="float32,bf16,fp16", help="of float32, bf16 (mixed_bfloat16), fp16 (mixed_float16)")
    p.add_argument("--batches", default="32,128,256")
    p.add_argument("--mnv2-extra", default="512", help="extra batch sizes for model a")
    p.add_argument("--full-batches", default="256", help="batch sizes of the full models and of mixed_float16")
    p.add_argument("--device-only", default="256", help="batch sizes also timed without copies to host")
    p.add_argument("--seconds", type=float, default=2.0, help="least time each rate is timed over")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run, checks included")
    p.add_argument("--first-share", type=float, default=0.38, help="share of the time the first backend gets")
    p.add_argument("--check-reserve", type=float, default=45.0, help="seconds kept for the CPU checks")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--out", help="JSON file for env, plan and results")
    p.add_argument("--check-dir", default="/tmp/bench_gpu_model")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--plan", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-check", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.jsonl = a.jsonl or os.path.join(a.check_dir, "results.jsonl")
    a.device_only_list = [int(b) for b in a.device_only.split(",") if b]
    if a.child:
        return _child(a)
    if a.cpu_check:
        return _cpu_check(a)
    return _parent(a)


if __name__ == "__main__":
    sys.exit(main())
