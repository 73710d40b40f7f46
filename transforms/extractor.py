"""One multi-output Keras model with dict outputs (reductions and casts inside the graph),
and the compiled extractor that runs it. Plain Keras and TensorFlow, no Beam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .layers import ModelGraph, OutputSpec, _reduced

__all__ = ["extractor_model", "Extractor"]


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
