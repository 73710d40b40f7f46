"""Choose layer outputs of a Keras model and build one multi-output extractor from them.

Plain Keras, no Beam: `load_model` → `ModelGraph` (every tappable tensor, by path) →
`ModelGraph.select` (selectors → `OutputSpec`s) → `ModelGraph.build` (one Keras model with
dict outputs, reductions and casts inside the graph) → `Extractor` (a compiled
`tf.function` returning numpy arrays). The Beam DoFn in `transforms.beam` only wraps this.

Example:
    >>> graph = ModelGraph(load_model(ModelConfig(source="keras.applications.MobileNetV2",
    ...                                           input_shape=(96, 96, 3))))
    >>> specs = graph.select(["block_1_expand_relu", {"layer": "out_relu", "reduce": "none"}])
    >>> extractor = Extractor(graph.build(specs))
    >>> rows = extractor({"input_layer": images})   # {"block_1_expand_relu": (B, 96), ...}
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import importlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from transforms._keras_graph import SubclassedModelError, TracedTensor, trace_model
from transforms.errors import ModelError, SelectionError

__all__ = [
    "ModelError",
    "SelectionError",
    "OutputSpec",
    "ModelGraph",
    "Extractor",
    "load_model",
    "model_fingerprint",
    "preprocess_fn",
    "configure_devices",
]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 4}  # bfloat16 is stored as float32


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """One output column: which tensor, how it is reduced and stored.

    Attributes:
        name: the output (column) name.
        path: the traced path of the source tensor (`outer/inner/layer#call:output`).
        layer_type: the Keras class of the layer that computes it.
        reduce: none | mean | max | flatten (mean/max are over the spatial axes).
        dtype: float32 | float16 | bfloat16 (float32 values rounded to bfloat16, stored
            as float32), the stored dtype.
        shape: the stored shape per example, after reduction.
        params: the layer's parameter count.
    """

    name: str
    path: str
    layer_type: str
    reduce: str
    dtype: str
    shape: tuple[int, ...]
    params: int = 0

    @property
    def bytes_per_example(self) -> int:
        return int(math.prod(self.shape)) * _DTYPE_BYTES[self.dtype]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["bytes_per_example"] = self.bytes_per_example
        return d


# --------------------------------------------------------------------------- loading


def load_model(cfg) -> Any:
    """Load the model a `ModelConfig` names.

    Sources: `keras.applications.<Name>` (weights null → random, seeded by `cfg.seed`, so
    every worker builds the same weights), a `.keras` file (safe mode unless
    `cfg.safe_mode` is false), a legacy `.h5` file, or `module:function`.

    Raises:
        ModelError: with the source, the cause and the fix.
    """
    import keras

    src = cfg.source
    keras.utils.set_random_seed(cfg.seed)
    if src.startswith("keras.applications."):
        name = src.split(".", 2)[2]
        fn = getattr(keras.applications, name, None)
        if fn is None or not callable(fn):
            known = [n for n in dir(keras.applications) if n[:1].isupper()]
            close = difflib.get_close_matches(name, known, n=3)
            raise ModelError(
                f"model.source {src!r}: keras.applications has no {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}")
            )
        kwargs = dict(cfg.kwargs)
        kwargs.setdefault("weights", cfg.weights)
        if cfg.input_shape is not None:
            kwargs.setdefault("input_shape", tuple(cfg.input_shape))
        try:
            return fn(**kwargs)
        except (ValueError, TypeError) as e:
            raise ModelError(f"model.source {src!r} with {kwargs}: {_first_line(e)}") from None
    if ":" in src and not src.endswith((".keras", ".h5", ".hdf5")) and "://" not in src:
        module_name, _, fn_name = src.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelError(
                f"model.source {src!r}: cannot import {fn_name!r} from {module_name!r} ({_first_line(e)}); "
                "make the module importable (pip install it or add it to PYTHONPATH)"
            ) from None
        model = fn(**cfg.kwargs)
        if not isinstance(model, keras.Model):
            raise ModelError(f"model.source {src!r} returned {type(model).__name__}, not a keras.Model; return the model from the factory")
        return model
    if src.endswith((".keras", ".h5", ".hdf5")):
        local = _local_copy(src)
        try:
            if src.endswith(".keras"):
                return keras.saving.load_model(local, compile=False, safe_mode=cfg.safe_mode)
            return keras.saving.load_model(local, compile=False, safe_mode=cfg.safe_mode)
        except FileNotFoundError:
            raise ModelError(f"model.source {src!r} does not exist; give the path of a saved model file") from None
        except Exception as e:  # Keras raises several types for unsafe or corrupt files
            msg = _first_line(e)
            if "safe_mode" in msg or "Lambda" in msg or "lambda" in msg:
                raise ModelError(
                    f"model.source {src!r} contains a Lambda layer with Python code, which safe mode refuses; "
                    "if you trust this file set model.safe_mode=false (or pass --unsafe-model)"
                ) from None
            raise ModelError(f"model.source {src!r} is not a loadable Keras model: {msg}") from None
    raise ModelError(
        f"model.source {src!r} is not a model source; use a .keras/.h5 file, "
        "'keras.applications.<Name>' or 'module:function'"
    )


def _local_copy(src: str) -> str:
    if "://" not in src:
        return src
    import os
    import tempfile

    import fsspec

    local = os.path.join(tempfile.mkdtemp(prefix="layerbeam-model-"), os.path.basename(src))
    fsspec.open(src).fs.get(src, local)
    return local


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def model_fingerprint(model) -> str:
    """A sha256 over the model's architecture and weights (what 'built from what' means)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    for w in model.weights:
        h.update(w.path.encode() if hasattr(w, "path") else w.name.encode())
        a = np.ascontiguousarray(np.asarray(w))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- preprocessing


