"""The real clients users read layerbeam's Parquet with, each through its README one-liner.

`SNIPPETS[client]` is the code the README shows for that client (tests/test_reader_conformance.py
checks that the README holds each one verbatim and executes it): an import line, the read
(one line, on the output folder `out`), and the line that gives the tensor column `map16`
back as a numpy array with its shape. `read(client, out, column)` executes the snippet and
returns a `Read`: row count, keys, the `label` column (None if it did not come back), the
tensor as the client returned it (`native`, any numeric array) and the snippet's array `x`.

Used by tests/test_reader_conformance.py and scripts/reader_matrix.py. Each client is
imported only when its snippet runs; `available()` says which are installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

# client → (import, read, tensor). `out` is the output folder; the column is `map16`.
SNIPPETS: dict[str, tuple[str, str, str]] = {
    "pyarrow": (
        "import pyarrow.parquet as pq",
        "t = pq.read_table(out, partitioning=None)",
        'x = np.array(t["map16"].to_pylist(), np.float32)',
    ),
    "pandas": (
        "import pandas as pd",
        'df = pd.read_parquet(out, partitioning=None, dtype_backend="pyarrow")',
        'x = np.array(df["map16"].tolist(), np.float32)',
    ),
    "polars": (
        "import polars as pl",
        'df = pl.read_parquet(f"{out}/**/part-*.parquet")',
        'x = df["map16"].to_numpy()',
    ),
    "duckdb": (
        "import duckdb",
        "t = duckdb.sql(f\"select * from '{out}/**/part-*.parquet'\").to_arrow_table()",
        'x = np.array(t["map16"].to_pylist(), np.float32)',
    ),
    "spark": (
        "spark = SparkSession.builder.getOrCreate()",
        "df = spark.read.parquet(out)",
        'x = np.array([r.map16 for r in df.select("map16").collect()], np.float32)',
    ),
    "hf_datasets": (
        "import datasets",
        'ds = datasets.load_dataset("parquet", data_files=f"{out}/**/part-*.parquet", split="train")',
        'x = ds.with_format("numpy")[:]["map16"]',
    ),
    "ray": (
        "import ray",
        "ds = ray.data.read_parquet(out)",
        'x = np.array([r["map16"] for r in ds.take_all()], np.float32)',
    ),
    "chdb": (
        "import chdb",
        "t = chdb.query(f\"select * from file('{out}/**/part-*.parquet', Parquet)\", \"ArrowTable\")",
        'x = np.array(t["map16"].to_pylist(), np.float32)',
    ),
}
MODULES = {"pyarrow": "pyarrow", "pandas": "pandas", "polars": "polars", "duckdb": "duckdb", "spark": "pyspark", "hf_datasets": "datasets", "ray": "ray", "chdb": "chdb"}
DISTRIBUTIONS = {"spark": "pyspark", "hf_datasets": "datasets"}


@dataclasses.dataclass
class Read:
    rows: int
    keys: list[str]
    labels: list | None
    x: np.ndarray | None  # the snippet's tensor array (None when the snippet's tensor line failed)
    x_error: str | None
    native: Any  # the tensor column as the client returned it
    raw_type: str  # the client's own type name for the tensor column


def available(client: str) -> bool:
    return importlib.util.find_spec(MODULES[client]) is not None


def version(client: str) -> str:
    from importlib.metadata import version as v

    try:
        return v(DISTRIBUTIONS.get(client, MODULES[client]))
    except Exception:  # noqa: BLE001
        return "?"


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:240]


_SPARK = None
_RAY = False


def _setup(client: str) -> None:
    """Start the heavy clients once per process, small and quiet."""
    global _SPARK, _RAY
    if client == "spark" and _SPARK is None:
        os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
        from pyspark.sql import SparkSession

        _SPARK = (
            SparkSession.builder.master("local[1]").appName("layerbeam-readers")
            .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
            .config("spark.sql.shuffle.partitions", "1").getOrCreate()
        )
        _SPARK.sparkContext.setLogLevel("ERROR")
    if client == "ray" and not _RAY:
        import logging

        import ray

        logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data logs every operator at DEBUG

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, object_store_memory=100 << 20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        _RAY = True
    if client == "hf_datasets":
        import datasets

        datasets.disable_progress_bars()


def _namespace(client: str, out: str) -> dict:
    ns: dict[str, Any] = {"np": np, "out": out}
    if client == "spark":
        from pyspark.sql import SparkSession

        ns["SparkSession"] = SparkSession
    return ns


def _pylist(col) -> list:
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def read(client: str, out: str, column: str = "map16") -> Read:
    """Execute the client's README snippet on `out` (with `column` for `map16`)."""
    _setup(client)
    imp, rd, tensor = (s.replace("map16", column) for s in SNIPPETS[client])
    ns = _namespace(client, out)
    exec(imp, ns)  # noqa: S102 — the README's own code, run as users run it
    exec(rd, ns)  # noqa: S102
    x, x_error = None, None
    try:
        exec(tensor, ns)  # noqa: S102
        x = np.asarray(ns["x"])
    except Exception as e:  # noqa: BLE001 — an opt-in encoding may need another tensor line
        x_error = first_line(e)
    if client in ("pyarrow", "duckdb", "chdb"):
        t = ns["t"]
        keys, labels, native = _pylist(t["key"]), (_pylist(t["label"]) if "label" in t.column_names else None), t[column]
        raw = str(t.schema.field(column).type)
    elif client == "pandas":
        df = ns["df"]
        keys, labels, native, raw = list(df["key"]), (list(df["label"]) if "label" in df else None), df[column], str(df[column].dtype)
    elif client == "polars":
        df = ns["df"]
        keys, labels, native, raw = df["key"].to_list(), (df["label"].to_list() if "label" in df.columns else None), df[column].to_arrow(), str(df[column].dtype)
    elif client == "spark":
        df = ns["df"]
        rows = df.select(*[c for c in ("key", "label", column) if c in df.columns]).collect()
        keys, labels, native, raw = [r["key"] for r in rows], ([r["label"] for r in rows] if "label" in df.columns else None), [r[column] for r in rows], dict(df.dtypes)[column]
        # x came from a second collect(): same order only if Spark keeps it; re-derive from these rows
        if x is not None:
            x = np.array(native, np.float32)
    elif client == "hf_datasets":
        ds = ns["ds"]
        t = ds.with_format("arrow")[:]
        keys, labels, native, raw = t["key"].to_pylist(), (t["label"].to_pylist() if "label" in t.column_names else None), t[column], str(ds.features[column])
    elif client == "ray":
        ds = ns["ds"]
        rows = ds.take_all()
        keys, labels, native, raw = [r["key"] for r in rows], ([r["label"] for r in rows] if "label" in rows[0] else None), [r[column] for r in rows], str(ds.schema().base_schema.field(column).type)
        # x came from another execution, whose row order may differ; re-derive from these rows
        if x is not None:
            x = np.array(native, np.float32)
    else:
        raise KeyError(client)
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    return Read(len(keys), keys, labels, x, x_error, native, raw)


def native_values(native) -> np.ndarray:
    """Every value of the client's tensor column, row-major, as float32 (any encoding)."""
    import pyarrow as pa

    if isinstance(native, (pa.Array, pa.ChunkedArray)):
        from layerbeam.transforms.schema import flat_values

        return np.asarray(flat_values(native).to_numpy(zero_copy_only=False), np.float32)
    if hasattr(native, "array") and hasattr(native.array, "__arrow_array__"):  # pandas ArrowDtype
        return native_values(pa.array(native))
    flat: list = []

    def walk(v):
        if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.dtype == object):
            for y in v:
                walk(y)
        else:
            flat.extend(np.asarray(v, np.float32).reshape(-1).tolist())

    walk(list(native))
    return np.asarray(flat, np.float32)


def cleanup() -> None:
    global _SPARK, _RAY
    if _SPARK is not None:
        _SPARK.stop()
        _SPARK = None
    if _RAY:
        import ray

        ray.shutdown()
        _RAY = False


__all__ = ["SNIPPETS", "Read", "available", "version", "read", "native_values", "first_line", "cleanup"]
