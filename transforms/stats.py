"""Per-output dataset statistics: count, mean, std, min, max, fraction of zeros, NaN and
Inf counts, computed where the rows are (each shard's worker, over the values as stored)
and merged at commit.

Why not a Beam `CombineFn`: the outputs never travel through a PCollection (each worker
writes its shard's rows itself and passes on a small `ShardResult`), so a combiner would
only see what the results carry anyway. Each shard's result carries its partial
statistics (`ShardStats.to_json`); the commit merges them (`merge_results`) with the
parallel form of Welford's algorithm (Chan et al.), which is what a `CombineFn`'s
`merge_accumulators` would do, in the one place every runner, `layerbeam.extract` and
`WriteLayers` already pass through. Means and variances are accumulated in float64, so
they equal numpy's over the read-back table to float64 rounding.

NaN and Inf values are counted and left out of mean, std, min and max (which are over the
finite values); `zero_fraction` is over all values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["ShardStats", "merge_results", "merge", "finish", "values_of"]

_CHUNK = 1 << 20  # values per pass: the float64 copy (8 MB) stays cache-friendly


def _empty() -> dict:
    return {"values": 0, "finite": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None, "zeros": 0, "nan": 0, "inf": 0}


def merge(a: Mapping, b: Mapping) -> dict:
    """Two partial statistics of one output → their union (Chan's parallel update)."""
    n = a["finite"] + b["finite"]
    out = {k: a[k] + b[k] for k in ("values", "finite", "zeros", "nan", "inf")}
    if n == 0:
        out.update(mean=0.0, m2=0.0, min=None, max=None)
        return out
    delta = b["mean"] - a["mean"]
    out["mean"] = a["mean"] + delta * b["finite"] / n
    out["m2"] = a["m2"] + b["m2"] + delta * delta * a["finite"] * b["finite"] / n
    mins = [x for x in (a["min"], b["min"]) if x is not None]
    maxs = [x for x in (a["max"], b["max"]) if x is not None]
    out["min"] = min(mins) if mins else None
    out["max"] = max(maxs) if maxs else None
    return out


def values_of(column) -> np.ndarray:
    """All values of an output column (tensor extension, fixed-size list or plain list) as
    one flat numpy array, in the stored dtype, without copying where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def _partial(v: np.ndarray) -> dict:
    """Partial statistics of a flat array, a chunk at a time: float16 is widened to float32
    once per chunk (numpy has no fast float16 arithmetic), sums are taken in float64, and
    each chunk's (mean, M2) comes from its sum and sum of squares, then merged (Chan)."""
    s = _empty()
    s["values"] = int(v.size)
    for start in range(0, v.size, _CHUNK):
        c = v[start : start + _CHUNK]
        if c.dtype != np.float32:
            c = c.astype(np.float32)
        part = _empty()
        part["zeros"] = int(np.count_nonzero(c == 0))
        finite = np.isfinite(c)
        if not finite.all():
            part["nan"] = int(np.count_nonzero(np.isnan(c)))
            part["inf"] = int(c.size - np.count_nonzero(finite)) - part["nan"]
            c = c[finite]
        if c.size:
            d = c.astype(np.float64)
            n = d.size
            mean = float(d.sum()) / n
            d -= mean  # centred before squaring: no cancellation when the mean is large
            part.update(finite=n, mean=mean, m2=float(np.dot(d, d)), min=float(c.min()), max=float(c.max()))
        values = s["values"]
        s = merge(s, part)
        s["values"] = values
    return s


class ShardStats:
    """The running statistics of one shard's outputs, updated batch by batch."""

    def __init__(self, names: Sequence[str]):
        self.stats = {n: _empty() for n in names}

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        for name in self.stats:
            self.stats[name] = merge(self.stats[name], _partial(values_of(batch.column(name))))

    def to_json(self) -> dict:
        return {n: dict(s) for n, s in self.stats.items()}


def finish(s: Mapping) -> dict:
    """Partial statistics → what the manifest stores and `show` prints."""
    n = s["finite"]
    return {
        "count": s["values"],
        "mean": s["mean"] if n else None,
        "std": math.sqrt(s["m2"] / n) if n else None,  # population std, as numpy's default
        "min": s["min"],
        "max": s["max"],
        "zero_fraction": s["zeros"] / s["values"] if s["values"] else None,
        "nan": s["nan"],
        "inf": s["inf"],
    }


def merge_results(results: Iterable[Mapping]) -> dict:
    """Shard results (with their `stats`) → {output name: `finish`ed statistics}. Shards
    without statistics (results written by an older layerbeam) are left out."""
    merged: dict[str, dict] = {}
    for r in results:
        for name, s in (r.get("stats") or {}).items():
            merged[name] = merge(merged[name], s) if name in merged else dict(s)
    return {name: finish(s) for name, s in merged.items()}
