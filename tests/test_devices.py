"""GPU-ready code paths that need no GPU: placement decisions from a device list, batches
that shrink on out-of-memory, and mixed precision."""

from __future__ import annotations

import numpy as np
import pytest

from layerbeam.transforms.devices import DevicePlan, ExtractorPool, plan_devices
from layerbeam.transforms.readback import to_arrow


def test_cpu_only_gets_one_copy_on_the_cpu():
    assert plan_devices([]) == DevicePlan(("/CPU:0",), gpu=False)


def test_one_model_copy_per_gpu():
    names = ["/physical_device:GPU:0", "/physical_device:GPU:1", "/physical_device:GPU:2"]
    assert plan_devices(names) == DevicePlan(("/GPU:0", "/GPU:1", "/GPU:2"), gpu=True)
    assert plan_devices(names, max_gpus=2).devices == ("/GPU:0", "/GPU:1")


class _FakeOOM(Exception):
    pass


def _doubling_extractor(limit: int, calls: list):
    def run(inputs):
        n = inputs["x"].shape[0]
        calls.append(n)
        if n > limit:
            raise _FakeOOM(f"OOM when allocating tensor for a batch of {n}")
        return {"y": inputs["x"] * 2}

    return run


def test_a_batch_that_runs_out_of_memory_is_split_and_the_size_remembered():
    calls: list[int] = []
    pool = ExtractorPool(lambda d: _doubling_extractor(3, calls), DevicePlan(("/GPU:0",), True), is_oom=lambda e: isinstance(e, _FakeOOM))
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    out = pool({"x": x})
    np.testing.assert_array_equal(out["y"], x * 2)  # every row, in order
    assert pool.max_batch == 2  # 10 → 5 (OOM) → 2: the largest size that worked
    calls.clear()
    out = pool({"x": x})
    np.testing.assert_array_equal(out["y"], x * 2)
    assert calls == [2, 2, 2, 2, 2]  # no more failed attempts once the size is known


def test_other_errors_are_not_swallowed():
    def broken(inputs):
        raise ValueError("not memory")

    pool = ExtractorPool(lambda d: broken, DevicePlan(("/CPU:0",), False), is_oom=lambda e: isinstance(e, _FakeOOM))
    with pytest.raises(ValueError, match="not memory"):
        pool({"x": np.zeros((4, 1), np.float32)})


def test_copies_are_used_round_robin():
    seen = []

    def build(device):
        return lambda inputs: seen.append(device) or {"y": inputs["x"]}

    pool = ExtractorPool(build, plan_devices(["/physical_device:GPU:0", "/physical_device:GPU:1"]))
    for _ in range(4):
        pool({"x": np.zeros((1, 1), np.float32)})
    assert seen == ["/GPU:0", "/GPU:1", "/GPU:0", "/GPU:1"]


def test_mixed_bfloat16_outputs_are_close_to_float32(tmp_path, png_dataset):
    import keras

    from layerbeam.run import run_job
    from layerbeam.config import load_config
    from tests.conftest import base_config

    folder, imgs, _ = png_dataset
    outs = {}
    try:
        for precision in ("float32", "mixed_bfloat16"):
            raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / precision), **{"batching.precision": precision})
            raw["layers"]["select"] = ["block_3_expand_relu", "out_relu"]
            keras.mixed_precision.set_global_policy("float32")
            run_job(load_config(raw=raw))
            assert keras.mixed_precision.global_policy().name == "float32"  # the caller's, restored
            t = to_arrow(str(tmp_path / precision)).sort_by("key")
            outs[precision] = {c: t.column(c).combine_chunks().to_numpy_ndarray() for c in ("block_3_expand_relu", "out_relu")}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for c in ("block_3_expand_relu", "out_relu"):
        a, b = outs["float32"][c], outs["mixed_bfloat16"][c]
        assert b.dtype == np.float32  # stored dtype is the output's, not the compute policy's
        assert not np.array_equal(a, b)  # it really computed in bfloat16
        # bfloat16 keeps ~3 significant digits; errors compound through the network
        np.testing.assert_allclose(b, a, rtol=0.1, atol=0.05 * float(np.abs(a).max()))


def test_a_worker_takes_the_launchers_model_only_under_the_same_dtype_policy():
    import keras
    import tensorflow as tf

    from layerbeam.transforms.models import LauncherModel, launcher_model_offered
    from layerbeam.transforms.models import launcher_model as _launcher_model

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    try:
        keras.mixed_precision.set_global_policy("float32")
        offered = LauncherModel.capture(model, "fp")
        assert offered.device == ("/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0")
        assert _launcher_model("run") is None  # nothing offered
        with launcher_model_offered("run", offered):
            assert _launcher_model("run") is offered
            assert _launcher_model("other run") is None
            keras.mixed_precision.set_global_policy("mixed_bfloat16")  # the worker's precision differs
            assert _launcher_model("run") is None
        keras.mixed_precision.set_global_policy("float32")
        assert _launcher_model("run") is None  # withdrawn when the run ends
        offered.release()
        with launcher_model_offered("run", offered):
            assert _launcher_model("run") is None  # a released model is not offered
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_prepare_builds_under_the_workers_precision_and_restores_the_callers(tmp_path, png_dataset):
    import keras

    from layerbeam.plan import prepare
    from layerbeam.config import load_config
    from tests.conftest import base_config

    folder, _, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"batching.precision": "mixed_bfloat16"})
    keras.mixed_precision.set_global_policy("float32")
    plan = prepare(load_config(raw=raw))
    assert plan.launcher_model.policy == "mixed_bfloat16"  # what an in-process worker will compare
    assert keras.mixed_precision.global_policy().name == "float32"  # the caller's, untouched


def test_batches_are_sized_by_output_bytes_when_outputs_are_big():
    from layerbeam.transforms.shard import effective_batch_size

    assert effective_batch_size(32, 256 << 20, 5_000) == 32  # pooled outputs: the configured size
    assert effective_batch_size(32, 256 << 20, 25 << 20) == 10  # 25 MB per example: 10 fit in 256 MB
    assert effective_batch_size(32, 1 << 20, 25 << 20) == 1  # never zero


def test_an_in_process_worker_takes_the_launchers_trace_of_its_own_job_only(tmp_path, png_dataset, monkeypatch):
    """The launcher traced the model for the job's selection; the worker in its process
    reuses that trace (no second trace on the way to the first batch), and a worker of
    another job (another selection) traces its own."""
    import dataclasses

    import layerbeam.transforms.shard as shard
    from layerbeam.config import load_config
    from layerbeam.transforms.models import launcher_model_offered
    from layerbeam.plan import prepare
    from tests.conftest import base_config

    folder, _, _ = png_dataset
    plan = prepare(load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"))))
    traced = []
    real = shard.trace_and_select
    monkeypatch.setattr(shard, "trace_and_select", lambda *a: traced.append(a) or real(*a))
    with launcher_model_offered(plan.run_id, plan.launcher_model):
        worker = shard.ShardProcessor(plan.spec, plan.run_id)
        assert worker.reused_launcher_model and traced == []
        assert worker.specs == plan.outputs
        other = dataclasses.replace(plan.spec, layers=dataclasses.replace(plan.spec.layers, reduce="max"))
        worker = shard.ShardProcessor(other, plan.run_id)
        assert len(traced) == 1
        assert {s.reduce for s in worker.specs} == {"max"}
