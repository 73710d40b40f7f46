"""Output formats: one module per format behind one contract, and the one registry that
knows which formats exist.

The contract (`ShardWriter`): `write_shard(batches, dest, basename)` receives Arrow record
batches of one input shard and a staging folder, writes them (Hive partition folders
inside) and returns the `WrittenFile`s; `storage_spec()` describes how each column is
stored, for the manifest. Each format module also has

* `rewrite_without(fs, src, dst, keep)`: copy one of its data files without some rows
  (the cross-shard dedupe);
* `read_tables(out, cols)`: the committed output `out` (`readback.Output`) as a stream of
  Arrow tables with the columns `cols` (storage-spec entries) in their read-back types
  (`schema.read_schema`), files in manifest order;
* `tf_dataset(out, cols)`: the same as a `tf.data.Dataset` of one dict per example;
* `arrow_dataset(out)`: a `pyarrow.dataset.Dataset` over the output;
* `final_paths(paths, run_id)`: the committed names of a run's data files (staged
  relative paths in commit order; TFRecord names them as TFDS shards);
* `sidecars(manifest)` → {relative path: bytes}: extra metadata files the format's own
  ecosystem needs next to the data (TFDS's `dataset_info.json`), written by the commit.

Nothing outside this package branches on the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa

__all__ = ["WriteSpec", "WrittenFile", "ShardWriter", "FORMATS", "make_writer", "rewrite_without", "read_tables", "tf_dataset", "arrow_dataset", "sidecars", "final_paths", "tables_tf_dataset"]


@dataclasses.dataclass(frozen=True)
class WriteSpec:
    """What the writers need of `output` (see `layerbeam.config.OutputConfig` for each field)."""

    path: str
    format: str = "parquet"
    partition_by: tuple[str, ...] = ()
    max_rows_per_file: int = 100_000
    row_group_bytes: int = 64 << 20
    compression: str = "zstd"
    compression_level: int | None = 1
    parquet_encoding: str = "portable"
    tfrecord_compression: str = "none"
    max_bytes_per_file: int = 256 << 20
    overwrite: bool = False
    max_files: int = 100_000  # checked by the launcher's plan (projected data files)


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """A data file as written: path relative to the shard's folder, rows, bytes, and what
    the commit checks the staged file against without reading it (`commit._verify`):

    - `content_id`: the store's identity of the bytes, from the writer's one `info()` after
      closing the file (S3 ETag, GCS crc32c; None locally). The commit compares it with the
      server-side copy's response, so what is committed is the very object written here,
      whose Parquet footer or TFRecord framing the writer checked against `rows`.
    - `last_record`: TFRecord (uncompressed) only, the byte offset of the last record: its
      12-byte header must frame a record that ends exactly at `bytes`.
    """

    path: str
    rows: int
    bytes: int
    content_id: str | None = None
    last_record: int | None = None

    def result(self) -> dict:
        """The file's entry in a `ShardResult` (and its marker)."""
        d = {"path": self.path, "final_path": self.path, "rows": self.rows, "bytes": self.bytes}
        if self.content_id:
            d["content_id"] = self.content_id
        if self.last_record is not None:
            d["last_record"] = self.last_record
        return d


class ShardWriter(Protocol):
    """Writes one input shard's rows under `dest` and says what it wrote."""

    extension: str

    def write_shard(self, batches: Iterable[pa.RecordBatch], dest: str, basename: str) -> list[WrittenFile]: ...

    def storage_spec(self) -> dict: ...


FORMATS = ("parquet", "tfrecord")


def _module(fmt: str):
    if fmt == "parquet":
        from . import parquet

        return parquet
    if fmt == "tfrecord":
        from . import tfrecord

        return tfrecord
    raise ValueError(f"output.format {fmt!r} has no writer; use one of {', '.join(FORMATS)}")


def make_writer(spec: WriteSpec, schema: pa.Schema) -> ShardWriter:
    """The writer for `spec.format`."""
    return _module(spec.format).writer(spec, schema)


def rewrite_without(fs, src: str, dst: str, keep: Callable[[Sequence], np.ndarray]) -> int:
    """Copy data file `src` to `dst` keeping the rows for which `keep(keys)` is True (the
    format is the file's); return the rows kept."""
    fmt = "parquet" if src.endswith(".parquet") else "tfrecord" if src.endswith((".tfrecord", ".tfrecord.gz")) else None
    if fmt is None:
        from ..errors import CommitError

        raise CommitError(f"cannot filter repeated keys out of {src!r}: unknown data file type")
    return _module(fmt).rewrite_without(fs, src, dst, keep)


def read_tables(out, cols: Sequence[dict]) -> Iterator[pa.Table]:
    """The committed output `out` as Arrow tables of `cols` in their read-back types."""
    return _module(out.format).read_tables(out, cols)


def tf_dataset(out, cols: Sequence[dict]):
    """The committed output `out` as a `tf.data.Dataset` of {column: tensor}."""
    return _module(out.format).tf_dataset(out, cols)


def arrow_dataset(out):
    """A `pyarrow.dataset.Dataset` over the committed output `out`."""
    return _module(out.format).arrow_dataset(out)


def sidecars(fmt: str, manifest: dict) -> dict[str, bytes]:
    """Extra metadata files (relative path → content) the format writes next to its data."""
    return _module(fmt).sidecars(manifest)


def final_paths(fmt: str, paths: Sequence[str], run_id: str) -> list[str]:
    """The committed relative paths of a run's data files (staged paths, commit order)."""
    return _module(fmt).final_paths(paths, run_id)


def tables_tf_dataset(tables: Callable[[], Iterator[pa.Table]], cols: Sequence[dict]):
    """A `tf.data.Dataset` of one dict per example from a stream of read-back tables (for
    formats TensorFlow cannot parse itself)."""
    import tensorflow as tf

    from ..schema import column_numpy, result_dtype

    signature = {c["name"]: tf.TensorSpec((None, *c["shape"]), tf.as_dtype(result_dtype(c))) for c in cols}

    def batches():
        for table in tables():
            yield {c["name"]: column_numpy(table.column(c["name"]), c) for c in cols}

    return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()
