"""Output formats: one module per format behind one contract, and the one registry that
knows which formats exist.

The contract (`ShardWriter`): `write_shard(batches, dest, basename)` receives Arrow record
batches of one input shard and a staging folder, writes them (Hive partition folders
inside) and returns the `WrittenFile`s; `storage_spec()` describes how each column is
stored, for the manifest. Each format module also has `rewrite_without(fs, src, dst,
keep)`, which copies one of its data files without some rows (the cross-shard dedupe).
Nothing outside this package branches on the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa

__all__ = ["WriteSpec", "WrittenFile", "ShardWriter", "FORMATS", "make_writer", "rewrite_without"]


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
    float16_byte_stream_split: bool = True
    parquet_compat: bool = False
    tfrecord_compression: str = "none"
    max_bytes_per_file: int = 256 << 20
    overwrite: bool = False
    max_files: int = 100_000  # checked by the launcher's plan (projected data files)


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """A data file as written: path relative to the shard's folder, rows, bytes."""

    path: str
    rows: int
    bytes: int


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
