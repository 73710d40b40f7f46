"""Statistics and the float16 widening of the Parquet writer, against numpy over the files
read back with plain `pyarrow.parquet` (no layerbeam code on the reference side).

Fast: no TensorFlow, a few hundred thousand values. The end-to-end statistics of a real
run are in tests/test_cli.py (`test_statistics_equal_numpy_over_the_read_back_table`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layerbeam.transforms import stats
from layerbeam.transforms.formats.parquet import ParquetShardWriter
from layerbeam.transforms.schema import output_schema, to_record_batch


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _outputs(rows: int, rng) -> dict[str, np.ndarray]:
    """ReLU-like maps with every awkward value: ±0, NaN, ±Inf, subnormals, the float16
    extremes; a float32 output with a large mean (cancellation if squares were not centred)."""
    m = np.maximum(0, rng.normal(-0.1, 1.0, (rows, 6, 5, 7))).astype(np.float16)
    flat = m.reshape(-1)
    flat[3], flat[10], flat[17], flat[24] = np.nan, np.inf, -np.inf, -0.0
    flat[31], flat[38], flat[45] = np.float16(6e-8), np.float16(-65504), np.float16(65504)  # smallest subnormal, extremes
    big = (1e4 + rng.normal(0, 1, (rows, 9))).astype(np.float32)
    big[1, 2], big[2, 3] = np.nan, -np.inf
    pooled = np.maximum(0, rng.normal(0.2, 1.0, (rows, 16))).astype(np.float32)
    all_nan = np.full((rows, 2), np.nan, np.float16)
    return {"map16": m, "big": big, "pooled": pooled, "all_nan": all_nan}


def _numpy_stats(v: np.ndarray) -> dict:
    v = v.astype(np.float64).ravel()
    f = v[np.isfinite(v)]
    return {
        "count": v.size,
        "mean": f.mean() if f.size else None,
        "std": f.std() if f.size else None,
        "min": f.min() if f.size else None,
        "max": f.max() if f.size else None,
        "zero_fraction": (v == 0).mean(),
        "nan": int(np.isnan(v).sum()),
        "inf": int(np.isinf(v).sum()),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The outputs written in uneven batches by the default (`portable`) writer, with the
    shard's statistics updated batch by batch as `transforms/shard.py` does."""
    rng = np.random.default_rng(7)
    rows = 101
    outs = _outputs(rows, rng)
    specs = [_Spec(n, v.shape[1:], "float16" if v.dtype == np.float16 else "float32") for n, v in outs.items()]
    schema = output_schema(specs, {"key": pa.string()})
    keys = np.array([f"k{i:04d}".encode() for i in range(rows)], dtype=object)
    shard = stats.ShardStats(list(outs))
    batches = []
    for lo, hi in [(0, 1), (1, 33), (33, 64), (64, 101)]:
        rb = to_record_batch(schema, {"key": keys[lo:hi]}, {n: v[lo:hi] for n, v in outs.items()})
        shard.update(rb)
        batches.append(rb)
    dest = tmp_path_factory.mktemp("stats")
    ParquetShardWriter(schema).write_shard(batches, str(dest), "part")
    table = pq.read_table(str(dest))
    # the reference: numpy over what plain pyarrow reads back (nested lists → a dense array)
    back = {n: np.array(table.sort_by("key").column(n).to_pylist(), dtype=np.float32) for n in outs}
    return outs, back, stats.merge_results([{"stats": shard.to_json()}])


def test_statistics_equal_numpy_over_the_read_back_table(written):
    _, back, got = written
    for name, v in back.items():
        ref, s = _numpy_stats(v), got[name]
        assert s["count"] == ref["count"] and s["nan"] == ref["nan"] and s["inf"] == ref["inf"], name
        assert s["zero_fraction"] == ref["zero_fraction"], name
        for k in ("mean", "std", "min", "max"):
            if ref[k] is None:
                assert s[k] is None, (name, k)
            else:
                assert s[k] == pytest.approx(ref[k], rel=1e-12, abs=0), (name, k)


def test_float16_is_widened_exactly_and_read_back_bit_for_bit(written):
    outs, back, _ = written
    np.testing.assert_array_equal(back["map16"].view(np.uint32), outs["map16"].astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(back["map16"].astype(np.float16).view(np.uint16), outs["map16"].view(np.uint16))


def test_every_float16_bit_pattern_widens_like_numpy(tmp_path):
    """All 65,536 float16 values (NaN payloads included) through the portable writer: the
    float32 bits in the file are numpy's `astype(float32)` of each."""
    bits = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    schema = output_schema([_Spec("m", (256,), "float16")], {"key": pa.string()})
    keys = np.array([f"{i:03d}".encode() for i in range(256)], dtype=object)
    rb = to_record_batch(schema, {"key": keys}, {"m": bits})
    shard = stats.ShardStats(["m"])
    shard.update(rb)
    ParquetShardWriter(schema).write_shard([rb], str(tmp_path), "p")
    t = pq.read_table(str(tmp_path)).sort_by("key")
    got = t.column("m").combine_chunks().flatten().to_numpy()
    with np.errstate(invalid="ignore"):
        want = bits.astype(np.float32).ravel()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    s = stats.merge_results([{"stats": shard.to_json()}])["m"]
    f = want[np.isfinite(want)].astype(np.float64)
    assert s["nan"] == np.isnan(want).sum() == 2 * 1023 and s["inf"] == 2
    assert s["min"] == f.min() == -65504 and s["max"] == f.max() == 65504
    assert s["mean"] == pytest.approx(f.mean(), rel=1e-12, abs=1e-12) and s["std"] == pytest.approx(f.std(), rel=1e-12)
