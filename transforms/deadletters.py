"""Dead letters: the reasons a record is not in the output, one `Failure` per record, and
the dead-letter table every shard writes beside its data (`_dead_letters/<shard>.parquet`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pyarrow as pa

from ._fs import arrow_fs

__all__ = ["Failure", "DEAD_LETTER_SCHEMA", "dead_letter_table", "write_dead_letters", "count_reasons"]

@dataclasses.dataclass(frozen=True)
class Failure:
    """Why one record (or, with `index` None, the rest of a shard) is not in the output.

    Attributes:
        index: record index within the shard; None for a shard-level failure.
        key: the record's key when it could be read, else `<shard file>:<index>` (images:
            the file path; shard-level: the shard's path).
        stage: 'read', 'decode' or 'dedupe'.
        reason: a code, counted in the manifest and in Beam counters (the README's
            "What happens to bad data" lists them with their meaning).
        detail: one line naming the value.
    """

    index: int | None
    key: str
    stage: str
    reason: str
    detail: str


DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("index", pa.int64()),  # null for a shard-level dead letter
        pa.field("stage", pa.string()),  # read | decode | dedupe
        pa.field("reason", pa.string()),  # unparseable_record, missing_feature, … (README)
        pa.field("detail", pa.string()),  # one line naming the value
    ]
)


def dead_letter_table(failures: Sequence[Failure], paths: Sequence[str], per_file: bool) -> pa.Table:
    """The dead-letter rows of one shard.

    Args:
        failures: the shard's failures (a shard-level one has `index` None).
        paths: the shard's files.
        per_file: each record is its own file (image folders): its `shard` column is that
            file, else the shard's (first) file.
    """
    where = [paths[f.index] if per_file and f.index is not None else paths[0] for f in failures]
    return pa.table(
        {
            "key": [f.key for f in failures],
            "shard": where,
            "index": [f.index for f in failures],
            "stage": [f.stage for f in failures],
            "reason": [f.reason for f in failures],
            "detail": [f.detail for f in failures],
        },
        schema=DEAD_LETTER_SCHEMA,
    )


def write_dead_letters(url: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    fs, path = arrow_fs(url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def count_reasons(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
