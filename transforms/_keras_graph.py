"""Retrace a Keras model call by call, so every intermediate tensor gets a path.

This is the one module that touches private Keras API (`Functional._run_through_graph`,
the mechanism `Functional.call` itself uses). Everything else in layerbeam goes through
`trace_model`, so a Keras upgrade that changes the internals breaks here, with a clear
message, and nowhere else.

Why retrace instead of reading `layer.output`: in Keras 3 `layer.output` is only the
*first* call's output (wrong data for shared layers), is disconnected from the outer
inputs for nested sub-models, and does not exist for Sequential models that were never
called on an `Input`. Retracing the graph on fresh `keras.Input`s visits every call of
every layer in execution order, recursing into nested Functional and Sequential models,
and yields symbolic tensors that are all connected to the same inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
from keras import tree

__all__ = [
    "KERAS_TESTED",
    "SubclassedModelError",
    "TracedTensor",
    "check_keras_version",
    "trace_model",
]

# The Keras versions this module was tested on (inclusive lower, exclusive upper bound).
KERAS_TESTED = ("3.10", "3.16")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_keras_version(version: str | None = None) -> None:
    """Refuse Keras versions whose graph internals this module was not tested on."""
    version = version or keras.__version__
    lo, hi = KERAS_TESTED
    if not (_version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi)):
        raise RuntimeError(
            f"keras {version} is outside the range layerbeam's graph tracer is tested on "
            f"(>={lo},<{hi}); install a version in that range "
            f"(pip install 'keras>={lo},<{hi}') or use the pinned constraints.txt"
        )


@dataclasses.dataclass(frozen=True)
class TracedTensor:
    """One tappable tensor: the output (or one of the outputs) of one layer call.

    Attributes:
        parts: the path as (name, call_index, calls) triples from the outermost sub-model
            down to the layer; `calls` is how often that object is called in its parent.
        output_index: index among the layer call's outputs, or None for a single output.
        n_outputs: how many outputs the call has.
        layer: the Keras layer or operation that produced it.
        tensor: the symbolic tensor, connected to the inputs given to `trace_model`.
        is_model: whether `layer` is itself a traced (nested) model; its inner tensors
            have their own paths, so `all` skips this one (it repeats an inner output).
        is_input: whether this is a model input.
        opaque: whether `layer` is a nested subclassed model, tapped as a whole because
            its `call()` has no graph to follow.
    """

    parts: tuple[tuple[str, int, int], ...]
    output_index: int | None
    n_outputs: int
    layer: Any
    tensor: Any
    is_model: bool = False
    is_input: bool = False
    opaque: bool = False

    @property
    def path(self) -> str:
        segs = [name if calls == 1 else f"{name}#{idx}" for name, idx, calls in self.parts]
        p = "/".join(segs)
        return p if self.output_index is None else f"{p}:{self.output_index}"

    @property
    def layer_path(self) -> str:
        """The path without call index or output index: `outer/inner/layer`."""
        return "/".join(name for name, _, _ in self.parts)


class _Recorder:
    def __init__(self) -> None:
        self.raw: list[tuple] = []
        self.seen: dict[tuple, int] = {}
        self.totals: dict[tuple, int] = {}

    def next_index(self, prefix, layer, rank) -> int:
        """The call index of this call of `layer` within its parent `prefix`."""
        key = (prefix, id(layer))
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        if rank is None:  # Sequential or top level: calls happen in order
            self.totals[key] = self.totals.get(key, 0) + 1
            return n
        self.totals[key] = rank[1]
        return rank[0]

    def record(self, prefix, layer, outputs, idx, is_model=False, opaque=False):
        flat = tree.flatten(outputs)
        me = prefix + ((id(layer), layer.name, idx),)
        for i, t in enumerate(flat):
            self.raw.append((me, None if len(flat) == 1 else i, len(flat), layer, t, is_model, opaque))


def _is_functional(obj) -> bool:
    """A Functional model whose `call` is the graph (not overridden by a subclass)."""
    from keras.src.models.functional import Functional

    return isinstance(obj, Functional) and type(obj).call is Functional.call


def _is_sequential(obj) -> bool:
    return isinstance(obj, keras.Sequential) and type(obj).call is keras.Sequential.call


def _is_traceable(obj) -> bool:
    return _is_functional(obj) or _is_sequential(obj)


def _call_model(model, prefix, rec: _Recorder, inputs):
    """Call `model` on symbolic `inputs`, recording every leaf call below it."""
    if _is_sequential(model):
        x = inputs
        for layer in model.layers:
            x = _call_op(layer, prefix, rec, (x,), {}, None)
        return x
    if _is_functional(model):
        return _run_functional(model, prefix, rec, inputs)
    raise SubclassedModelError(model)


def _run_functional(model, prefix, rec: _Recorder, inputs):
    """`Functional._run_through_graph`, but knowing each node, so that a shared layer's
    calls are numbered in the order they were made (`layer._inbound_nodes`), not in the
    order nodes of equal depth happen to be stored."""
    flat = tree.flatten(inputs)
    tensor_dict = {id(x): y for x, y in zip(model.inputs, flat)}
    nodes_by_depth = model._nodes_by_depth
    op_index = {id(op): i for i, op in enumerate(model.operations)}
    calls: dict[int, list] = {}
    for d in nodes_by_depth:
        for node in nodes_by_depth[d]:
            if node.operation is not None and not node.is_input:
                calls.setdefault(id(node.operation), []).append(node)
    rank = {}
    for nodes in calls.values():
        # `_inbound_nodes` is in call order (and a saved model keeps that order); nodes
        # of equal depth are not.
        inbound = getattr(nodes[0].operation, "_inbound_nodes", [])
        pos = {id(n): i for i, n in enumerate(inbound)}
        if any(id(n) not in pos for n in nodes):
            raise ValueError(
                f"model {model.name!r}: a call of {nodes[0].operation.name!r} is not among its "
                "inbound nodes, so its calls cannot be numbered in call order; this Keras version "
                "is not supported by layerbeam's tracer"
            )
        for r, n in enumerate(sorted(nodes, key=lambda n: pos[id(n)])):
            rank[id(n)] = (r, len(nodes))
    # Execution order: by depth from the inputs (every node's inputs are deeper than the
    # node), ties in `model.operations` order (the order of `model.layers` and
    # `model.summary()`), then in call order. `_nodes_by_depth[d]` has no documented order.
    ordered = [
        n
        for d in sorted(nodes_by_depth, reverse=True)
        for n in sorted(
            nodes_by_depth[d],
            key=lambda n: (op_index.get(id(n.operation), len(op_index)), rank.get(id(n), (0, 0))[0]),
        )
    ]
    for node in ordered:
        if not node.operation or node.is_input:
            continue
        if any(id(x) not in tensor_dict for x in node.input_tensors):
            continue
        args, kwargs = node.arguments.fill_in(tensor_dict)
        op = model._get_operation_for_node(node) if hasattr(model, "_get_operation_for_node") else node.operation
        outputs = _call_op(op, prefix, rec, args, kwargs, rank[id(node)])
        for x, y in zip(node.outputs, tree.flatten(outputs)):
            tensor_dict[id(x)] = y
    return tree.pack_sequence_as(model._outputs_struct, [tensor_dict[id(x)] for x in model.outputs])


class SubclassedModelError(ValueError):
    """The model to trace is a subclassed `keras.Model` (its `call()` is Python code)."""

    def __init__(self, model):
        cls = type(model)
        super().__init__(
            f"model {model.name!r} is a subclassed keras.Model ({cls.__module__}.{cls.__qualname__}): "
            "its call() is Python code with no graph to follow, so layerbeam cannot know which "
            "layer computed which tensor and refuses rather than guess; build it with the "
            "functional API (keras.Model(inputs, outputs)) or as a Sequential, or call it inside "
            "a functional model (x = keras.Input(shape); keras.Model(x, model(x))) to tap its "
            "output as a whole"
        )


def _call_op(op, prefix, rec: _Recorder, args, kwargs, rank):
    if isinstance(op, keras.Model) and _is_traceable(op):
        # A nested model: everything inside it under its path, then its own output.
        idx = rec.next_index(prefix, op, rank)
        me = prefix + ((id(op), op.name, idx),)
        model_in = args[0] if len(args) == 1 else list(args)
        out = _call_model(op, me, rec, model_in)
        rec.record(prefix, op, out, idx, is_model=True)
        return out
    out = op(*args, **kwargs)
    # A nested subclassed model is tapped as a whole, like a custom layer: its output is
    # right, its insides have no graph to follow.
    rec.record(prefix, op, out, rec.next_index(prefix, op, rank), opaque=isinstance(op, keras.Model))
    return out


def trace_model(model, inputs: Sequence[Any] | Any) -> list[TracedTensor]:
    """Call `model` on fresh symbolic `inputs` and return every tappable tensor.

    Args:
        model: a Functional or Sequential Keras model; nested models of either kind, shared
            layers and shared sub-models are followed. Subclassed models raise
            `SubclassedModelError` (they have no graph to follow).
        inputs: `keras.Input` tensors, one per model input, in `model.inputs` order.

    Returns:
        The model inputs followed by each layer call's outputs in execution order: by depth
        from the inputs, ties in `model.layers` order (so a model whose layers are each
        called once lists them as `model.summary()` does). A nested model's inner tensors
        come where it is called, followed by its own output.

    Raises:
        SubclassedModelError: `model` is a subclassed model (nested ones are opaque leaves).
        ValueError: two tensors would get one path, or the graph cannot be followed.
    """
    check_keras_version()
    rec = _Recorder()
    flat_inputs = tree.flatten(inputs)
    for t in flat_inputs:
        marker = _InputMarker(t.name)
        rec.record((), marker, t, rec.next_index((), marker, None))
    if _is_traceable(model):
        model_in = flat_inputs[0] if len(flat_inputs) == 1 else list(flat_inputs)
        _call_model(model, (), rec, model_in)
    else:
        raise SubclassedModelError(model)

    # Second pass: now that every call is counted, turn ids into display names with
    # `#k` call suffixes only where an object is called more than once in its parent.
    totals = rec.totals
    out: list[TracedTensor] = []
    for me, oi, n, layer, t, is_model, opaque in rec.raw:
        parts = []
        for depth, (oid, name, idx) in enumerate(me):
            parent = tuple(me[:depth])
            parts.append((name, idx, totals[(parent, oid)]))
        out.append(
            TracedTensor(
                parts=tuple(parts),
                output_index=oi,
                n_outputs=n,
                layer=layer,
                tensor=t,
                is_model=is_model,
                is_input=isinstance(layer, _InputMarker),
                opaque=opaque,
            )
        )
    seen: dict[str, TracedTensor] = {}
    for t in out:
        other = seen.setdefault(t.path, t)
        if other is not t:
            raise ValueError(
                f"two tensors of model {model.name!r} get the path {t.path!r} "
                f"({type(other.layer).__name__} and {type(t.layer).__name__}); give the layers unique names"
            )
    return out


class _InputMarker:
    """Stands in for the InputLayer of a traced input."""

    def __init__(self, name: str) -> None:
        self.name = name

    def count_params(self) -> int:
        return 0


_InputMarker.__name__ = "InputLayer"
