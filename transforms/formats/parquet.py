"""Parquet: one shard's rows as Hive-partitioned Parquet files (`pyarrow.parquet.ParquetWriter`), and reading them back."""

from __future__ import annotations

import dataclasses
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .._fs import arrow_fs, content_id, fsspec_fs
from ..errors import CommitError
from ..schema import _ARROW, read_schema, restore_table, storage_spec, stored_schema, tensor_leaf_paths, to_stored_batch
from . import WriteSpec, WrittenFile, tables_tf_dataset

__all__ = ["ParquetShardWriter", "writer", "rewrite_without", "read_parquet", "read_tables", "tf_dataset", "arrow_dataset", "sidecars", "final_paths"]


class ParquetShardWriter:
    """Writes a shard's rows as Hive-partitioned Parquet files.

    Tensor columns are stored as `encoding` says (`schema.PARQUET_ENCODINGS`; `portable`
    by default: nested fixed-size lists of float32 that every reader we test opens with
    the shape intact). zstd (level 1 by default), BYTE_STREAM_SPLIT and no dictionary on
    tensor leaves (`<col>.list.element…`, one per nesting level: the bare column name is
    silently ignored), except float16 leaves outside `arrow_tensor` (DuckDB 2.0 cannot
    decode those); row groups sized by bytes; a cap on rows per file.

    Partition columns stay in the files as well as in the `k=v` folder names: readers
    that do not parse folder names (Hugging Face `datasets`) still get them, and the
    folders still prune for those that do. (`pyarrow.dataset.write_dataset` drops them
    from the files, hence the writer's own partition loop.)

    Args:
        schema: the output schema (`output_schema`).
        partition_by: Hive partition columns.
        max_rows_per_file: rows per file at most.
        row_group_bytes: target uncompressed bytes per row group.
        compression, compression_level: the Parquet codec.
        encoding: one of `schema.PARQUET_ENCODINGS`.
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
        encoding: str = "portable",
    ):
        self.source_schema = schema
        self.encoding = encoding
        self.schema = stored_schema(schema, encoding)
        self.partition_by = tuple(partition_by)
        leaves = tensor_leaf_paths(self.schema)
        row_bytes = sum(int(np.prod(self.source_schema.field(c).type.shape)) * t.bit_width // 8 for c, (_, t) in leaves.items()) + 64
        rows = max(1, row_group_bytes // row_bytes)
        self.max_rows_per_group = int(min(rows, max_rows_per_file, 1 << 20))
        self.min_rows_per_group = max(1, self.max_rows_per_group // 2)
        self.max_rows_per_file = max_rows_per_file
        self.compression = None if compression == "none" else compression
        self.compression_level = compression_level if self.compression in ("zstd", "gzip") else None
        self.byte_stream_split = [p for p, t in leaves.values() if t == pa.float32() or encoding == "arrow_tensor"]
        self.dictionary = [f.name for f in self.schema if f.name not in leaves]

    def _options(self) -> dict:
        return dict(
            compression=self.compression or "none",
            compression_level=self.compression_level,
            use_dictionary=self.dictionary or False,
            use_byte_stream_split=self.byte_stream_split or False,
            write_statistics=self.dictionary or False,
        )

    def _folder(self, values) -> str:
        from urllib.parse import quote

        return "/".join(f"{c}={quote(str(v), safe='')}" for c, v in zip(self.partition_by, values))

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]:
        import pyarrow.parquet as pq

        filesystem, root = arrow_fs(dest)
        pending: dict[str, list] = {}  # partition folder → [tables, rows]
        open_files: dict[str, list] = {}  # partition folder → [ParquetWriter, relative path, rows]
        written: list[tuple[str, int]] = []
        counter = 0

        def emit(folder: str, table: pa.Table) -> None:
            nonlocal counter
            while len(table):
                f = open_files.get(folder)
                if f is None:
                    rel = posixpath.join(folder, f"{basename}-{counter}.parquet") if folder else f"{basename}-{counter}.parquet"
                    counter += 1
                    if filesystem.type_name == "local":  # object stores have no folders; GCS's directory markers only cost requests
                        filesystem.create_dir(posixpath.dirname(posixpath.join(root, rel)), recursive=True)
                    f = open_files[folder] = [pq.ParquetWriter(posixpath.join(root, rel), self.schema, filesystem=filesystem, **self._options()), rel, 0]
                take = min(len(table), self.max_rows_per_file - f[2])
                f[0].write_table(table.slice(0, take), row_group_size=self.max_rows_per_group)
                f[2] += take
                table = table.slice(take)
                if f[2] >= self.max_rows_per_file:
                    written.append(_close(*f))
                    del open_files[folder]

        def flush(folder: str, final: bool) -> None:
            tables, rows = pending[folder]
            if not rows or (not final and rows < self.min_rows_per_group):
                return
            # no combine_chunks: the writer takes chunked columns as they are (a row group may
            # span chunks); combining copied every pending row once more (~40 MB a flush here)
            table = pa.concat_tables(tables)
            # whole row groups now; a remainder under the minimum waits for more rows
            keep = len(table) if final else len(table) - len(table) % self.max_rows_per_group if len(table) >= self.max_rows_per_group else len(table)
            emit(folder, table.slice(0, keep))
            rest = table.slice(keep)
            pending[folder] = [[rest] if len(rest) else [], len(rest)]

        try:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                table = pa.Table.from_batches([to_stored_batch(self.schema, batch)])
                for folder, part in self._groups(table):
                    p = pending.setdefault(folder, [[], 0])
                    p[0].append(part)
                    p[1] += len(part)
                    flush(folder, final=False)
            for folder in list(pending):
                flush(folder, final=True)
        finally:
            for f in open_files.values():
                written.append(_close(*f))
        # Verify: every reported file exists with its size (never trust a writer blindly), one
        # info() each; on object stores that also gives the store's identity of the bytes,
        # which the commit compares with its copy's response instead of reading the file again.
        out = []
        store = None if filesystem.type_name == "local" else fsspec_fs(dest)[0]
        for rel, rows in written:
            path = posixpath.join(root, rel)
            if store is None:
                info = filesystem.get_file_info(path)
                if info.type.name != "File":
                    raise CommitError(f"the Parquet writer reported {rel!r} under {dest!r}, but the file is missing")
                out.append(WrittenFile(rel, rows, info.size))
                continue
            try:
                info = store.info(path)
            except FileNotFoundError:
                raise CommitError(f"the Parquet writer reported {rel!r} under {dest!r}, but the file is missing") from None
            out.append(WrittenFile(rel, rows, int(info["size"]), content_id(store, info)))
        return out

    def _groups(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """The batch's rows per partition folder, in order of first appearance (a Python
        pass over the rows' partition values, not over tensor data)."""
        if not self.partition_by:
            return [("", table)]
        rows: dict[tuple, list[int]] = {}
        for i, values in enumerate(zip(*(table.column(c).to_pylist() for c in self.partition_by))):
            rows.setdefault(values, []).append(i)
        if len(rows) == 1:
            return [(self._folder(next(iter(rows))), table)]
        return [(self._folder(v), table.take(pa.array(idx, pa.int64()))) for v, idx in rows.items()]

    def storage_spec(self) -> dict:
        return storage_spec(self.source_schema, "parquet", self.partition_by, encoding=self.encoding, compression=self.compression)


