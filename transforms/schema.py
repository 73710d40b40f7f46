"""The Arrow schema of a run: the row columns the input gives, one tensor column per
output; how each Parquet encoding stores it (and who cannot read it), stored bytes, the
storage spec written to the manifest so that a reader needs no model, and the way back
from any stored column to the types `layerbeam.read` returns."""

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
    "PARQUET_ENCODINGS",
    "unreadable_by",
    "stored_schema",
    "to_stored_batch",
    "tensor_leaf_paths",
    "flat_values",
    "result_dtype",
    "read_schema",
    "column_numpy",
    "restore_table",
    "table_from_numpy",
    "stored_bytes",
    "storage_spec",
]

OUTPUTS_METADATA_KEY = b"layerbeam.outputs"
SHAPE_METADATA_KEY = b"layerbeam.shape"
DTYPE_METADATA_KEY = b"layerbeam.dtype"
SHAPE_SUFFIX = ".shape"
_ARROW_NAMES = {pa.string(): "string", pa.int64(): "int64", pa.float32(): "float32", pa.float16(): "float16"}
_ARROW = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32(), "float16": pa.float16()}

# How Parquet stores a tensor column (`output.parquet_encoding`), and who reads it. Measured
# by scripts/bench_encodings.py and tests/test_reader_conformance.py (README, "Reading the output").
PARQUET_ENCODINGS = {
    "portable": "nested fixed-size lists of float32 (float16 widened exactly), BYTE_STREAM_SPLIT",
    "arrow_tensor": "Arrow fixed_shape_tensor extension type, float16 kept, BYTE_STREAM_SPLIT (smallest files)",
    "nested_float16": "nested fixed-size lists, float16 kept (BYTE_STREAM_SPLIT on float32 only)",
    "list": "plain list<float32>, flat (float16 widened), BYTE_STREAM_SPLIT; shape only in metadata",
}
WIDENING = ("portable", "list")

# float16 → float32 by lookup over the 65,536 bit patterns, the table made by numpy's own
# conversion (so every value, NaN payloads included, widens to the same bits as `astype`):
# ~1 ns a value against ~6 ns for numpy's float16 `astype`, which was most of the cost of
# storing a float16 map with the `portable` encoding.
with np.errstate(invalid="ignore"):
    _F16_AS_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


_WIDEN_CHUNK = 1 << 16  # values per `take`: its intp copy of the indices (512 KB) stays in cache


def widen_float16(a: np.ndarray) -> np.ndarray:
    """float16 values → the same values as float32 (exact), as `a.astype(np.float32)`.

    In chunks into one output: a single `take` over a whole batch first copies every index
    to a fresh intp array (8 bytes a value, page faults included), which cost as much as the
    lookup; `mode="wrap"` because the default mode buffers `out` (every uint16 is in range)."""
    bits = np.ascontiguousarray(a).view(np.uint16).reshape(-1)
    out = np.empty(bits.size, dtype=np.float32)
    for start in range(0, bits.size, _WIDEN_CHUNK):
        np.take(_F16_AS_F32, bits[start : start + _WIDEN_CHUNK], out=out[start : start + _WIDEN_CHUNK], mode="wrap")
    return out.reshape(a.shape)


def unreadable_by(encoding: str | None, dtypes: Sequence[str]) -> dict[str, str]:
    """Readers that cannot open an output of this Parquet encoding whose outputs have
    `dtypes` (the configured dtypes), each with why; {} for the portable ones and TFRecord."""
    f16 = "float16" in dtypes
    if encoding == "arrow_tensor":
        out = {"Hugging Face datasets": "no datasets dtype for the fixed_shape_tensor extension type"}
        if f16:
            out["Spark"] = "Parquet FLOAT16 is an illegal type for Spark 4.x (the whole file fails)"
            out["DuckDB"] = "DuckDB 2.0 cannot decode BYTE_STREAM_SPLIT float16 (the float16 columns fail)"
        return out
    if encoding == "nested_float16" and f16:
        return {"Spark": "Parquet FLOAT16 is an illegal type for Spark 4.x (the whole file fails)"}
    return {}


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


def stored_bytes(spec, encoding: str = "portable") -> int:
    """One output's bytes per example as stored: the Parquet encodings `portable` and `list`
    widen float16 to float32 (bfloat16 is stored as float32 always, which
    `spec.bytes_per_example` counts); `arrow_tensor`, `nested_float16` and TFRecord
    (`encoding=None`) keep float16."""
    return spec.bytes_per_example * (2 if spec.dtype == "float16" and encoding in WIDENING else 1)


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


def _nested(value: pa.DataType, shape: Sequence[int]) -> pa.DataType:
    t = value
    for n in reversed(shape):
        t = pa.list_(t, int(n))
    return t


