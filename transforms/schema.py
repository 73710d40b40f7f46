"""The Arrow schema of a run: the row columns the input gives, one tensor column per
output, stored bytes, the compatibility widening, and the storage spec written to the
manifest so that a reader needs no model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "OUTPUTS_METADATA_KEY",
    "SHAPE_SUFFIX",
    "column_types",
    "output_schema",
    "to_record_batch",
    "compat_schema",
    "to_compat_batch",
    "stored_bytes",
    "storage_spec",
]

OUTPUTS_METADATA_KEY = b"layerbeam.outputs"
SHAPE_SUFFIX = ".shape"
_ARROW_NAMES = {pa.string(): "string", pa.int64(): "int64", pa.float32(): "float32", pa.float16(): "float16"}


def column_types(input_cfg) -> dict[str, pa.DataType]:
    """The non-tensor output columns and their Arrow types."""
    cols: dict[str, pa.DataType] = {"key": pa.string()}
    if input_cfg.format == "images":
        cols["label"] = pa.string()
    elif input_cfg.label_feature:
        cols["label"] = pa.int64() if input_cfg.label_type == "int64" else pa.string()
    arrow = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string()}
    for name, typ in input_cfg.passthrough.items():
        cols[name] = arrow[typ]
    return cols


def stored_bytes(spec, compat: bool = False) -> int:
    """One output's bytes per example as stored: the compatibility mode widens float16 to
    float32 (bfloat16 is stored as float32 always, which `spec.bytes_per_example` counts)."""
    return spec.bytes_per_example * (2 if compat and spec.dtype == "float16" else 1)


def output_schema(specs: Sequence[Any], columns: Mapping[str, pa.DataType]) -> pa.Schema:
    """The Arrow schema of an output: key/label/passthrough columns, then one tensor column
    per output (`fixed_shape_tensor`), with each output's shape, dtype and source in the
    schema metadata (which Parquet keeps as key-value metadata, for readers that do not
    know the tensor type)."""
    fields = [pa.field(n, t, nullable=False) for n, t in columns.items()]
    for s in specs:
        value = pa.float16() if s.dtype == "float16" else pa.float32()
        fields.append(pa.field(s.name, pa.fixed_shape_tensor(value, list(s.shape) or [1]), nullable=False))
    meta = {OUTPUTS_METADATA_KEY: json.dumps([s.to_json() for s in specs]).encode()}
    return pa.schema(fields, metadata=meta)


def to_record_batch(schema: pa.Schema, columns: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> pa.RecordBatch:
    """Convert one batch without a per-row Python loop.

    Tensors are made C-contiguous first: a non-contiguous array would be stored in its
    physical order with a permutation that only pyarrow honours.
    """
    arrays = []
    for field in schema:
        if field.name in outputs:
            a = np.ascontiguousarray(outputs[field.name])
            shape = field.type.shape
            a = a.reshape((a.shape[0], *shape))
            storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=field.type.value_type), int(np.prod(shape)))
            arrays.append(pa.ExtensionArray.from_storage(field.type, storage))
        else:
            v = columns[field.name]
            if pa.types.is_string(field.type) and v.dtype.kind in "SO":
                arrays.append(pa.array(v, type=pa.binary()).cast(pa.string()))
            else:
                arrays.append(pa.array(v, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def compat_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with every tensor column as plain `list<float32>` (compatibility mode):
    no fixed-size list, no extension type, float16 widened (exactly) to float32."""
    fields = [pa.field(f.name, pa.list_(pa.float32()), nullable=False) if isinstance(f.type, pa.FixedShapeTensorType) else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def to_compat_batch(compat: pa.Schema, batch: pa.RecordBatch) -> pa.RecordBatch:
    """A canonical batch (tensor columns) → the compatibility schema (plain float32 lists)."""
    arrays = []
    for field, col in zip(compat, batch.columns):
        if isinstance(col.type, pa.FixedShapeTensorType):
            size = int(np.prod(col.type.shape))
            values = col.storage.flatten()
            if values.type != pa.float32():
                values = pa.array(values.to_numpy(zero_copy_only=False).astype(np.float32))
            offsets = pa.array(np.arange(len(col) + 1, dtype=np.int32) * size)
            col = pa.ListArray.from_arrays(offsets, values, type=field.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=compat)


def storage_spec(schema: pa.Schema, fmt: str, partition_by: Sequence[str] = (), *, compat: bool = False, compression: str | None = None) -> dict:
    """How every column of an output is stored: the feature spec written to the manifest.

    Each column has `name`, `role` (column | partition | output), `dtype` (the value type
    in the files: string | int64 | float32 | float16), `shape` ([] for scalars) and, for
    outputs, `logical_dtype` (the configured dtype: a float16 output widened by the
    compatibility mode, or a bfloat16 output, is stored as float32). Then per format:

    * `tfrecord`: `feature` (the tf.train.Example key) and `kind`: `bytes_list` (UTF-8
      strings), `int64_list`, `float_list` (the row-major values; a `shape_feature`
      int64_list holds the shape), or `tensor_proto` (a bytes feature holding
      `tf.io.serialize_tensor` of the value: read it with `tf.io.parse_tensor`).
    * `parquet`: `type` (`fixed_shape_tensor<float32>`, `list<float32>`, or the scalar
      type) and `in`: `file`, or `path` for Hive partition columns (`label=3/`).
    """
    outputs = {o["name"]: o for o in json.loads(schema.metadata[OUTPUTS_METADATA_KEY])} if schema.metadata and OUTPUTS_METADATA_KEY in schema.metadata else {}
    columns = []
    for f in schema:
        if isinstance(f.type, pa.FixedShapeTensorType):
            value = _ARROW_NAMES[f.type.value_type]
            stored = "float32" if compat else value
            col = {"name": f.name, "role": "output", "dtype": stored, "shape": list(f.type.shape), "logical_dtype": outputs.get(f.name, {}).get("dtype", value)}
            if fmt == "tfrecord":
                col["tfrecord"] = {"feature": f.name, "kind": "tensor_proto"} if value == "float16" else {"feature": f.name, "kind": "float_list", "shape_feature": f.name + SHAPE_SUFFIX}
            else:
                col["parquet"] = {"type": "list<float32>" if compat else f"fixed_shape_tensor<{value}>", "in": "file"}
        else:
            typ = _ARROW_NAMES.get(f.type)
            if typ is None:
                raise ValueError(f"column {f.name!r} has type {f.type}, which layerbeam cannot store; use int64, float32 or string")
            col = {"name": f.name, "role": "partition" if f.name in partition_by else "column", "dtype": typ, "shape": []}
            if fmt == "tfrecord":
                col["tfrecord"] = {"feature": f.name, "kind": {"string": "bytes_list", "int64": "int64_list", "float32": "float_list"}[typ]}
            else:
                col["parquet"] = {"type": typ, "in": "path" if f.name in partition_by else "file"}
        columns.append(col)
    return {"spec_version": 1, "format": fmt, "compression": compression, "partition_by": list(partition_by), "compat": compat, "columns": columns}
