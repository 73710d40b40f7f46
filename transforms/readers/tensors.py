"""Model inputs of every kind: what each configured input is (an encoded image or a tensor
of numbers, token ids or strings), checked against the model's input, and how a tensor
feature of a `tf.train.Example` is decoded inside tf.data.

`input.inputs` maps a model input to a feature name (an encoded image, as always) or to a
mapping `{feature, dtype, shape, encoding, pad_value}` (a tensor). `plan_inputs` resolves
both into `InputPlan`s against the model's own input shapes and dtypes, and refuses, with
one line naming the input, what cannot feed the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["InputPlan", "plan_inputs", "needs_padding", "tensor_parse_spec", "decode_tensor", "dummy", "describe", "FLOATS", "INTS"]

FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int8", "uint8", "int16", "int32", "int64", "bool")


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """How one model input is read.

    Attributes:
        name: the model input.
        kind: 'image' (an encoded image feature) or 'tensor'.
        feature: the feature (column, member) holding it.
        shape: per-example shape fed to the model; None marks a size padded per batch.
        dtype: the model input's dtype (what the reader yields).
        read_dtype: the dtype the values are read as (`encoding: raw` interprets the bytes
            as this); cast to `dtype` after reading.
        encoding: 'list' (a float/int64/bytes list) or 'raw' (tensor bytes).
        pad_value: what variable sizes are padded with.
    """

    name: str
    kind: str
    feature: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    read_dtype: str = "float32"
    encoding: str = "list"
    pad_value: Any = 0


def _family(dtype: str) -> str:
    return "string" if dtype == "string" else "float" if dtype in FLOATS else "int"


def _fmt(shape) -> str:
    return "[" + ", ".join("null" if d is None else str(d) for d in shape) + "]"


def plan_inputs(spec, input_shapes: Mapping[str, tuple], input_dtypes: Mapping[str, str] | None = None) -> dict[str, InputPlan]:
    """One `InputPlan` per model input, in the model's input order.

    Args:
        spec: the `ReadSpec` (`inputs`, `image_feature`).
        input_shapes: model input → shape without the batch axis (None for unknown sizes).
        input_dtypes: model input → dtype name; default float32 for every input.

    Raises:
        ValueError: one line naming the input, what the model wants and what the config
            gives (rank, dtype, fixed sizes), or an unmapped input.
    """
    dtypes = dict(input_dtypes or {})
    given = dict(spec.inputs or {})
    if given:
        missing = [n for n in input_shapes if n not in given]
        extra = [n for n in given if n not in input_shapes]
        if missing or extra:
            raise ValueError(
                f"input.inputs maps {sorted(given)}, but the model's inputs are {list(input_shapes)}; "
                + (f"add a feature for {missing}" if missing else f"remove or rename {extra}")
            )
    elif len(input_shapes) > 1:
        raise ValueError(
            f"the model has {len(input_shapes)} inputs {list(input_shapes)}; map each to a feature "
            "with input.inputs: {input_name: feature, or {feature, dtype, shape}}"
        )
    else:
        given = {next(iter(input_shapes)): spec.image_feature}
    out = {}
    for name, shape in input_shapes.items():
        want_dtype = str(dtypes.get(name, "float32"))
        item = given[name]
        wants = f"{want_dtype} {_fmt(shape)}"
        if isinstance(item, str):
            if len(shape) != 3 or _family(want_dtype) != "float":
                raise ValueError(
                    f"input.inputs.{name}: {item!r} is read as an encoded image (float32 [height, width, channels]), but model input "
                    f"{name!r} wants {wants}; declare it as a tensor: {{feature: {item}, dtype: {want_dtype}, shape: {_fmt(shape)}}}"
                )
            out[name] = InputPlan(name, "image", item, tuple(shape), want_dtype, "float32")
            continue
        item = dict(item)
        cfg_shape = item.get("shape")
        cfg_shape = tuple(shape) if cfg_shape is None else tuple(cfg_shape)
        read = item.get("dtype") or want_dtype
        gives = f"{read} {_fmt(cfg_shape)}"
        where = f"input.inputs.{name} (feature {item['feature']!r})"
        if len(cfg_shape) != len(shape):
            raise ValueError(f"{where} gives rank {len(cfg_shape)} ({gives}), but model input {name!r} wants {wants} (rank {len(shape)}); give a shape of rank {len(shape)}")
        for got, want in zip(cfg_shape, shape):
            if want is not None and got != want:
                raise ValueError(f"{where} gives shape {_fmt(cfg_shape)}, but model input {name!r} wants {wants}; fixed sizes must match")
        if _family(read) != _family(want_dtype) and not (_family(read) == "int" and _family(want_dtype) == "float"):
            raise ValueError(f"{where} gives {read} values, but model input {name!r} wants {wants}; set dtype: {want_dtype} (or use a feature of that kind)")
        encoding = item.get("encoding", "list")
        if encoding == "raw" and read == "string":
            raise ValueError(f"{where}: encoding 'raw' reads numbers from bytes; strings are read with encoding 'list' (a bytes_list)")
        if sum(d is None for d in cfg_shape) > 1:
            raise ValueError(f"{where} has shape {_fmt(cfg_shape)} with several unknown sizes; a flat feature can fill one; fix the others")
        pad = item.get("pad_value", 0)
        if read == "string":
            pad = "" if pad == 0 else str(pad)
        out[name] = InputPlan(name, "tensor", item["feature"], cfg_shape, want_dtype, read, encoding, pad)
    return out


def needs_padding(plans: Mapping[str, InputPlan]) -> bool:
    return any(None in p.shape for p in plans.values())


def describe(plan: InputPlan, preprocess: str | None = None) -> str:
    """The plan in words, for the size plan."""
    if plan.kind == "image":
        h, w, c = plan.shape
        return f"image from {plan.feature!r}: decoded to {c} channels, resized to {h}×{w}, preprocess {preprocess}"
    how = "raw bytes" if plan.encoding == "raw" else {"string": "bytes_list", "float": "float_list"}.get(_family(plan.read_dtype), "int64_list")
    cast = f", cast to {plan.dtype}" if plan.read_dtype != plan.dtype else ""
    pad = f", padded per batch with {plan.pad_value!r}" if None in plan.shape else ""
    return f"tensor from {plan.feature!r}: {plan.read_dtype} {_fmt(plan.shape)} ({how}){cast}{pad}, no preprocessing"


def _list_dtype(read_dtype: str):
    import tensorflow as tf

    fam = _family(read_dtype)
    return tf.string if fam == "string" else tf.float32 if fam == "float" else tf.int64


def tensor_parse_spec(plan: InputPlan):
    """The `tf.io.parse_single_example` feature spec that reads a tensor input."""
    import tensorflow as tf

    if plan.encoding == "raw":
        return tf.io.FixedLenFeature([], tf.string)
    if None in plan.shape:
        return tf.io.VarLenFeature(_list_dtype(plan.read_dtype))
    return tf.io.FixedLenFeature(plan.shape, _list_dtype(plan.read_dtype))


def decode_tensor(value, plan: InputPlan):
    """The parsed feature → the model input tensor (shape checked, dtype cast)."""
    import tensorflow as tf

    target = [-1 if d is None else d for d in plan.shape]
    if plan.encoding == "raw":
        value = tf.io.decode_raw(value, tf.as_dtype(plan.read_dtype), little_endian=True)
        value = tf.reshape(value, target)
    elif isinstance(value, tf.SparseTensor):
        default = "" if plan.read_dtype == "string" else 0
        value = tf.reshape(tf.sparse.to_dense(value, default_value=tf.cast(default, value.dtype)), target)
    else:  # a column's values (a scalar or a flat list), row-major
        value = tf.reshape(value, target)
    if plan.dtype != "string" and value.dtype != tf.as_dtype(plan.dtype):
        value = tf.cast(value, plan.dtype)
    return tf.ensure_shape(value, plan.shape)


def dummy(plan: InputPlan):
    """A placeholder of the plan's shape and dtype (the sentinel's), unknown sizes 0."""
    import tensorflow as tf

    shape = [0 if d is None else d for d in plan.shape]
    if plan.kind == "image" or plan.dtype != "string":
        return tf.zeros(shape, tf.float32 if plan.kind == "image" else plan.dtype)
    return tf.fill(shape, "")


def list_kind(plan: InputPlan) -> tuple[str, int | None]:
    """(tf.train.Feature kind, value count or None for any) a record must hold (bad path)."""
    if plan.kind == "image" or plan.encoding == "raw":
        return "bytes_list", 1
    fam = _family(plan.read_dtype)
    kind = "bytes_list" if fam == "string" else "float_list" if fam == "float" else "int64_list"
    return kind, None if None in plan.shape else math.prod(plan.shape)