def stored_schema(schema: pa.Schema, encoding: str) -> pa.Schema:
    """The canonical schema (tensor columns as `fixed_shape_tensor`) as Parquet stores it
    under `encoding` (see `PARQUET_ENCODINGS`). Every tensor field carries its shape and
    logical dtype in its field metadata (`layerbeam.shape`, `layerbeam.dtype`), which the
    Parquet file keeps in its Arrow schema, next to the schema's `layerbeam.outputs`."""
    if encoding not in PARQUET_ENCODINGS:
        raise ValueError(f"output.parquet_encoding {encoding!r} is not one of {', '.join(PARQUET_ENCODINGS)}")
    outputs = _outputs_meta(schema)
    fields = []
    for f in schema:
        if not isinstance(f.type, pa.FixedShapeTensorType):
            fields.append(f)
            continue
        shape, value = list(f.type.shape), f.type.value_type
        if encoding in WIDENING:
            value = pa.float32()
        typ = {"portable": lambda: _nested(value, shape), "nested_float16": lambda: _nested(value, shape), "arrow_tensor": lambda: f.type, "list": lambda: pa.list_(value)}[encoding]()
        meta = {SHAPE_METADATA_KEY: json.dumps(shape).encode(), DTYPE_METADATA_KEY: outputs.get(f.name, {}).get("dtype", _ARROW_NAMES[f.type.value_type]).encode()}
        fields.append(pa.field(f.name, typ, nullable=False, metadata=meta))
    return pa.schema(fields, metadata=schema.metadata)


def tensor_leaf_paths(stored: pa.Schema) -> dict[str, tuple[str, pa.DataType]]:
    """Tensor column → (Parquet path of its values, value type): one `.list.element` per
    list level (`map.list.element.list.element` for a 2-D nested list); writer options
    given the bare column name are silently ignored."""
    out = {}
    for f in stored:
        t, path = f.type, f.name
        if isinstance(t, pa.FixedShapeTensorType):
            t = t.storage_type
        if not (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)):
            continue
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            t, path = t.value_type, path + ".list.element"
        out[f.name] = (path, t)
    return out


def to_stored_batch(stored: pa.Schema, batch: pa.RecordBatch) -> pa.RecordBatch:
    """A canonical batch (tensor columns) → `stored` (`stored_schema`): zero-copy where the
    values keep their type (nesting only adds offsets-free fixed-size list levels)."""
    arrays = []
    for field, col in zip(stored, batch.columns):
        if isinstance(col.type, pa.FixedShapeTensorType) and field.type != col.type:
            values = col.storage.flatten()
            leaf = _leaf_type(field.type)
            if values.type != leaf:
                v = values.to_numpy(zero_copy_only=False)
                v = widen_float16(v) if v.dtype == np.float16 and leaf == pa.float32() else v.astype(leaf.to_pandas_dtype())
                values = pa.array(v, type=leaf)
            col = _wrap(values, field.type, len(col))
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=stored)


def _leaf_type(t: pa.DataType) -> pa.DataType:
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return t


def _wrap(values: pa.Array, typ: pa.DataType, rows: int) -> pa.Array:
    """Flat values → `rows` cells of `typ` (nested fixed-size lists or a plain list)."""
    if pa.types.is_fixed_size_list(typ):
        return pa.FixedSizeListArray.from_arrays(_wrap(values, typ.value_type, len(values) // typ.list_size) if pa.types.is_fixed_size_list(typ.value_type) else values, typ.list_size)
    size = len(values) // max(rows, 1)
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * size), values, type=typ)


def flat_values(col) -> pa.Array:
    """Every value of a tensor column, row-major, whatever the storage (extension type,
    nested or flat fixed-size lists, plain lists)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(col.type, pa.BaseExtensionType):
        col = col.storage
    while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col = col.flatten()
    return col


def result_dtype(c: dict) -> str:
    """The dtype a reader gets back for a storage-spec column: the stored one, narrowed
    back (exactly) to float16 where a float16 output was widened."""
    if c["role"] == "output" and c.get("logical_dtype") == "float16":
        return "float16"
    return c["dtype"]


def read_schema(cols: Sequence[dict]) -> pa.Schema:
    """The schema `layerbeam.read` returns for these storage-spec columns: outputs as
    `fixed_shape_tensor` in their result dtype, scalars as stored."""
    fields = []
    for c in cols:
        t = _ARROW[result_dtype(c)]
        fields.append(pa.field(c["name"], pa.fixed_shape_tensor(t, c["shape"]) if c["role"] == "output" else t, nullable=False))
    return pa.schema(fields)


def column_numpy(col, c: dict) -> np.ndarray:
    """A stored column → numpy: scalars as they are, outputs (rows, *shape) in their result dtype."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if c["role"] != "output":
        return col.to_numpy(zero_copy_only=False)
    arr = flat_values(col).to_numpy(zero_copy_only=False).astype(result_dtype(c), copy=False)
    return arr.reshape((len(col), *c["shape"]))


