"""A Beam `ModelHandler` for layer outputs, for `RunInference` (what `ExtractLayers` uses).

The handler holds only the model's source and the selection (small, picklable specs);
`load_model()` builds the extractor on the worker, once per process through
RunInference's `Shared` machinery. An example is a dict {model input name: float32
array} of the model's input shape (`extractor.model_inputs` makes one); its inference is
a dict {output name: array}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from .errors import ModelError, first_line
from .extractor import Extractor, extractor_model
from .layers import ModelGraph, SelectSpec
from .models import ModelSpec, launcher_model, load_model, model_fingerprint

__all__ = ["LayerModelHandler"]

class LayerModelHandler(ModelHandler[Mapping[str, np.ndarray], PredictionResult, Extractor]):
    """Runs a Keras model's selected layer outputs for RunInference.

    Args:
        model: where the worker loads the model from (never a loaded model: it is not
            pickled into the pipeline).
        layers: the selection, as `layers.select` takes it.
        input_shapes: shapes (without the batch axis) to trace the model at, one per
            input; None for the model's own.
        batch_size: the largest batch `BatchElements` forms (RunInference batches
            elements before `run_inference`).
        fingerprint: the weights the launcher saw (`models.model_fingerprint`); a worker
            that loads other weights refuses to run (a random-weights model must be
            seeded the same everywhere).
        jit_compile: compile the extractor with XLA.
        min_batch_size: the smallest batch `BatchElements` forms; default `batch_size`
            (fixed batches). Left to grow from 1, BatchElements kept MobileNetV2's batches
            at 1–12 on CPU (the per-batch overhead is small next to the model's compute,
            so it sees no reason to grow them), which computes slower than batches of 32.
        max_batch_duration_secs: passed to `BatchElements` (streaming: flush a batch
            that waits longer).
        launcher_key: the key under which the launcher offered the model it loaded
            (`models.offer_launcher_model`); a worker in the launcher's process takes that copy.
    """

    def __init__(
        self,
        model: ModelSpec,
        layers: SelectSpec,
        input_shapes: Sequence[Sequence[int]] | None = None,
        batch_size: int = 32,
        fingerprint: str | None = None,
        jit_compile: bool = False,
        min_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        launcher_key: str | None = None,
    ):
        lo = batch_size if min_batch_size is None else min(min_batch_size, batch_size)
        super().__init__(min_batch_size=lo, max_batch_size=batch_size, max_batch_duration_secs=max_batch_duration_secs)
        self._model = model
        self._layers = layers
        self._input_shapes = None if input_shapes is None else [tuple(s) for s in input_shapes]
        self._fingerprint = fingerprint
        self._jit_compile = jit_compile
        self._launcher_key = launcher_key

    def load_model(self) -> Extractor:
        # In the launcher's process the model it loaded and traced for its checks is the
        # one to use (its fingerprint is the one checked against): loading and tracing it
        # again cost the RunInference path about a second, and named the copy's inputs
        # `input_layer_1`.
        offered = launcher_model(self._launcher_key)
        if offered is not None:
            graph, specs = offered.traced
            return Extractor(extractor_model(graph, specs), jit_compile=self._jit_compile)
        model = load_model(self._model)
        if self._fingerprint is not None:
            fp = model_fingerprint(model)
            if fp != self._fingerprint:
                raise ModelError(
                    f"the model loaded from {self._model.source!r} on this worker has other weights than the launcher's "
                    f"({fp[:12]} vs {self._fingerprint[:12]}); save the model to a file or seed its random weights"
                )
        graph = ModelGraph(model, input_shapes=self._input_shapes)
        s = self._layers
        specs = graph.select(list(s.select), exclude=s.exclude, reduce=s.reduce, dtype=s.dtype, include_inputs=s.include_inputs)
        return Extractor(extractor_model(graph, specs), jit_compile=self._jit_compile)

    def run_inference(
        self,
        batch: Sequence[Mapping[str, np.ndarray]],
        model: Extractor,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        given = list(batch[0])  # the launcher's input names, in the model's input order
        if set(given) != set(model.input_names):
            # This worker's copy was built with other auto-generated names (a model built
            # twice in one process gets `input_layer_1`); its inputs come in the same order.
            given = given[: len(model.input_names)]
        inputs = {n: np.stack([ex[k] for ex in batch]) for n, k in zip(model.input_names, given)}
        try:
            out = model(inputs)
        except Exception as e:  # TensorFlow's OpErrors bury the cause under a node trace
            raise RuntimeError(f"the model failed on a batch of {len(batch)}: {_cause(e)}") from e
        # One copy per example: a view would keep the whole batch's array alive downstream.
        return [PredictionResult(ex, {k: v[i].copy() for k, v in out.items()}) for i, ex in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[Mapping[str, np.ndarray]]) -> int:
        return int(sum(a.nbytes for ex in batch for a in ex.values()))

    def get_metrics_namespace(self) -> str:
        return "layerbeam"

    def __repr__(self) -> str:
        return f"LayerModelHandler({self._model.source!r}, select={list(self._layers.select)!r})"


def _cause(e: BaseException) -> str:
    """The line of an error that says what went wrong: for a TensorFlow graph execution
    error, the line after the node's stack, not "Graph execution error:" or `[[node …]]`."""
    lines = [ln for ln in str(getattr(e, "message", None) or e).splitlines() if ln.strip()]
    said = [
        ln.strip() for ln in lines
        if not ln.startswith((" ", "\t")) and not ln.startswith(("Graph execution error", "Detected at node"))
    ]
    return (said[-1] if said else first_line(e))[:300]
