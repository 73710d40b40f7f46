"""Write extracted rows: one shard's batches → data files in a staging folder, then one
atomic commit of every shard into the output directory.

The contract every format follows (`ShardWriter`): `write_shard(batches, dest)` receives
Arrow record batches of one input shard and a staging folder, writes them (Hive
partition folders inside), and returns the `WrittenFile`s; `storage_spec()` describes how
each column is stored, for the manifest, so that a reader needs no model. The pipeline
never branches on format beyond choosing the writer (`make_writer`). `OutputLayout` owns where staging,
markers and the final output live and performs the commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from transforms.readers import fsspec_fs

__all__ = [
    "WrittenFile",
    "ShardWriter",
    "ParquetShardWriter",
    "TFRecordShardWriter",
    "ExampleEncoder",
    "make_writer",
    "storage_spec",
    "compat_schema",
    "output_schema",
    "stored_bytes",
    "to_record_batch",
    "OutputLayout",
    "CommitError",
]

OUTPUTS_METADATA_KEY = b"layerbeam.outputs"


class CommitError(RuntimeError):
    """The run's results do not add up; nothing was committed."""


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """A data file as written: path relative to the output root, rows, bytes."""

    path: str
    rows: int
    bytes: int


class ShardWriter(Protocol):
    """Writes one input shard's rows under `dest` and says what it wrote."""

    extension: str

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]: ...

    def storage_spec(self) -> dict: ...


# --------------------------------------------------------------------------- arrow


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


# --------------------------------------------------------------------------- file systems


def arrow_fs(url: str):
    """(pyarrow FileSystem, path in it) for a local path or any URL pyarrow or fsspec knows."""
    from pyarrow import fs as pafs

    if "://" not in url:
        return pafs.LocalFileSystem(), url
    if url.startswith("file://"):
        return pafs.LocalFileSystem(), url[len("file://"):]
    try:
        return pafs.FileSystem.from_uri(url)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path




# --------------------------------------------------------------------------- parquet


