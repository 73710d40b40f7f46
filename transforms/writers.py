"""Write extracted rows: one shard's batches → data files in a staging folder, then one
atomic commit of every shard into the output directory.

The contract every format follows (`ShardWriter`): `write_shard(batches, dest)` receives
Arrow record batches of one input shard and a staging folder, writes them (Hive
partition folders inside), and returns the `WrittenFile`s. The pipeline never branches on
format beyond choosing the writer (`make_writer`). `OutputLayout` owns where staging,
markers and the final output live and performs the commit.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

__all__ = [
    "WrittenFile",
    "ShardWriter",
    "ParquetShardWriter",
    "make_writer",
    "output_schema",
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


# --------------------------------------------------------------------------- arrow


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


def fsspec_fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


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
    ):
        self.schema = schema
        self.partition_by = tuple(partition_by)
        tensor_cols = [f.name for f in schema if isinstance(f.type, pa.FixedShapeTensorType)]
        row_bytes = sum(int(np.prod(schema.field(c).type.shape)) * schema.field(c).type.value_type.bit_width // 8 for c in tensor_cols) + 64
        rows = max(1, row_group_bytes // row_bytes)
        self.max_rows_per_group = int(min(rows, max_rows_per_file, 1 << 20))
        self.min_rows_per_group = max(1, self.max_rows_per_group // 2)
        self.max_rows_per_file = max_rows_per_file
        self.compression = None if compression == "none" else compression
        self.compression_level = compression_level if self.compression in ("zstd", "gzip") else None
        # Not on float16: DuckDB (2.0) refuses BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY.
        self.byte_stream_split = [f"{c}.list.element" for c in tensor_cols if schema.field(c).type.value_type == pa.float32()]
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
        )
    raise ValueError(f"output.format {output_cfg.format!r} has no writer")


# --------------------------------------------------------------------------- layout & commit


class OutputLayout:
    """Where a run's files live, and the commit that makes them visible at once.

    ```
    <out>/                              the committed output (readers look here)
    <out>.layerbeam-staging/<run>/      staging for one run (run = config+model fingerprint)
        shards/<shard>/...              one input shard's data files
        shards/<shard>.done.json        the shard's marker: counts and files
        dead/<shard>.parquet            the shard's dead letters
    ```

    Commit: every shard's files are moved into `<run>/final/` with their final names, the
    manifest and `_SUCCESS` are written there, and on a local file system the folder is
    renamed to `<out>` in one step (an old output is swapped out, then deleted). On object
    stores, where no folder rename exists, files are moved in and `_manifest.json` and
    `_SUCCESS` come last: readers must wait for `_SUCCESS`.
    """

    MANIFEST = "_manifest.json"
    SUCCESS = "_SUCCESS"
    DEAD_DIR = "_dead_letters"

    def __init__(self, out: str, run_id: str):
        self.out = out.rstrip("/")
        self.staging_root = f"{self.out}.layerbeam-staging"
        self.run_dir = f"{self.staging_root}/{run_id}"
        self.fs, _ = fsspec_fs(self.out)

    def shard_dir(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}"

    def marker(self, shard_id: str) -> str:
        return f"{self.run_dir}/shards/{shard_id}.done.json"

    def dead_file(self, shard_id: str) -> str:
        return f"{self.run_dir}/dead/{shard_id}.parquet"

    def clear_shard(self, shard_id: str) -> None:
        """Remove a shard's partial files before (re)writing it: a retried bundle or a
        resumed run rewrites the shard from scratch, never appends to it."""
        for p in (self.shard_dir(shard_id), self.dead_file(shard_id), self.marker(shard_id)):
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def read_marker(self, shard_id: str) -> dict | None:
        p = self.marker(shard_id)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return json.load(f)

    def write_marker(self, shard_id: str, result: Mapping) -> None:
        tmp = f"{self.marker(shard_id)}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "w") as f:
            json.dump(result, f)
        self.fs.mv(tmp, self.marker(shard_id))

    def is_complete(self) -> bool:
        return self.fs.exists(f"{self.out}/{self.SUCCESS}")

    def commit(self, results: Sequence[Mapping], manifest: Mapping, overwrite: bool) -> None:
        """Move every shard's files into place and write the manifest and `_SUCCESS`."""
        final = f"{self.run_dir}/final"
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        for r in sorted(results, key=lambda r: r["shard"]):
            for f in r["files"]:
                src = f"{self.shard_dir(r['shard'])}/{f['path']}"
                dst = f"{final}/{f['final_path']}"
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                self.fs.mv(src, dst)
            if r.get("dead_letters"):
                dst = f"{final}/{self.DEAD_DIR}/{r['shard']}.parquet"
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                self.fs.mv(self.dead_file(r["shard"]), dst)
        self.fs.makedirs(final, exist_ok=True)
        with self.fs.open(f"{final}/{self.MANIFEST}", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
        with self.fs.open(f"{final}/{self.SUCCESS}", "w") as f:
            f.write("")
        self._publish(final, overwrite)
        self.fs.rm(self.staging_root, recursive=True)

    def _publish(self, final: str, overwrite: bool) -> None:
        exists = self.fs.exists(self.out)
        if exists and not overwrite and self.fs.ls(self.out):
            raise CommitError(f"output {self.out!r} appeared during the run; nothing was replaced. Re-run with --overwrite to replace it")
        local = getattr(self.fs, "protocol", None) in ("file", ("file", "local")) or "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if local:
            import os

            old = f"{self.staging_root}/old-{int(time.time())}"
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