def _close(writer, rel: str, rows: int) -> tuple[str, int]:
    """Close a file; its footer (as the writer serialized it) must count the rows written
    to it: the commit pins the stored bytes to this file rather than reading the footer."""
    writer.close()
    footer = writer.writer.metadata  # the C++ writer's FileMetaData: no read-back
    if footer is not None and footer.num_rows != rows:
        raise CommitError(f"the Parquet writer's footer of {rel!r} counts {footer.num_rows} rows but {rows} were written to it")
    return rel, rows


def writer(spec: WriteSpec, schema: pa.Schema) -> ParquetShardWriter:
    return ParquetShardWriter(
        schema,
        partition_by=spec.partition_by,
        max_rows_per_file=spec.max_rows_per_file,
        row_group_bytes=spec.row_group_bytes,
        compression=spec.compression,
        compression_level=spec.compression_level,
        encoding=spec.parquet_encoding,
    )


def rewrite_without(fs, src: str, dst: str, keep: Callable[[Sequence], np.ndarray]) -> int:
    table = read_parquet(fs, src)
    mask = keep(table.column("key").to_pylist())
    write_parquet_like(fs, src, dst, table.filter(pa.array(mask)))
    return int(mask.sum())


def read_parquet(fs, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def write_parquet_like(fs, template: str | None, path: str, table: pa.Table) -> None:
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


# --------------------------------------------------------------------------- reading back


def arrow_dataset(out):
    """A lazy `pyarrow.dataset.Dataset` over the committed files (filter and project without
    reading everything; tensor columns as stored).

    Partition columns are typed from the manifest and parsed from the folder names with an
    explicit Hive schema, so filters on them prune folders. Without it, pyarrow would infer
    `dictionary<int32>` from the folder names and refuse to merge it with the same column
    stored in the files (`int64`): that is what plain `pq.read_table(out)` does, and why
    the README tells pyarrow users to pass `partitioning=None`.
    """
    import pyarrow.dataset as ds

    if not out.files:  # an empty output: no file to take the schema from
        return ds.dataset(read_schema(out.columns).empty_table())
    fs, root = arrow_fs(out.path)
    parts = [c for c in out.columns if c["role"] == "partition"]
    partitioning = ds.partitioning(pa.schema([(c["name"], _ARROW[c["dtype"]]) for c in parts]), flavor="hive") if parts else None
    rel = list(getattr(out, "relative", ()) or [f["path"] for f in out.manifest["files"]])
    in_history = getattr(out, "in_history", frozenset())
    here = [posixpath.join(root, p) for p in rel if p not in in_history]
    if not in_history:
        return ds.dataset(here, format="parquet", filesystem=fs, partitioning=partitioning, partition_base_dir=root)
    # an earlier version: some of its files left the output for the history folder beside it
    from ..versions import history_root

    hfs, hroot = arrow_fs(history_root(out.path))
    there = ds.dataset([posixpath.join(hroot, p) for p in rel if p in in_history], format="parquet", filesystem=hfs, partitioning=partitioning, partition_base_dir=hroot)
    if not here:
        return there
    return ds.dataset([ds.dataset(here, format="parquet", filesystem=fs, partitioning=partitioning, partition_base_dir=root), there])


def read_tables(out, cols: Sequence[dict]) -> Iterator[pa.Table]:
    """Batch by batch, every encoding (old ones too) restored to the read-back types."""
    if not out.files:  # an output of no rows has no data files (a dataset of none has no columns)
        return
    names = [c["name"] for c in cols]
    for batch in arrow_dataset(out).to_batches(columns=names, use_threads=False):
        yield restore_table(pa.Table.from_batches([batch]), cols)


def tf_dataset(out, cols: Sequence[dict]):
    return tables_tf_dataset(lambda: read_tables(out, cols), cols)


def final_paths(paths: Sequence[str], run_id: str) -> list[str]:
    """Committed names are the staged ones."""
    return list(paths)


def sidecars(manifest: dict) -> dict[str, bytes]:
    """Parquet needs none: the schema (with each tensor's shape) is in every file."""
    return {}
