"""Where the extractor runs: GPU discovery, one model copy per GPU, precision, and batches
that shrink when device memory says no.

The decisions are plain functions of the visible device list (`plan_devices`), so they
are tested on machines without GPUs by passing a list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DevicePlan", "plan_devices", "discover_gpus", "precision", "ExtractorPool"]

_LOG = logging.getLogger("layerbeam")


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """Which devices get a model copy in this worker process.

    Attributes:
        devices: TensorFlow device names, one model copy each (`/GPU:0`, `/GPU:1`, or `/CPU:0`).
        gpu: whether these are GPUs.
    """

    devices: tuple[str, ...]
    gpu: bool


def plan_devices(gpu_names: Sequence[str], max_gpus: int | None = None) -> DevicePlan:
    """One model copy per visible GPU (up to `max_gpus`), else one on the CPU.

    Args:
        gpu_names: physical GPU names as TensorFlow lists them
            (`/physical_device:GPU:0` …), e.g. from `discover_gpus()`.
        max_gpus: use at most this many (None: all).
    """
    ids = []
    for name in gpu_names:
        tail = name.rsplit(":", 1)[-1]
        ids.append(int(tail) if tail.isdigit() else len(ids))
    if max_gpus is not None:
        ids = ids[:max_gpus]
    if not ids:
        return DevicePlan(("/CPU:0",), gpu=False)
    return DevicePlan(tuple(f"/GPU:{i}" for i in ids), gpu=True)


def discover_gpus() -> list[str]:
    """Visible GPUs, with memory growth turned on (so one process does not take all memory)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except RuntimeError:  # the device was initialized already; growth must come first
            pass
    return [g.name for g in gpus]


@contextlib.contextmanager
def precision(policy: str):
    """Build models under Keras's dtype policy `policy`, then restore the caller's.

    `float32` (default), `mixed_float16` (GPUs with tensor cores) or `mixed_bfloat16`
    (TPUs, recent CPUs and GPUs). Layer outputs are computed in the lower precision; the
    stored dtype is still each output's `dtype`. Each layer keeps the policy it was built
    under, so the caller's may come back once the models exist (an in-process worker can
    run on the caller's thread).
    """
    import keras

    callers = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(callers)


def _is_oom(e: BaseException) -> bool:
    import tensorflow as tf

    return isinstance(e, tf.errors.ResourceExhaustedError) or "out of memory" in str(e).lower()


class ExtractorPool:
    """Extractor copies, one per planned device, shared by the DoFn's threads.

    Calls go round-robin over the copies. A batch that runs out of device memory is split
    in halves (recursively) and the largest size that worked is remembered, so a batch
    size set too high costs a slower first batch, not a failed job.

    Args:
        build: device name → callable(inputs dict) → outputs dict (an `Extractor` built
            under `tf.device(device)`).
        plan: the devices.
    """

    def __init__(self, build: Callable[[str], Callable], plan: DevicePlan, is_oom: Callable[[BaseException], bool] = _is_oom):
        self.plan = plan
        self._copies = [build(d) for d in plan.devices]
        self._next = itertools.cycle(range(len(self._copies)))
        self._lock = threading.Lock()
        self._is_oom = is_oom
        self.max_batch: int | None = None

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        with self._lock:
            fn = self._copies[next(self._next)]
        return self._run(fn, inputs)

    def _run(self, fn, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = int(next(iter(inputs.values())).shape[0])
        if self.max_batch is not None and n > self.max_batch:
            return self._split(fn, inputs, n, self.max_batch)
        try:
            return fn(inputs)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
            if not self._is_oom(e) or n <= 1:
                raise
            half = max(1, n // 2)
            _LOG.warning("batch of %d ran out of device memory; splitting into batches of %d", n, half)
            with self._lock:
                self.max_batch = half if self.max_batch is None else min(self.max_batch, half)
            return self._split(fn, inputs, n, half)

    def _split(self, fn, inputs, n: int, size: int) -> dict[str, np.ndarray]:
        parts = [self._run(fn, {k: v[i : i + size] for k, v in inputs.items()}) for i in range(0, n, size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
