"""One multi-output Keras model with dict outputs (reductions and casts inside the graph),
and the compiled extractor that runs it. Plain Keras and TensorFlow, no Beam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .layers import ModelGraph, OutputSpec, _reduced

__all__ = ["extractor_model", "Extractor", "model_inputs"]


def extractor_model(graph: ModelGraph, specs: Sequence[OutputSpec]):
    """One Keras model: the graph's inputs → {spec.name: reduced, cast tensor}."""
    import keras

    by_path = {t.path: t for t in graph.traced}
    outputs = {s.name: _reduced(by_path[s.path].tensor, s.reduce, s.dtype) for s in specs}
    return keras.Model(graph.inputs, outputs, name="layerbeam_extractor")


class Extractor:
    """Runs an extractor model as one compiled `tf.function` with a fixed input signature.

    Args:
        model: the model `ModelGraph.build` returned.
        jit_compile: compile with XLA (worth trying on GPUs).
    """

    def __init__(self, model, jit_compile: bool = False):
        import tensorflow as tf

        self.model = model
        self.input_names = [str(t.name) for t in model.inputs]
        signature = [
            {n: tf.TensorSpec((None, *t.shape[1:]), tf.as_dtype(t.dtype or "float32"), name=n) for n, t in zip(self.input_names, model.inputs)}
        ]

        def run(inputs):
            args = [inputs[n] for n in self.input_names]
            return model(args if len(args) > 1 else args[0], training=False)

        self._fn = tf.function(run, input_signature=signature, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = self._fn({n: inputs[n] for n in self.input_names})
        return {k: v.numpy() for k, v in out.items()}


def model_inputs(value: Any, input_shapes: Mapping[str, Sequence[int]], batched: bool, what: str = "inputs") -> dict[str, np.ndarray]:
    """Arrays a user gave → {model input name: float32 array}, checked against the model.

    Args:
        value: an array (single-input models) or a mapping {input name: array}.
        input_shapes: the model's input shapes without the batch axis (`ModelGraph.input_shapes`).
        batched: `value` has a leading batch axis.
        what: how the message names `value` (e.g. `element 'k3'`).

    Raises:
        ValueError: a missing or unknown input, a non-numeric array, or a shape that is
            not the model's; the one-line message names the value and the fix.
    """
    names = list(input_shapes)
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        extra = [str(k) for k in value if k not in input_shapes]
        if missing or extra:
            raise ValueError(
                f"{what} has keys {sorted(map(str, value))}, but the model's inputs are {names}; "
                "give one array per model input, keyed by its name"
            )
        items = {n: value[n] for n in names}
    elif len(names) == 1:
        items = {names[0]: value}
    else:
        raise ValueError(f"{what} is a {type(value).__name__}, but the model has {len(names)} inputs {names}; give a dict {{input name: array}}")
    out = {}
    for n, v in items.items():
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{what}: input {n!r} has dtype {a.dtype}, not numbers; give a numeric array")
        want = tuple(int(d) for d in input_shapes[n])
        got = a.shape[1:] if batched else a.shape
        if (batched and a.ndim == 0) or tuple(got) != want:
            shown = f"batches of shape {a.shape}" if batched else f"shape {a.shape}"
            need = f"(N, {', '.join(map(str, want))})" if batched else str(want)
            raise ValueError(f"{what}: input {n!r} has {shown}, but the model takes {need}; resize or reshape it to fit")
        out[n] = a.astype(np.float32, copy=False)
    return out