def preprocess_fn(name: str, model_source: str):
    """The image preprocessing, as a function of float32 tensors 0..255 (run inside tf.data)."""
    import keras

    if name == "auto":
        if model_source.startswith("keras.applications."):
            fn = getattr(keras.applications, model_source.split(".", 2)[2])
            mod = importlib.import_module(fn.__module__)
            return getattr(mod, "preprocess_input")
        return lambda x: x
    if name == "none":
        return lambda x: x
    if name == "scale":
        return lambda x: x / 255.0
    if name in ("tf", "caffe", "torch"):
        from keras.applications import imagenet_utils

        return lambda x: imagenet_utils.preprocess_input(x, mode=name)
    if ":" in name:
        module_name, _, fn_name = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"input.preprocess {name!r}: cannot import it ({_first_line(e)})") from None
    raise ModelError(f"input.preprocess {name!r} is unknown; use auto, none, scale, tf, caffe, torch or module:function")


# --------------------------------------------------------------------------- graph & selection


def _selector_kind(sel: str) -> str:
    if sel == "all":
        return "all"
    if sel.startswith("re:"):
        return "regex"
    if sel.startswith("type:"):
        return "type"
    if any(c in sel for c in "*?["):
        return "glob"
    return "exact"


def _matches(sel: str, t: TracedTensor, include_inputs: bool) -> bool:
    kind = _selector_kind(sel)
    if t.is_input and kind != "exact" and not include_inputs:
        return False
    if kind == "all":
        return not t.is_model
    if kind == "exact":
        if sel in (t.path, t.layer_path):
            return True
        # `layer#1` matches every output of that call; `layer:0` every call's first output
        call_path = t.path.rsplit(":", 1)[0] if t.output_index is not None else t.path
        return sel == call_path or (t.output_index is not None and sel == f"{t.layer_path}:{t.output_index}")
    if kind == "glob":
        return fnmatch.fnmatchcase(t.path, sel) or fnmatch.fnmatchcase(t.layer_path, sel)
    if kind == "regex":
        return re.fullmatch(sel[3:], t.path) is not None
    if kind == "type":
        names = {c.__name__ for c in type(t.layer).__mro__}
        return sel[5:] in names
    raise AssertionError(kind)