def restore_column(col, c: dict):
    """A stored column (any encoding, old ones included) → its read-back type."""
    if c["role"] != "output":
        return col
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(col.type, pa.FixedShapeTensorType) and col.type.value_type == _ARROW[result_dtype(c)]:
        return col
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(column_numpy(col, c)))


def restore_table(table: pa.Table, cols: Sequence[dict]) -> pa.Table:
    """Stored columns → the table `layerbeam.read` returns (columns in `cols` order)."""
    return pa.table([restore_column(table.column(c["name"]), c) for c in cols], schema=read_schema(cols))


def table_from_numpy(batch: Mapping[str, np.ndarray], cols: Sequence[dict]) -> pa.Table:
    """{column: numpy batch} (outputs (rows, *shape)) → the read-back table."""
    arrays = []
    for c in cols:
        v = batch[c["name"]]
        if c["role"] == "output":
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v)))
        elif c["dtype"] == "string":
            arrays.append(pa.array(list(v), type=pa.binary()).cast(pa.string()))
        else:
            arrays.append(pa.array(v, type=_ARROW[c["dtype"]]))
    return pa.table(arrays, schema=read_schema(cols))


def _outputs_meta(schema: pa.Schema) -> dict[str, dict]:
    if schema.metadata and OUTPUTS_METADATA_KEY in schema.metadata:
        return {o["name"]: o for o in json.loads(schema.metadata[OUTPUTS_METADATA_KEY])}
    return {}


def storage_spec(schema: pa.Schema, fmt: str, partition_by: Sequence[str] = (), *, encoding: str | None = None, compression: str | None = None) -> dict:
    """How every column of an output is stored: the feature spec written to the manifest.

    Each column has `name`, `role` (column | partition | output), `dtype` (the value type
    in the files: string | int64 | float32 | float16), `shape` ([] for scalars) and, for
    outputs, `logical_dtype` (the configured dtype: a float16 output widened by the
    Parquet encoding, or a bfloat16 output, is stored as float32). Then per format:

    * `tfrecord`: `feature` (the tf.train.Example key) and `kind`: `bytes_list` (UTF-8
      strings), `int64_list`, `float_list` (the row-major values; a `shape_feature`
      int64_list holds the shape), or `raw_bytes` (one bytes value: the row-major values
      as little-endian `dtype`, for float16: `tf.io.decode_raw(x, tf.float16)` or
      `np.frombuffer(x, "<f2")`, then reshape). Outputs written before `raw_bytes` have
      `tensor_proto` (`tf.io.parse_tensor`).
    * `parquet`: `type` (`nested_list<float32|float16>`, `fixed_shape_tensor<…>`,
      `list<float32>`, or the scalar type) and `in`: `file`, `path` (Hive folder names
      only: outputs written before the columns were kept in the files) or `file+path`
      (both: readers that do not parse folder names still get the value).
    """
    outputs = _outputs_meta(schema)
    widened = fmt == "parquet" and encoding in WIDENING
    columns = []
    for f in schema:
        if isinstance(f.type, pa.FixedShapeTensorType):
            value = _ARROW_NAMES[f.type.value_type]
            stored = "float32" if widened else value
            col = {"name": f.name, "role": "output", "dtype": stored, "shape": list(f.type.shape), "logical_dtype": outputs.get(f.name, {}).get("dtype", value)}
            if fmt == "tfrecord":
                col["tfrecord"] = {"feature": f.name, "kind": "raw_bytes"} if value == "float16" else {"feature": f.name, "kind": "float_list", "shape_feature": f.name + SHAPE_SUFFIX}
            else:
                typ = {"portable": "nested_list", "nested_float16": "nested_list", "arrow_tensor": "fixed_shape_tensor", "list": "list"}[encoding]
                col["parquet"] = {"type": f"{typ}<{stored}>", "in": "file"}
        else:
            typ = _ARROW_NAMES.get(f.type)
            if typ is None:
                raise ValueError(f"column {f.name!r} has type {f.type}, which layerbeam cannot store; use int64, float32 or string")
            col = {"name": f.name, "role": "partition" if f.name in partition_by else "column", "dtype": typ, "shape": []}
            if fmt == "tfrecord":
                col["tfrecord"] = {"feature": f.name, "kind": {"string": "bytes_list", "int64": "int64_list", "float32": "float_list"}[typ]}
            else:
                col["parquet"] = {"type": typ, "in": "file+path" if f.name in partition_by else "file"}
        columns.append(col)
    spec = {"spec_version": 2, "format": fmt, "compression": compression, "partition_by": list(partition_by)}
    if fmt == "parquet":
        spec["encoding"] = encoding
    return dict(spec, columns=columns)
