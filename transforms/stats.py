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


# Every float16 value, indexed by its bit pattern: a float16 output's statistics come from
# the histogram of its bit patterns (one `bincount` pass, ~2 ns a value) instead of widening
# each value to float32 and float64 (numpy's float16 → float32 conversion alone costs
# ~6 ns a value: it dominated a shard's statistics of a 28×28×192 float16 map).
_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
_F16_FINITE = np.flatnonzero(np.isfinite(_F16))
_F16_NAN = np.flatnonzero(np.isnan(_F16))
_F16_VALUE = _F16[_F16_FINITE].astype(np.float64)


def _partial_f16(v: np.ndarray) -> dict:
    """Partial statistics of a flat float16 array from its bit-pattern histogram: the same
    quantities as `_partial`, exactly (float64 sums over at most 63,488 distinct values;
    each count × value product is exact)."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    bits = v.view(np.uint16)
    for start in range(0, bits.size, _CHUNK):  # bincount widens its input to intp: bounded copies
        counts += np.bincount(bits[start : start + _CHUNK], minlength=1 << 16)
    s = _empty()
    s["values"] = int(v.size)
    s["zeros"] = int(counts[0] + counts[0x8000])  # +0 and -0
    s["nan"] = int(counts[_F16_NAN].sum())
    c = counts[_F16_FINITE]
    n = int(c.sum())
    s["inf"] = v.size - n - s["nan"]
    seen = np.flatnonzero(c)
    if seen.size:
        c, x = c[seen].astype(np.float64), _F16_VALUE[seen]
        mean = math.fsum(c * x) / n
        d = x - mean
        s.update(finite=n, mean=mean, m2=math.fsum(c * d * d), min=float(x.min()), max=float(x.max()))
    return s


def _partial(v: np.ndarray) -> dict:
    """Partial statistics of a flat array, a chunk at a time: sums are taken in float64,
    and each chunk's (mean, M2) comes from its sum and its centred sum of squares, then
    merged (Chan). float16 goes through its histogram (`_partial_f16`)."""
    if v.dtype == np.float16:
        return _partial_f16(v)
    s = _empty()
    s["values"] = int(v.size)
    for start in range(0, v.size, _CHUNK):
        c = v[start : start + _CHUNK]
        part = _empty()
        part["zeros"] = int(np.count_nonzero(c == 0))  # (count_nonzero(c) on floats is 6x slower)
        d = c.astype(np.float64)
        total = float(d.sum())
        # A float64 sum of at most 2**20 finite float32 values cannot overflow: only a NaN or
        # an Inf makes it non-finite, so the isfinite pass is only paid for chunks that have one.
        if not math.isfinite(total):
            finite = np.isfinite(c)
            part["nan"] = int(np.count_nonzero(np.isnan(c)))
            part["inf"] = int(c.size - np.count_nonzero(finite)) - part["nan"]
            c, d = c[finite], d[finite]
            total = float(d.sum())
        if c.size:
            n = d.size
            mean = total / n
            d -= mean  # centred before squaring: no cancellation when the mean is large
            # einsum, not np.dot: BLAS's threads spin on every core for a dot this size
            # (measured 10x the CPU time of the single-threaded einsum on 2 cores).
            part.update(finite=n, mean=mean, m2=float(np.einsum("i,i->", d, d)), min=float(c.min()), max=float(c.max()))
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
