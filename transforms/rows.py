"""Rows computed elsewhere (`layerbeam.extract`, `WriteLayers`) → staged shards and a
manifest base, committed by `commit.commit_run`: the same staging, markers, key hashes,
dead letters, lock and atomic publish as a pipeline run. No Beam, no TensorFlow."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .commit import OutputLock, commit_run, versions
from .deadletters import Failure, count_reasons, dead_letter_table, write_dead_letters
from .errors import ConfigError
from .formats import ShardWriter
from .layers import OutputSpec
from .readers import Shard
from .schema import to_record_batch
from .shard import ShardResult, key_hashes
from .staging import OutputLayout

__all__ = ["refuse_existing", "write_rows", "manifest_base", "commit_rows", "versions", "BATCH_ROWS"]

BATCH_ROWS = 4096  # rows per Arrow record batch handed to the writer


def refuse_existing(layout: OutputLayout, overwrite: bool) -> None:
    """Refuse, before any work, an output that must not be written (as `layerbeam run` does).

    Raises:
        ConfigError: the output is complete already or holds foreign files (without
            `overwrite`), or another run holds its lock.
    """
    if layout.is_complete() and not overwrite:
        raise ConfigError(f"output {layout.out!r} already holds a complete output; pass overwrite=True to replace it or choose another path")
    if layout.has_foreign_files() and not overwrite:
        raise ConfigError(f"output {layout.out!r} holds files but no _SUCCESS, so it is not a layerbeam output; choose another path, or pass overwrite=True to replace it")
    lock = OutputLock(layout)
    holder = lock.holder()
    if holder is not None:
        raise lock.error(holder)


def write_rows(
    layout: OutputLayout,
    writer: ShardWriter,
    schema: pa.Schema,
    shard_id: str,
    keys: Sequence[str],
    columns: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    model_fingerprint: str,
    *,
    index: np.ndarray | None = None,
    failures: Sequence[Failure] = (),
    origin: str = "<python>",
) -> ShardResult:
    """Write rows (all in memory) as one staged shard; return its result, also its marker.

    Args:
        keys: one string per row (unique within the shard: the caller checks).
        columns: the schema's plain columns other than `key`, one array per column.
        outputs: one array per tensor column, rows first.
        index: each row's record index (default 0..n-1); failures carry their own.
        failures: records of this shard that became dead letters instead of rows.
        origin: what the shard's dead letters and manifest name as its source.
    """
    t0 = time.perf_counter()
    n = len(keys)
    keys_arr = np.array(list(keys), dtype=object)
    index = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    attempt = layout.new_attempt()  # its own folder: another attempt of the shard never mixes in

    def batches() -> Iterator[pa.RecordBatch]:
        for lo in range(0, n, BATCH_ROWS):
            hi = min(n, lo + BATCH_ROWS)
            cols = {"key": keys_arr[lo:hi], **{k: np.asarray(v)[lo:hi] for k, v in columns.items()}}
            yield to_record_batch(schema, cols, {k: v[lo:hi] for k, v in outputs.items()})

    basename = f"part-{layout.run_id[:8]}-{shard_id}"
    files = writer.write_shard(batches(), layout.shard_dir(shard_id, attempt), basename)
    layout.write_keys(shard_id, attempt, key_hashes(keys_arr), index)
    if failures:
        write_dead_letters(layout.dead_file(shard_id, attempt), dead_letter_table(list(failures), [origin], per_file=False))
    rows = sum(f.rows for f in files)
    if rows != n:
        raise RuntimeError(f"shard {shard_id}: {n} rows given but the writer reports {rows}")
    result = ShardResult(
        shard=shard_id,
        paths=(origin,),
        bytes_in=0,
        read=n + len(failures),
        rows=rows,
        dead_letters=len(failures),
        dead_reasons=count_reasons([f.reason for f in failures]),
        shard_errors=(),
        files=tuple(f.result() for f in files),
        model_fingerprint=model_fingerprint,
        seconds=round(time.perf_counter() - t0, 3),
        attempt=attempt,
    )
    layout.write_marker(shard_id, result.to_dict())
    return result


def manifest_base(run_id: str, config: Mapping[str, Any], model: Mapping[str, Any], outputs: Sequence[OutputSpec], storage: Mapping[str, Any]) -> dict:
    """The manifest before the commit adds counts and files.

    Args:
        config: what made the output; `commit_run` reads `output.{path, format,
            partition_by, overwrite}` from it.
        model: `{source, weights, fingerprint, input_shapes}`.
        outputs: the tensor columns' specs.
        storage: the writer's `storage_spec()`.
    """
    return {
        "layerbeam_manifest": 1,
        "run_id": run_id,
        "config": dict(config),
        "model": dict(model),
        "outputs": [s.to_json() for s in outputs],
        "storage": dict(storage),
        "bytes_per_example": sum(s.bytes_per_example for s in outputs),
        "versions": versions(),
    }


def commit_rows(results: Sequence[ShardResult | Mapping], base: Mapping[str, Any]) -> dict:
    """Commit staged shards with `commit_run` under the output's lock; return the counts.

    The lock is taken here if this process does not hold it already (WriteLayers'
    commit step on a worker) and released after.
    """
    results = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]
    layout = OutputLayout(base["config"]["output"]["path"], base["run_id"])
    lock = OutputLock(layout)
    lock.acquire()
    try:
        shards = [Shard(r["shard"], tuple(r["paths"]), 0) for r in results]
        return commit_run(results, shards, base, base["run_id"])
    finally:
        lock.release()