class ParquetShardWriter:
    """Writes a shard's rows as Hive-partitioned Parquet with `pyarrow.dataset.write_dataset`.

    zstd (level 1 by default), BYTE_STREAM_SPLIT and no dictionary on tensor leaf columns
    (`<col>.list.element`: the bare column name is silently ignored), row groups sized by
    bytes with both a minimum and a maximum, and a cap on rows per file.

    Args:
        schema: the output schema (`output_schema`).
        partition_by: Hive partition columns.
        max_rows_per_file: rows per file at most.
        row_group_bytes: target uncompressed bytes per row group.
        compression, compression_level: the Parquet codec.
        compat: plain `list<float32>` columns (see `compat_schema`).
        float16_byte_stream_split: BYTE_STREAM_SPLIT on float16 tensors too. On real
            activations it writes them about 2.7× faster and 20% smaller with zstd, and
            pyarrow and polars read it; DuckDB 2.0 cannot decode such a column (its other
            columns it reads). Set False for DuckDB, or use `compat`.
    """

    extension = "parquet"

    def __init__(
        self,
        schema: pa.Schema,
        partition_by: Sequence[str] = (),
        max_rows_per_file: int = 100_000,
        row_group_bytes: int = 64 << 20,
        compression: str = "zstd",
        compression_level: int | None = 1,
        compat: bool = False,
        float16_byte_stream_split: bool = True,
    ):
        self.source_schema = schema
        self.compat = compat
        self.schema = schema = compat_schema(schema) if compat else schema
        self.partition_by = tuple(partition_by)
        tensor_cols = [f.name for f in self.source_schema if isinstance(f.type, pa.FixedShapeTensorType)]
        width = {c: 4 if compat else self.source_schema.field(c).type.value_type.bit_width // 8 for c in tensor_cols}
        row_bytes = sum(int(np.prod(self.source_schema.field(c).type.shape)) * width[c] for c in tensor_cols) + 64
        rows = max(1, row_group_bytes // row_bytes)
        self.max_rows_per_group = int(min(rows, max_rows_per_file, 1 << 20))
        self.min_rows_per_group = max(1, self.max_rows_per_group // 2)
        self.max_rows_per_file = max_rows_per_file
        self.compression = None if compression == "none" else compression
        self.compression_level = compression_level if self.compression in ("zstd", "gzip") else None
        self.byte_stream_split = [f"{c}.list.element" for c in tensor_cols if width[c] == 4 or float16_byte_stream_split]
        self.dictionary = [f.name for f in schema if f.name not in tensor_cols]

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]:
        import pyarrow.dataset as ds

        filesystem, root = arrow_fs(dest)
        fmt = ds.ParquetFileFormat()
        options = fmt.make_write_options(
            compression=self.compression,
            compression_level=self.compression_level,
            use_dictionary=self.dictionary,
            use_byte_stream_split=self.byte_stream_split or False,
            write_statistics=self.dictionary,
        )
        written: list[WrittenFile] = []

        def visit(f):
            rel = posixpath.relpath(f.path, root)
            written.append(WrittenFile(rel, f.metadata.num_rows, f.size if hasattr(f, "size") else 0))

        if self.compat:
            batches = (to_compat_batch(self.schema, b) for b in batches)
        reader = pa.RecordBatchReader.from_batches(self.schema, iter(batches))
        ds.write_dataset(
            reader,
            root,
            format=fmt,
            file_options=options,
            filesystem=filesystem,
            partitioning=ds.partitioning(self.schema.empty_table().select(list(self.partition_by)).schema, flavor="hive") if self.partition_by else None,
            basename_template=f"{basename}-{{i}}.parquet",
            existing_data_behavior="overwrite_or_ignore",
            max_rows_per_file=self.max_rows_per_file,
            max_rows_per_group=self.max_rows_per_group,
            min_rows_per_group=self.min_rows_per_group,
            max_partitions=1 << 16,
            use_threads=True,
            file_visitor=visit,
        )
        # Verify: every reported file exists with its size (never trust a writer blindly).
        out = []
        for w in written:
            info = filesystem.get_file_info(posixpath.join(root, w.path))
            if info.type.name != "File":
                raise CommitError(f"the Parquet writer reported {w.path!r} under {dest!r}, but the file is missing")
            out.append(dataclasses.replace(w, bytes=info.size))
        return out

    def storage_spec(self) -> dict:
        return storage_spec(self.source_schema, "parquet", self.partition_by, compat=self.compat, compression=self.compression)


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


def make_writer(output_cfg, schema: pa.Schema) -> ShardWriter:
    """The writer for `output.format` — the one place that knows the formats."""
    if output_cfg.format == "parquet":
        return ParquetShardWriter(
            schema,
            partition_by=output_cfg.partition_by,
            max_rows_per_file=output_cfg.max_rows_per_file,
            row_group_bytes=output_cfg.row_group_bytes,
            compression=output_cfg.compression,
            compression_level=output_cfg.compression_level,
            compat=output_cfg.parquet_compat,
            float16_byte_stream_split=output_cfg.float16_byte_stream_split,
        )
    if output_cfg.format == "tfrecord":
        return TFRecordShardWriter(
            schema,
            partition_by=output_cfg.partition_by,
            max_rows_per_file=output_cfg.max_rows_per_file,
            max_bytes_per_file=output_cfg.max_bytes_per_file,
            compression=output_cfg.tfrecord_compression,
        )
    raise ValueError(f"output.format {output_cfg.format!r} has no writer")


# --------------------------------------------------------------------------- storage spec

SHAPE_SUFFIX = ".shape"
_ARROW_NAMES = {pa.string(): "string", pa.int64(): "int64", pa.float32(): "float32", pa.float16(): "float16"}


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


# --------------------------------------------------------------------------- tfrecord
#
# A tf.train.Example is written straight in protobuf wire format: per column, the bytes
# in front of the values are the same for every row (tag, lengths, key), so a row is one
# `b"".join` of precomputed prefixes and slices of the batch's value buffer. Building
# `tf.train.FloatList(value=array)` through the protobuf API instead runs ~100 MB/s.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(length)


def _entry(key: bytes, feature_prefix: bytes, feature_len: int) -> tuple[bytes, int]:
    """(bytes before the values, total length) of one `Features.feature` map entry."""
    head = _ld(1, len(key)) + key + _ld(2, feature_len)
    body_len = len(head) + feature_len
    return _ld(1, body_len) + head + feature_prefix, len(_ld(1, body_len)) + body_len


def _float_feature_prefix(nbytes: int) -> tuple[bytes, int]:
    inner = _ld(1, nbytes)  # FloatList.value, packed
    prefix = _ld(2, len(inner) + nbytes) + inner  # Feature.float_list
    return prefix, len(prefix) + nbytes


def _bytes_feature(value: bytes) -> bytes:
    body = _ld(1, len(value)) + value  # BytesList.value
    return _ld(1, len(body)) + body  # Feature.bytes_list


def _int64_feature(values: Iterable[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    body = _ld(1, len(packed)) + packed  # Int64List.value, packed
    return _ld(3, len(body)) + body  # Feature.int64_list


def _tensor_proto_prefix(shape: Sequence[int], nbytes: int) -> bytes:
    """TensorProto (DT_HALF) up to its `tensor_content`, as `tf.io.serialize_tensor` writes it."""
    dims = b"".join(_ld(2, len(d)) + d for d in (b"\x08" + _varint(int(n)) if n else b"" for n in shape))
    return b"\x08\x13" + _ld(2, len(dims)) + dims + _ld(4, nbytes)  # dtype=DT_HALF(19), tensor_shape, tensor_content


class ExampleEncoder:
    """Arrow record batches (the output schema) → serialized `tf.train.Example`s.

    Tensor columns: float32 as a `float_list` (plus a constant `<name>.shape` int64_list),
    float16 as a bytes feature holding a TensorProto (`tf.io.parse_tensor(x, tf.float16)`),
    so nothing is widened. Scalars: string → bytes_list, int64 → int64_list, float32 →
    float_list. The result parses with `tf.io.parse_single_example` like any Example.
    """

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._fixed: list[tuple[str, bytes, int, int]] = []  # (column, prefix, row bytes, entry length)
        self._var: list[tuple[str, str, bytes]] = []  # (column, arrow type name, key)
        const = []
        names = set(schema.names)
        for f in schema:
            key = f.name.encode()
            if isinstance(f.type, pa.FixedShapeTensorType):
                shape = list(f.type.shape)
                size = int(np.prod(shape))
                if f.type.value_type == pa.float16():
                    tp = _tensor_proto_prefix(shape, size * 2)
                    value_len = len(tp) + size * 2
                    body = _ld(1, value_len) + tp  # BytesList.value = the TensorProto
                    body_len = len(_ld(1, value_len)) + value_len
                    prefix = _ld(1, body_len) + body
                    self._fixed.append((f.name, *self._entry(key, prefix, len(_ld(1, body_len)) + body_len, size * 2)))
                else:
                    prefix, flen = _float_feature_prefix(size * 4)
                    self._fixed.append((f.name, *self._entry(key, prefix, flen, size * 4)))
                    shape_key = f.name + SHAPE_SUFFIX
                    if shape_key in names:
                        raise ValueError(f"column {shape_key!r} collides with the shape feature of output {f.name!r}; rename the column or the output")
                    feat = _int64_feature(shape)
                    const.append(_entry(shape_key.encode(), feat, len(feat))[0])
            elif f.type == pa.float32():
                prefix, flen = _float_feature_prefix(4)
                self._fixed.append((f.name, *self._entry(key, prefix, flen, 4)))
            elif f.type in (pa.string(), pa.int64()):
                self._var.append((f.name, _ARROW_NAMES[f.type], key))
            else:
                raise ValueError(f"column {f.name!r} has type {f.type}, which the TFRecord writer cannot store; use int64, float32 or string")
        self._const = b"".join(const)
        self._fixed_len = len(self._const) + sum(e for *_, e in self._fixed)

    @staticmethod
    def _entry(key: bytes, prefix: bytes, feature_len: int, row_bytes: int) -> tuple[bytes, int, int]:
        entry_prefix, entry_len = _entry(key, prefix, feature_len)
        return entry_prefix, row_bytes, entry_len

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        """Serialize every row of `batch` (whose schema is this encoder's)."""
        n = batch.num_rows
        fixed = []
        for name, prefix, row_bytes, _ in self._fixed:
            col = batch.column(name)
            values = col.storage.flatten() if isinstance(col.type, pa.FixedShapeTensorType) else col
            arr = np.ascontiguousarray(values.to_numpy(zero_copy_only=False))
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            fixed.append((prefix, memoryview(arr.view(np.uint8).reshape(-1)), row_bytes))
        var = []
        for name, typ, key in self._var:
            col = batch.column(name)
            if typ == "string":
                feats = [_bytes_feature(v) for v in (col.cast(pa.binary()).to_pylist())]
            else:
                feats = [_int64_feature((v,)) for v in col.to_pylist()]
            var.append([_entry(key, ft, len(ft))[0] for ft in feats])
        out = []
        const, fixed_len = self._const, self._fixed_len
        for i in range(n):
            parts: list = [b""]
            size = fixed_len
            for prefix, buf, rb in fixed:
                parts.append(prefix)
                parts.append(buf[i * rb : (i + 1) * rb])
            for entries in var:
                e = entries[i]
                parts.append(e)
                size += len(e)
            parts.append(const)
            parts[0] = _ld(1, size)  # Example.features
            out.append(b"".join(parts))
        return out


class TFRecordShardWriter:
    """Writes a shard's rows as TFRecord files of `tf.train.Example`s, Hive-partitioned.

    One Example per row with every column (partition columns included, so a file read on
    its own is complete). A new file starts after `max_rows_per_file` rows or
    `max_bytes_per_file` serialized bytes, per partition folder. Files are written with
    TensorFlow's `TFRecordWriter` (C++ framing and CRCs); on a non-local destination they
    are written to a local temporary folder and uploaded.

    Args:
        schema: the output schema (`output_schema`).
        partition_by: Hive partition columns.
        max_rows_per_file: rows per file at most.
        max_bytes_per_file: serialized bytes per file at most (before compression); a
            single larger record still gets a file of its own.
        compression: "none" or "gzip" (files end in `.tfrecord.gz`).
    """

    def __init__(
        self,
        schema: pa.Schema,
        partition_by: Sequence[str] = (),
        max_rows_per_file: int = 100_000,
        max_bytes_per_file: int = 256 << 20,
        compression: str = "none",
    ):
        self.schema = schema
        self.partition_by = tuple(partition_by)
        self.max_rows_per_file = max_rows_per_file
        self.max_bytes_per_file = max_bytes_per_file
        self.compression = "GZIP" if compression.lower() == "gzip" else ""
        self.extension = "tfrecord.gz" if self.compression else "tfrecord"
        self.encoder = ExampleEncoder(schema)

    def storage_spec(self) -> dict:
        return storage_spec(self.schema, "tfrecord", self.partition_by, compression=self.compression or None)

    def _groups(self, batch: pa.RecordBatch) -> list[tuple[str, list[int]]]:
        if not self.partition_by:
            return [("", list(range(batch.num_rows)))]
        from urllib.parse import quote

        groups: dict[str, list[int]] = {}
        cols = [batch.column(c).to_pylist() for c in self.partition_by]
        for i, values in enumerate(zip(*cols)):
            d = "/".join(f"{c}={quote(str(v), safe='')}" for c, v in zip(self.partition_by, values))
            groups.setdefault(d, []).append(i)
        return list(groups.items())

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]:
        import os
        import shutil
        import tempfile

        import tensorflow as tf

        local = dest[len("file://"):] if dest.startswith("file://") else dest
        tmp = None
        if "://" in local:
            tmp = local = tempfile.mkdtemp(prefix="layerbeam-tfrecord-")
        # zlib level 1: float activations barely compress, so a higher level only costs time.
        options = tf.io.TFRecordOptions(compression_type=self.compression, compression_level=1 if self.compression else None)
        open_files: dict[str, list] = {}  # partition folder → [writer, relative path, rows, bytes]
        closed: list[tuple[str, int]] = []
        counter = 0
        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                records = self.encoder.encode(batch)
                for folder, rows in self._groups(batch):
                    for i in rows:
                        rec = records[i]
                        f = open_files.get(folder)
                        if f is not None and (f[2] >= self.max_rows_per_file or (f[3] and f[3] + len(rec) > self.max_bytes_per_file)):
                            f[0].close()
                            closed.append((f[1], f[2]))
                            f = None
                        if f is None:
                            rel = posixpath.join(folder, f"{basename}-{counter}.{self.extension}") if folder else f"{basename}-{counter}.{self.extension}"
                            counter += 1
                            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
                            f = open_files[folder] = [tf.io.TFRecordWriter(os.path.join(local, rel), options), rel, 0, 0]
                        f[0].write(rec)
                        f[2] += 1
                        f[3] += len(rec)
            for f in open_files.values():
                f[0].close()
                closed.append((f[1], f[2]))
            written = [WrittenFile(rel, rows, os.path.getsize(os.path.join(local, rel))) for rel, rows in closed]
            if tmp is not None:
                fs, root = fsspec_fs(dest)
                for w in written:
                    target = posixpath.join(root, w.path)
                    fs.makedirs(posixpath.dirname(target), exist_ok=True)
                    fs.put(os.path.join(local, w.path), target)
            return written
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- layout & commit


class OutputLayout:
    """Where a run's files live, the lock, and the commit that makes them visible at once.

    ```
    <out>/                              the committed output (readers look here)
    <out>.layerbeam-staging/
        _lock                           held by the run writing <out>: pid, host, run
        <run>/                          one run (run = config + model + input shards fingerprint)
            _run.json                   what the run is: config, model fingerprint, shards
            shards/<shard>/...          one input shard's data files (deterministic names)
            shards/<shard>.done.json    the shard's marker: counts and files
            dead/<shard>.parquet        the shard's dead letters
            keys/<shard>.npz            the shard's key hashes and record indices
            final/                      the output as assembled by the commit
    ```

    Commit, in two steps. `assemble` moves (or, for shards that lose rows to keys repeated
    across shards, copies and filters) every shard's files into `<run>/final/`; it can be
    repeated after a crash: a file already moved is found at its destination.
    `publish` writes the manifest and `_SUCCESS` there and, on a local file system,
    renames the folder to `<out>` in one step (an old output is first renamed aside, then
    deleted; between the two renames a reader finds no output, never a mix). On object
    stores, where no folder rename exists, files are copied in and `_manifest.json` and
    `_SUCCESS` come last: readers must wait for `_SUCCESS`.
    """

    MANIFEST = "_manifest.json"
    SUCCESS = "_SUCCESS"
    DEAD_DIR = "_dead_letters"
    LOCK = "_lock"
    RUN_INFO = "_run.json"

    def __init__(self, out: str, run_id: str):
        # file:///x is /x: the local commit renames with os.* calls, which take plain paths
        self.out = (out[len("file://"):] if out.startswith("file://") else out).rstrip("/")
        self.run_id = run_id
        self.staging_root = f"{self.out}.layerbeam-staging"
        self.run_dir = f"{self.staging_root}/{run_id}"
        self.fs, _ = fsspec_fs(self.out)

    # ------------------------------------------------------------------ per shard

    def shard_dir(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}"

    def marker(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}.done.json"

    def dead_file(self, shard_id: str) -> str:
        return f"{self.run_dir}/dead/{shard_id}.parquet"

    def keys_file(self, shard_id: str) -> str:
        return f"{self.run_dir}/keys/{shard_id}.npz"

    def clear_shard(self, shard_id: str) -> None:
        """Remove a shard's partial files before (re)writing it: a retried bundle or a
        resumed run rewrites the shard from scratch, never appends to it."""
        for p in (self.marker(shard_id), self.shard_dir(shard_id), self.dead_file(shard_id), self.keys_file(shard_id)):
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def read_marker(self, shard_id: str) -> dict | None:
        p = self.marker(shard_id)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_marker(self, shard_id: str, result: Mapping) -> None:
        self._write_atomic(self.marker(shard_id), json.dumps(result).encode())

    def write_keys(self, shard_id: str, hashes: np.ndarray, index: np.ndarray) -> None:
        """Store the key hashes (`S16`) of the rows a shard wrote, with their record indices."""
        import io

        buf = io.BytesIO()
        np.savez(buf, hash=hashes.astype("S16"), index=index.astype(np.int64))
        self._write_atomic(self.keys_file(shard_id), buf.getvalue())

    def read_keys(self, shard_id: str) -> tuple[np.ndarray, np.ndarray]:
        import io

        with self.fs.open(self.keys_file(shard_id), "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            return z["hash"], z["index"]

    def _write_atomic(self, path: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)

    # ------------------------------------------------------------------ the run

    def is_complete(self) -> bool:
        return self.fs.exists(f"{self.out}/{self.SUCCESS}")

    def committed_run_id(self) -> str | None:
        """The run id in the committed output's manifest, if there is one."""
        try:
            with self.fs.open(f"{self.out}/{self.MANIFEST}", "r") as f:
                return json.load(f).get("run_id")
        except (OSError, ValueError):
            return None

    def has_foreign_files(self) -> bool:
        """`<out>` holds files but no `_SUCCESS`: not a complete layerbeam output."""
        return self.fs.exists(self.out) and not self.is_complete() and bool(self.fs.ls(self.out))

    def other_runs(self) -> list[str]:
        """Run ids of other (half-built) runs staged for the same output."""
        if not self.fs.exists(self.staging_root):
            return []
        out = []
        for p in self.fs.ls(self.staging_root, detail=True):
            name = posixpath.basename(p["name"].rstrip("/"))
            if p["type"] == "directory" and name != self.run_id and not name.startswith(("old-", "_", ".")):
                out.append(name)
        return sorted(out)

    def read_run_info(self, run_id: str | None = None) -> dict | None:
        p = f"{self.staging_root}/{run_id or self.run_id}/{self.RUN_INFO}"
        try:
            with self.fs.open(p, "r") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write_run_info(self, info: Mapping) -> None:
        self._write_atomic(f"{self.run_dir}/{self.RUN_INFO}", json.dumps(info, sort_keys=True).encode())

    def discard_runs(self, run_ids: Sequence[str]) -> None:
        for r in run_ids:
            p = f"{self.staging_root}/{r}"
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    # ------------------------------------------------------------------ the lock

    @property
    def lock_path(self) -> str:
        return f"{self.staging_root}/{self.LOCK}"

    def lock_holder(self) -> dict | None:
        """Who holds the output's lock, if anyone still alive does.

        Staleness: a lock taken on this host by a process that no longer exists is stale
        (a killed run); a lock from another host is never judged stale here: its message
        says which file to delete once that run is known to be gone.
        """
        try:
            with self.fs.open(self.lock_path, "r") as f:
                holder = json.load(f)
        except OSError:  # no lock (or no staging folder: the writability check says why)
            return None
        except ValueError:  # a half-written lock: someone is taking it right now
            return {"pid": None, "host": "?", "run_id": "?", "since": "?"}
        if holder.get("host") == _host() and not _pid_alive(holder.get("pid")):
            return None
        return holder

    def locked_error(self, holder: Mapping):
        """The one-line refusal when another run (`holder`, from `lock_holder`) writes here."""
        from transforms.errors import ConfigError

        return ConfigError(
            f"output {self.out!r} is being written by another run (pid {holder.get('pid')} on {holder.get('host')}, "
            f"run {holder.get('run_id')}, since {holder.get('since')}); wait for it to finish, or if it is gone delete {self.lock_path}"
        )

    def acquire_lock(self) -> None:
        """Take the output's lock, or raise `ConfigError` naming the run that holds it.

        On a local file system the lock file is created with O_CREAT|O_EXCL, so two runs
        starting together cannot both get it. On object stores the check and the write are
        two steps (no exclusive create): do not start two runs for one output at once.
        """
        from transforms.errors import ConfigError

        me = {"pid": os.getpid(), "host": _host(), "run_id": self.run_id, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = json.dumps(me).encode()
        for _ in range(2):
            holder = self.lock_holder()
            if holder is not None:
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return
                raise self.locked_error(holder)
            if self.fs.exists(self.lock_path):  # stale: its process is gone
                self.fs.rm(self.lock_path)
            self.fs.makedirs(self.staging_root, exist_ok=True)
            if _is_local(self.fs):
                try:
                    fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue  # another run got there first; look at it again
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return
            with self.fs.open(self.lock_path, "wb") as f:
                f.write(data)
            return
        raise ConfigError(f"could not take the lock {self.lock_path}; another run is starting for {self.out!r}; try again")

    def release_lock(self) -> None:
        """Drop the lock (if this process holds it) and the staging root if nothing is left."""
        try:
            with self.fs.open(self.lock_path, "r") as f:
                holder = json.load(f)
            if holder.get("pid") == os.getpid() and holder.get("host") == _host():
                self.fs.rm(self.lock_path)
        except (OSError, ValueError):
            pass
        try:
            if self.fs.exists(self.staging_root) and not [p for p in self.fs.ls(self.staging_root) if not posixpath.basename(p.rstrip("/")).startswith(".probe")]:
                self.fs.rm(self.staging_root, recursive=True)
        except OSError:
            pass

    # ------------------------------------------------------------------ commit

    def assemble(self, results: Sequence[Mapping], drop: Mapping[str, Mapping[bytes, Mapping]] | None = None) -> list[dict]:
        """Bring every shard's files into `<run>/final/`; return the results with the files'
        final row counts and sizes.

        Args:
            results: the shards' results (markers).
            drop: shard id → {key hash: dead-letter row}: rows to leave out of that shard
                (keys an earlier shard wrote) and the dead letters they become. Such a
                shard's files are copied with the rows filtered out; its staged files stay,
                so a repeated commit gives the same result.
        """
        drop = drop or {}
        final = f"{self.run_dir}/final"
        self.fs.makedirs(final, exist_ok=True)
        out = []
        for r in sorted(results, key=lambda r: r["shard"]):
            r = dict(r)
            gone = {h: dict(d) for h, d in drop.get(r["shard"], {}).items()}
            files = []
            for f in r["files"]:
                src = f"{self.shard_dir(r['shard'])}/{f['path']}"
                dst = f"{final}/{f['final_path']}"
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                if gone:
                    rows = _rewrite_without(self.fs, src, dst, gone)
                    files.append(dict(f, rows=rows, bytes=self.fs.size(dst)))
                    continue
                if self.fs.exists(src):
                    self.fs.mv(src, dst)
                elif not self.fs.exists(dst):
                    raise CommitError(f"shard {r['shard']}: staged file {src} is missing and was not moved to {dst}; delete {self.run_dir} and run again")
                files.append(dict(f))  # rows and bytes as the writer verified them
            r["files"] = files
            r["rows"] = sum(f["rows"] for f in files)
            dead_src = self.dead_file(r["shard"])
            dead_dst = f"{final}/{self.DEAD_DIR}/{r['shard']}.parquet"
            if gone:
                from transforms.beam import DEAD_LETTER_SCHEMA

                extra = pa.Table.from_pylist(sorted(gone.values(), key=lambda d: d["index"]), schema=DEAD_LETTER_SCHEMA)
                staged = _read_parquet(self.fs, dead_src) if self.fs.exists(dead_src) else DEAD_LETTER_SCHEMA.empty_table()
                self.fs.makedirs(posixpath.dirname(dead_dst), exist_ok=True)
                _write_parquet_like(self.fs, None, dead_dst, pa.concat_tables([staged.cast(DEAD_LETTER_SCHEMA), extra]))
                r["dead_letters"] = r["dead_letters"] + len(gone)
                reasons = dict(r["dead_reasons"])
                reasons["duplicate_key"] = reasons.get("duplicate_key", 0) + len(gone)
                r["dead_reasons"] = reasons
            elif self.fs.exists(dead_src):
                self.fs.makedirs(posixpath.dirname(dead_dst), exist_ok=True)
                self.fs.mv(dead_src, dead_dst)
            out.append(r)
        return out

    def publish(self, manifest: Mapping, overwrite: bool) -> None:
        """Write the manifest and `_SUCCESS` into the assembled output and put it in place."""
        final = f"{self.run_dir}/final"
        with self.fs.open(f"{final}/{self.MANIFEST}", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
        with self.fs.open(f"{final}/{self.SUCCESS}", "w") as f:
            f.write("")
        self._publish(final, overwrite)
        self.fs.rm(self.run_dir, recursive=True)

    def commit(self, results: Sequence[Mapping], manifest: Mapping, overwrite: bool) -> None:
        """`assemble` then `publish` (no rows dropped)."""
        self.assemble(results)
        self.publish(manifest, overwrite)

    def _publish(self, final: str, overwrite: bool) -> None:
        exists = self.fs.exists(self.out)
        if exists and not overwrite and self.fs.ls(self.out):
            raise CommitError(f"output {self.out!r} appeared during the run; nothing was replaced. Re-run with --overwrite to replace it")
        if _is_local(self.fs):
            old = f"{self.staging_root}/old-{uuid.uuid4().hex[:8]}"
            if exists:
                os.rename(self.out, old)
            os.rename(final, self.out)
            if exists:
                self.fs.rm(old, recursive=True)
            return
        if exists:
            self.fs.rm(self.out, recursive=True)
        files = [p for p in self.fs.find(final) if not p.endswith((self.MANIFEST, self.SUCCESS))]
        for p in files:
            rel = posixpath.relpath(p, final.split("://", 1)[-1] if "://" in final else final)
            self.fs.mv(p, f"{self.out}/{rel}")
        for name in (self.MANIFEST, self.SUCCESS):
            self.fs.mv(f"{final}/{name}", f"{self.out}/{name}")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _host() -> str:
    import socket

    return socket.gethostname()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unreadable: assume alive, the message says what to delete
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rewrite_without(fs, src: str, dst: str, gone: dict[bytes, dict]) -> int:
    """Copy data file `src` to `dst` without the rows whose key hash is in `gone` (filling
    in each dropped row's key); return the rows kept. Parquet or TFRecord, by extension.
    A rare path (keys repeated across shards), so plain per-row Python is fine here."""
    from transforms.beam import key_hashes

    def note(keys) -> np.ndarray:
        hashes = key_hashes(keys)
        for k, h in zip(keys, hashes.tolist()):
            if h in gone:
                gone[h]["key"] = k.decode() if isinstance(k, bytes) else k
        return ~np.isin(hashes, np.array(list(gone), dtype=hashes.dtype))

    if src.endswith(".parquet"):
        table = _read_parquet(fs, src)
        keep = note(table.column("key").to_pylist())
        _write_parquet_like(fs, src, dst, table.filter(pa.array(keep)))
        return int(keep.sum())
    if src.endswith((".tfrecord", ".tfrecord.gz")):
        import os
        import tempfile

        import tensorflow as tf

        compression = "GZIP" if src.endswith(".gz") else ""
        with tempfile.TemporaryDirectory(prefix="layerbeam-dedupe-") as tmp:
            local_in, local_out = os.path.join(tmp, "in"), os.path.join(tmp, "out")
            fs.get(src, local_in)
            records = [r.numpy() for r in tf.data.TFRecordDataset(local_in, compression_type=compression or None)]
            keys = [tf.train.Example.FromString(r).features.feature["key"].bytes_list.value[0] for r in records]
            keep = note(keys)
            with tf.io.TFRecordWriter(local_out, options=tf.io.TFRecordOptions(compression_type=compression)) as w:
                for r, k in zip(records, keep):
                    if k:
                        w.write(r)
            fs.put(local_out, dst)
        return int(keep.sum())
    raise CommitError(f"cannot filter repeated keys out of {src!r}: unknown data file type")


def _read_parquet(fs, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _write_parquet_like(fs, template: str | None, path: str, table: pa.Table) -> None:
    """Write `table` to `path` atomically, with the codec and row groups of `template`."""
    import pyarrow.parquet as pq

    kwargs = {}
    if template is not None:
        md = pq.read_metadata(fs.open(template, "rb"))
        if md.num_row_groups:
            rg = md.row_group(0)
            col = rg.column(0)
            kwargs["compression"] = col.compression.lower() if col.compression != "UNCOMPRESSED" else "none"
            kwargs["row_group_size"] = max(1, rg.num_rows)
            cols = [rg.column(i) for i in range(rg.num_columns)]
            # the writer's encodings, so one output does not mix two storages of a column
            kwargs["use_byte_stream_split"] = [c.path_in_schema for c in cols if "BYTE_STREAM_SPLIT" in c.encodings] or False
            kwargs["use_dictionary"] = [c.path_in_schema for c in cols if c.has_dictionary_page] or False
            if kwargs["compression"] == "zstd":
                kwargs["compression_level"] = 1  # the writers' default; Parquet does not record the level
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, **kwargs)
    fs.mv(tmp, path)
