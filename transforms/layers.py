"""Discovery and selection: every tensor of a Keras model that can be tapped, by path, and
selectors → `OutputSpec`s. Plain Keras: no Beam, no config objects.

Example:
    >>> graph = ModelGraph(load_model(ModelSpec(source="keras.applications.MobileNetV2",
    ...                                         input_shape=(96, 96, 3))))
    >>> specs = graph.select(["block_1_expand_relu", {"layer": "out_relu", "reduce": "none"}])
    >>> extractor = Extractor(extractor_model(graph, specs))   # layerbeam.transforms.extractor
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._keras_graph import SubclassedModelError, TracedTensor, trace_model
from .errors import ModelError, SelectionError, first_line

__all__ = ["SelectSpec", "OutputSpec", "ModelGraph", "SELECTOR_SYNTAX", "trace_and_select"]

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 4}  # bfloat16 is stored as float32


@dataclasses.dataclass(frozen=True)
class SelectSpec:
    """What to write (see `layerbeam.config.LayersConfig` for each field). `select` holds
    selector strings or mappings `{layer, as, reduce, dtype}`."""

    select: tuple[str | Mapping[str, Any], ...]
    exclude: tuple[str, ...] = ()
    reduce: str = "mean"
    dtype: str = "float32"
    include_inputs: bool = False
    max_bytes_per_example: int = 4 << 20


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


SELECTOR_SYNTAX = (
    "an exact path (outer/inner/layer, layer#1 for a call, layer:0 for an output), a glob "
    "(block_*_relu; * also crosses /), 're:<regex>', 'type:<LayerClass>', or 'all'"
)

_SEGMENT = re.compile(r"^(?P<name>.+?)(?:#(?P<call>\d+))?$")
_OUTPUT = re.compile(r"^(?P<path>.+):(?P<index>\d+)$")


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


def _exact_matches(sel: str, t: TracedTensor) -> bool:
    """Segment by segment: a segment without `#k` matches every call of that layer or
    sub-model, one with `#k` only the k-th call; a trailing `:i` picks one output."""
    if sel == t.path:
        return True
    out = _OUTPUT.match(sel)
    if out and t.output_index is not None:
        if int(out["index"]) != t.output_index:
            return False
        sel = out["path"]
    segs = sel.split("/")
    if len(segs) != len(t.parts):
        return False
    for seg, (name, idx, _calls) in zip(segs, t.parts):
        if seg == name:
            continue
        m = _SEGMENT.match(seg)
        if not (m and m["call"] is not None and m["name"] == name and int(m["call"]) == idx):
            return False
    return True


def _type_names(layer) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def _matches(sel: str, t: TracedTensor, include_inputs: bool) -> bool:
    """Whether selector `sel` picks tensor `t`.

    Model inputs are matched only by their exact name, unless `include_inputs`. `all`
    skips the outputs of traced nested models (each repeats an inner layer's output).
    """
    kind = _selector_kind(sel)
    if t.is_input and kind != "exact" and not include_inputs:
        return False
    if kind == "all":
        return not t.is_model
    if kind == "exact":
        return _exact_matches(sel, t)
    if kind == "glob":
        return fnmatch.fnmatchcase(t.path, sel) or fnmatch.fnmatchcase(t.layer_path, sel)
    if kind == "regex":
        return re.fullmatch(sel[3:], t.path) is not None or re.fullmatch(sel[3:], t.layer_path) is not None
    if kind == "type":
        return sel[5:] in _type_names(t.layer)
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


def _params(layer) -> int:
    """Parameter count of a layer (0 for operations without weights)."""
    weights = getattr(layer, "weights", None)
    if not weights:
        return 0
    return int(sum(math.prod(w.shape) for w in weights))


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
    for the i-th output of a layer with several outputs.

    Order (of `traced`, `paths()`, `describe()` and `select()`) is execution order: by
    depth from the inputs, ties in `model.layers` order, then call order; a model whose
    layers are each called once lists them as `model.summary()` does. A nested model's
    tensors come where it is called, followed by its own output.

    Args:
        model: a Functional or Sequential keras.Model.
        input_shapes: shape per model input (without batch); default: the model's own.
            Needed for a Sequential model built without an `Input`, or to run at another
            image size than the model declares.
    """

    def __init__(self, model, input_shapes: Sequence[Sequence[int]] | None = None, variable: Iterable[str] = ()):
        import keras

        self.model = model
        names, shapes = self._input_signature(model, input_shapes, set(variable))
        self.input_names = names
        # Inputs keep the model's dtypes: token ids stay integers, strings stay strings.
        self.inputs = [keras.Input(shape=tuple(s), name=n, dtype=d) for n, s, d in zip(names, shapes, _model_dtypes(model, len(names)))]
        try:
            self.traced = trace_model(model, self.inputs)
        except SubclassedModelError as e:
            raise ModelError(str(e)) from None
        except ValueError as e:
            raise ModelError(f"tracing model {model.name!r} on inputs {dict(zip(names, shapes))} failed: {first_line(e)}") from None

    @staticmethod
    def _input_signature(model, input_shapes, variable=frozenset()):
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
            if any(d is None for d in s) and n not in variable:
                raise ModelError(
                    f"model input {n!r} has shape {s} with unknown sizes; set input.image_size "
                    "(e.g. [224, 224]) so every output has a fixed size"
                )
        return names, shapes

    @property
    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Model input → shape without the batch axis (None: a size padded per batch)."""
        return {n: tuple(None if d is None else int(d) for d in t.shape[1:]) for n, t in zip(self.input_names, self.inputs)}

    @property
    def input_dtypes(self) -> dict[str, str]:
        """Model input → dtype name (float32, int32, string …)."""
        return {n: str(t.dtype) for n, t in zip(self.input_names, self.inputs)}

    def paths(self) -> list[str]:
        return [t.path for t in self.traced]

    def describe(self, reduce: str = "none", dtype: str = "float32") -> list[dict]:
        """One row per tappable tensor, in execution order.

        Each row: `path`, `type` (layer class), `shape` and `dtype` as computed, then
        `stored_shape` and `bytes_per_example` as written with `reduce`/`dtype`, `params`
        (the layer's parameter count; a shared layer's weights show at each call),
        `depth` (nesting level), `is_model`, `is_input`, `opaque`.
        """
        rows = []
        for t in self.traced:
            stored = _reduced(t.tensor, reduce, dtype)
            shape = [None if d is None else int(d) for d in stored.shape[1:]]
            rows.append(
                {
                    "path": t.path,
                    "type": type(t.layer).__name__,
                    "shape": [None if d is None else int(d) for d in t.tensor.shape[1:]],
                    "dtype": str(t.tensor.dtype),
                    "stored_shape": shape,
                    "bytes_per_example": None if None in shape else int(math.prod(shape)) * _DTYPE_BYTES[dtype],
                    "params": _params(t.layer),
                    "depth": len(t.parts) - 1,
                    "is_model": t.is_model,
                    "is_input": t.is_input,
                    "opaque": t.opaque,
                }
            )
        return rows

    def match(self, selector: str, include_inputs: bool = False, what: str = "layer selector") -> list[TracedTensor]:
        """The tensors one selector picks, in execution order.

        Raises:
            SelectionError: the selector matches nothing (naming it, with close paths or
                layer types), or a `re:` selector is not a valid regular expression.
        """
        if not isinstance(selector, str) or not selector:
            raise SelectionError(f"{what} {selector!r} is not a selector; use {SELECTOR_SYNTAX}")
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as e:
                raise SelectionError(f"{what} {selector!r} is not a valid regular expression ({e}); fix the pattern after 're:'") from None
        hits = [t for t in self.traced if _matches(selector, t, include_inputs)]
        if not hits:
            raise SelectionError(self._no_match_message(what, selector, include_inputs))
        return hits

    def select(
        self,
        select: Iterable[str | Mapping[str, Any]],
        exclude: Iterable[str] = (),
        reduce: str = "mean",
        dtype: str = "float32",
        include_inputs: bool = False,
    ) -> list[OutputSpec]:
        """Resolve selectors to output specs.

        Rules (also in the README, "Choosing outputs"):

        * Each selector is a string or a mapping `{layer, as, reduce, dtype}`; every selector
          and every exclusion must match at least one tensor.
        * A tensor is written once per output name; the name is `as` when given, else its
          path. A tensor renamed with `as` anywhere is not also written under its path, so
          `[all, {layer: out_relu, as: embedding}]` renames one output of `all`. Several
          `as` names for one tensor give several outputs (e.g. pooled and unpooled).
        * When several selectors give the same name, the last one's `reduce`/`dtype` win:
          `[all, {layer: conv1, reduce: none}]` keeps every output pooled except conv1.
        * Exclusions remove tensors (by path) from the result, renamed ones included.
        * The result is in execution order (see `ModelGraph`), whatever the selector order;
          outputs of one tensor under several names keep the order their selectors came in.

        Raises:
            SelectionError: a selector (or exclusion) matches nothing, `as` is used with a
                selector matching several tensors, two different tensors get one name, or
                the exclusions remove everything.
        """
        index = {id(t): i for i, t in enumerate(self.traced)}
        chosen: dict[str, tuple[tuple[int, int], OutputSpec, bool]] = {}
        for n, item in enumerate(select):
            spec = {"layer": item} if isinstance(item, str) else dict(item)
            sel = spec.get("layer")
            hits = self.match(sel, include_inputs)
            alias = spec.get("as") or spec.get("name")
            if alias and len(hits) > 1:
                shown = ", ".join(t.path for t in hits[:4]) + (", …" if len(hits) > 4 else "")
                raise SelectionError(
                    f"layer selector {sel!r} matches {len(hits)} tensors ({shown}), "
                    f"so 'as: {alias}' cannot name them all; select one exact path to rename it"
                )
            r = spec.get("reduce") or reduce
            d = spec.get("dtype") or dtype
            for t in hits:
                name = alias or t.path
                prev = chosen.get(name)
                if prev and prev[1].path != t.path:
                    raise SelectionError(
                        f"output name {name!r} is given to both {prev[1].path!r} and {t.path!r}; use a different 'as'"
                    )
                chosen[name] = ((index[id(t)], prev[0][1] if prev else n), self._spec(name, t, r, d), bool(alias))
        renamed = {spec.path for _, spec, named in chosen.values() if named}
        chosen = {k: v for k, v in chosen.items() if v[2] or v[1].path not in renamed}
        for sel in exclude:
            hits = {t.path for t in self.match(sel, include_inputs=True, what="exclude selector")}
            chosen = {k: v for k, v in chosen.items() if v[1].path not in hits}
        if not chosen:
            raise SelectionError("the exclusions removed every selected output; select more or exclude less")
        return [spec for _, spec, _ in sorted(chosen.values(), key=lambda v: v[0])]

    @staticmethod
    def _spec(name: str, t: TracedTensor, reduce: str, dtype: str) -> OutputSpec:
        if reduce not in ("none", "mean", "max", "flatten"):
            raise SelectionError(f"reduce {reduce!r} for {t.path!r} is unknown; use none, mean, max or flatten")
        if dtype not in _DTYPE_BYTES:
            raise SelectionError(f"dtype {dtype!r} for {t.path!r} is unknown; use {' or '.join(_DTYPE_BYTES)}")
        stored = _reduced(t.tensor, reduce, dtype)
        if any(x is None for x in stored.shape[1:]):
            raise SelectionError(
                f"output {t.path!r} has shape {tuple(stored.shape[1:])} with unknown sizes, which a fixed "
                "Parquet tensor column cannot hold; give the model a fixed input size (input.image_size) or reduce it"
            )
        return OutputSpec(
            name=name,
            path=t.path,
            layer_type=type(t.layer).__name__,
            reduce=reduce,
            dtype=dtype,
            shape=tuple(int(x) for x in stored.shape[1:]),
            params=_params(t.layer),
        )

    def _no_match_message(self, what: str, sel: str, include_inputs: bool = False) -> str:
        kind = _selector_kind(sel)
        hint = ""
        if kind == "type":
            types = sorted({n for t in self.traced if not t.is_input for n in [type(t.layer).__name__]})
            close = difflib.get_close_matches(sel[5:], types, n=3, cutoff=0.5)
            hint = f"close layer types: {', '.join(close)}; " if close else f"layer types here: {', '.join(types[:12])}; "
        elif kind in ("exact", "glob", "regex"):
            close = difflib.get_close_matches(sel, self.paths(), n=3, cutoff=0.5)
            hint = f"close paths: {', '.join(close)}; " if close else ""
            if kind != "exact" and not include_inputs and any(_matches(sel, t, True) for t in self.traced):
                hint = "it matches only model inputs, which patterns skip unless layers.include_inputs is true; "
        opaque = [t.path for t in self.traced if t.opaque and sel.startswith(t.layer_path + "/")]
        if opaque:
            hint = f"{opaque[0]!r} is a subclassed model, tapped only as a whole (its insides have no graph); " + hint
        return (
            f"{what} {sel!r} matches no tensor of model {self.model.name!r}; {hint}"
            f"run `layerbeam layers {{model}}` to list every path"
        )


def _model_dtypes(model, n: int) -> list[str]:
    try:
        return [str(t.dtype or "float32") for t in model.inputs]
    except (AttributeError, ValueError):
        return ["float32"] * n


def _tensor_inputs(cfg) -> list[str]:
    """Inputs configured as tensors (`input.inputs.<name>: {feature, …}`), not images."""
    return [n for n, v in (cfg.input.inputs or {}).items() if not isinstance(v, str)]


def trace_and_select(cfg, model):
    """(`ModelGraph`, `OutputSpec`s): the model traced at the configured input shape and the
    outputs `cfg.layers` selects. The launcher's checks and every worker build it this way.

    Raises:
        ModelError, SelectionError: as `ModelGraph` and `ModelGraph.select` do.
    """
    graph = ModelGraph(model, input_shapes=_input_shapes(cfg, model), variable=_tensor_inputs(cfg))
    specs = graph.select(
        list(cfg.layers.select),
        exclude=cfg.layers.exclude,
        reduce=cfg.layers.reduce,
        dtype=cfg.layers.dtype,
        include_inputs=cfg.layers.include_inputs,
    )
    return graph, specs


def _input_shapes(cfg, model) -> list[tuple[int, ...]] | None:
    """Input shapes to trace the model at: model.input_shape, or image_size × channels."""
    if cfg.model.input_shape and not cfg.input.image_size:
        return [tuple(cfg.model.input_shape)]
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if cfg.input.image_size:
        h, w = cfg.input.image_size
        tensors = set(_tensor_inputs(cfg))
        if inputs:
            # image_size is for image inputs; tensor inputs keep the model's own shape.
            return [
                tuple(t.shape[1:]) if _input_name(t) in tensors
                else (h, w, int(t.shape[-1]) if t.shape[-1] is not None else cfg.input.channels)
                for t in inputs
            ]
        return [(h, w, cfg.input.channels)]
    if cfg.model.input_shape:
        return [tuple(cfg.model.input_shape)]
    return None