def _reduced(tensor, reduce: str, dtype: str):
    import keras

    rank = len(tensor.shape)
    if reduce in ("mean", "max") and rank > 2:
        axes = tuple(range(1, rank - 1))
        tensor = keras.ops.mean(tensor, axis=axes) if reduce == "mean" else keras.ops.max(tensor, axis=axes)
    elif reduce == "flatten" and rank > 2:
        tensor = keras.ops.reshape(tensor, (-1, int(math.prod(tensor.shape[1:]))))
    if dtype == "bfloat16":
        # Round to nearest even bfloat16, then back: float32 with the low 16 mantissa bits
        # zero. Rounding halves the worst-case error of truncation at the same size.
        return keras.ops.cast(keras.ops.cast(keras.ops.cast(tensor, "float32"), "bfloat16"), "float32")
    if tensor.dtype != dtype:
        tensor = keras.ops.cast(tensor, dtype)
    return tensor


def _input_name(t) -> str:
    """The InputLayer's name (what users see in summaries), not the tensor's."""
    hist = getattr(t, "_keras_history", None)
    op = getattr(hist, "operation", None) if hist is not None else None
    return str(getattr(op, "name", None) or t.name)


class ModelGraph:
    """Every tensor of a model that can be tapped, addressed by path.

    Paths: `layer` for a layer called once; `layer#k` for the k-th call of a shared layer
    (in call order); `outer/inner/layer` inside nested models (Functional or Sequential,
    any depth; a shared sub-model's calls are `tower#0/...`, `tower#1/...`); `:i` appended
    for the i-th output of a layer with several outputs. Order is execution order.

    Args:
        model: a Functional or Sequential keras.Model.
        input_shapes: shape per model input (without batch); default: the model's own.
            Needed for a Sequential model built without an `Input`, or to run at another
            image size than the model declares.
    """

    def __init__(self, model, input_shapes: Sequence[Sequence[int]] | None = None):
        import keras

        self.model = model
        names, shapes = self._input_signature(model, input_shapes)
        self.input_names = names
        self.inputs = [keras.Input(shape=tuple(s), name=n, dtype="float32") for n, s in zip(names, shapes)]
        try:
            self.traced = trace_model(model, self.inputs)
        except SubclassedModelError as e:
            raise ModelError(str(e)) from None
        except ValueError as e:
            raise ModelError(f"tracing model {model.name!r} on inputs {dict(zip(names, shapes))} failed: {_first_line(e)}") from None

    @staticmethod
    def _input_signature(model, input_shapes):
        try:
            model_inputs = list(model.inputs)
        except (AttributeError, ValueError):
            model_inputs = []
        names = [_input_name(t) for t in model_inputs] or ["input"]
        if input_shapes is not None:
            shapes = [tuple(s) for s in input_shapes]
            if model_inputs and len(shapes) != len(model_inputs):
                raise ModelError(f"model {model.name!r} has {len(model_inputs)} inputs {names}, but {len(shapes)} input shapes were given")
        elif model_inputs:
            shapes = [tuple(t.shape[1:]) for t in model_inputs]
        else:
            raise ModelError(
                f"model {model.name!r} has no defined input (a Sequential built without keras.Input); "
                "set model.input_shape (e.g. [224, 224, 3]) or input.image_size"
            )
        for n, s in zip(names, shapes):
            if any(d is None for d in s):
                raise ModelError(
                    f"model input {n!r} has shape {s} with unknown sizes; set input.image_size "
                    "(e.g. [224, 224]) so every output has a fixed size"
                )
        return names, shapes

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(d) for d in t.shape[1:]) for n, t in zip(self.input_names, self.inputs)}

    def paths(self) -> list[str]:
        return [t.path for t in self.traced]

    def describe(self, reduce: str = "none", dtype: str = "float32") -> list[dict]:
        """One row per tappable tensor: path, type, shape, dtype, stored bytes, params."""
        rows = []
        for t in self.traced:
            stored = _reduced(t.tensor, reduce, dtype) if not t.is_input else t.tensor
            shape = tuple(int(d) for d in stored.shape[1:])
            rows.append(
                {
                    "path": t.path,
                    "type": type(t.layer).__name__,
                    "shape": list(int(d) if d is not None else -1 for d in t.tensor.shape[1:]),
                    "dtype": str(t.tensor.dtype),
                    "stored_shape": list(shape),
                    "bytes_per_example": int(math.prod(shape)) * _DTYPE_BYTES[dtype],
                    "params": int(t.layer.count_params()) if hasattr(t.layer, "count_params") and getattr(t.layer, "built", True) else 0,
                    "depth": len(t.parts) - 1,
                    "is_model": t.is_model,
                }
            )
        return rows

    def select(
        self,
        select: Iterable[str | Mapping[str, Any]],
        exclude: Iterable[str] = (),
        reduce: str = "mean",
        dtype: str = "float32",
        include_inputs: bool = False,
    ) -> list[OutputSpec]:
        """Resolve selectors to output specs.

        Each selector is a string or a mapping `{layer, as, reduce, dtype}`. A later
        selector that yields the same output name overrides an earlier one (so
        `[all, {layer: conv1, reduce: none}]` keeps every layer mean-pooled except conv1).
        Outputs come in execution order.

        Raises:
            SelectionError: a selector (or exclusion) matches nothing, `as` is used with a
                selector matching several tensors, or two different tensors get one name.
        """
        chosen: dict[str, tuple[int, OutputSpec]] = {}
        index = {id(t): i for i, t in enumerate(self.traced)}
        for item in select:
            spec = {"layer": item} if isinstance(item, str) else dict(item)
            sel = spec["layer"]
            hits = [t for t in self.traced if _matches(sel, t, include_inputs)]
            if not hits:
                raise SelectionError(self._no_match_message("layer selector", sel))
            alias = spec.get("as") or spec.get("name")
            if alias and len(hits) > 1:
                raise SelectionError(
                    f"layer selector {sel!r} matches {len(hits)} tensors ({', '.join(t.path for t in hits[:4])}…), "
                    "so 'as' cannot name them all; select one exact path to rename it"
                )
            r = spec.get("reduce") or reduce
            d = spec.get("dtype") or dtype
            for t in hits:
                name = alias or t.path
                stored = _reduced(t.tensor, r, d)
                out = OutputSpec(
                    name=name,
                    path=t.path,
                    layer_type=type(t.layer).__name__,
                    reduce=r,
                    dtype=d,
                    shape=tuple(int(x) for x in stored.shape[1:]),
                    params=int(t.layer.count_params()) if hasattr(t.layer, "count_params") else 0,
                )
                prev = chosen.get(name)
                if prev and prev[1].path != t.path:
                    raise SelectionError(
                        f"output name {name!r} is given to both {prev[1].path!r} and {t.path!r}; use a different 'as'"
                    )
                chosen[name] = (index[id(t)], out)
        for sel in exclude:
            hits = {t.path for t in self.traced if _matches(sel, t, True)}
            if not hits:
                raise SelectionError(self._no_match_message("exclude selector", sel))
            chosen = {k: v for k, v in chosen.items() if v[1].path not in hits}
        if not chosen:
            raise SelectionError("the exclusions removed every selected output; select more or exclude less")
        return [spec for _, spec in sorted(chosen.values(), key=lambda v: v[0])]

    def _no_match_message(self, what: str, sel: str) -> str:
        close = difflib.get_close_matches(sel, self.paths(), n=3, cutoff=0.5)
        hint = f"close paths: {', '.join(close)}; " if close else ""
        return (
            f"{what} {sel!r} matches no tensor of model {self.model.name!r}; {hint}"
            f"run `layerbeam layers {{model}}` to list every path"
        )

    def build(self, specs: Sequence[OutputSpec]):
        """One Keras model: the graph's inputs → {spec.name: reduced, cast tensor}."""
        import keras

        by_path = {t.path: t for t in self.traced}
        outputs = {s.name: _reduced(by_path[s.path].tensor, s.reduce, s.dtype) for s in specs}
        return keras.Model(self.inputs, outputs, name="layerbeam_extractor")


# --------------------------------------------------------------------------- runtime


def configure_devices() -> list[str]:
    """Turn on memory growth for every visible GPU; return their names (empty on CPU)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except RuntimeError:  # already initialized: growth must be set before first use
            pass
    return [g.name for g in gpus]


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
            {n: tf.TensorSpec((None, *t.shape[1:]), tf.float32, name=n) for n, t in zip(self.input_names, model.inputs)}
        ]

        def run(inputs):
            args = [inputs[n] for n in self.input_names]
            return model(args if len(args) > 1 else args[0], training=False)

        self._fn = tf.function(run, input_signature=signature, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = self._fn({n: inputs[n] for n in self.input_names})
        return {k: v.numpy() for k, v in out.items()}
