"""Read any layerbeam output back, whatever its format, in one line.

    >>> from layerbeam import read, to_pandas, to_tf_dataset
    >>> table = read("out/demo")              # pyarrow.Table: tensors as fixed_shape_tensor
    >>> df = to_pandas("out/demo")            # one ndarray of the output's shape per cell
    >>> ds = to_tf_dataset("out/demo")        # tf.data.Dataset of {column: tensor}

Everything is driven by `_manifest.json` (its `storage` section, written by the writer):
the files to read (only committed ones), each column's type and shape, the partition
columns' types. Parquet and TFRecord outputs of the same run read back identically:
same columns in the same order (key, label, passthrough, outputs), same dtypes, same
values. Outputs come back in their configured dtype where that is lossless: a float16
output widened to float32 by `output.parquet_compat` is narrowed back exactly; a
bfloat16 output is float32 (as stored).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ._fs import arrow_fs, fsspec_fs
from .errors import OutputError

__all__ = ["Output", "open_output", "feature_spec", "parse_example_fn", "to_arrow", "arrow_dataset", "to_pandas", "to_tf_dataset", "head"]

_ARROW = {"string": pa.string(), "int64": pa.int64(), "float32": pa.float32(), "float16": pa.float16()}


@dataclasses.dataclass(frozen=True)
class Output:
    """A committed output: its root, manifest, storage spec and data files (full paths)."""

    path: str
    manifest: dict
    files: tuple[str, ...]

    @property
    def format(self) -> str:
        return self.storage["format"]

    @property
    def storage(self) -> dict:
        return self.manifest["storage"]

    @property
    def columns(self) -> list[dict]:
        return self.storage["columns"]

    def column(self, name: str) -> dict:
        for c in self.columns:
            if c["name"] == name:
                return c
        raise OutputError(f"{self.path!r} has no column {name!r}; its columns are {[c['name'] for c in self.columns]}")

    def select(self, columns: Sequence[str] | None) -> list[dict]:
        return list(self.columns) if columns is None else [self.column(c) for c in columns]


def open_output(path: str) -> Output:
    """Open a committed output directory (local or any fsspec URL).

    Raises:
        OutputError: no `_SUCCESS` (the run is unfinished or failed), or no manifest, or a
            manifest written before layerbeam stored the feature spec.
    """
    root = path.rstrip("/")
    fs, fs_root = fsspec_fs(root)
    if not fs.exists(f"{fs_root}/_SUCCESS"):
        raise OutputError(f"{path!r} is not a complete layerbeam output (no _SUCCESS); wait for the run to finish or re-run it")
    try:
        with fs.open(f"{fs_root}/_manifest.json", "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise OutputError(f"{path!r} has _SUCCESS but no _manifest.json; it was not written by layerbeam, read it with pyarrow directly") from None
    if "storage" not in manifest:
        raise OutputError(f"{path!r}: the manifest has no 'storage' spec (written by an older layerbeam); re-run the job to read it back here")
    files = tuple(f"{root}/{f['path']}" for f in manifest["files"])
    if manifest.get("sample"):
        import warnings

        warnings.warn(
            f"{path!r} is a sample (a smoke run over {manifest.get('shards_planned', '?')} of {manifest.get('shards_total', '?')} shards"
            + (f", at most {manifest['config']['input']['max_examples_per_shard']} examples each" if manifest["config"]["input"].get("max_examples_per_shard") else "")
            + "), not the whole input",
            SampleWarning,
            stacklevel=3,
        )
    return Output(root, manifest, files)


class SampleWarning(UserWarning):
    """The output read is a smoke run's sample (`--max-shards`, `--max-examples-per-shard`)."""


def _as_output(path: str | Output) -> Output:
    return path if isinstance(path, Output) else open_output(path)


# --------------------------------------------------------------------------- tf.data


def feature_spec(storage: dict, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """`tf.io.parse_single_example` features for a TFRecord output's storage spec.

    Args:
        storage: the manifest's `storage` section.
        columns: a subset of columns; default all.
    """
    import tensorflow as tf

    dtypes = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}
    spec = {}
    for c in storage["columns"]:
        if columns is not None and c["name"] not in columns:
            continue
        t = c["tfrecord"]
        if t["kind"] == "tensor_proto":
            spec[t["feature"]] = tf.io.FixedLenFeature([], tf.string)
        else:
            spec[t["feature"]] = tf.io.FixedLenFeature(c["shape"], dtypes[c["dtype"]])
    return spec


def parse_example_fn(storage: dict, columns: Sequence[str] | None = None):
    """A function: serialized tf.train.Example → {column: tensor of its shape and dtype}."""
    import tensorflow as tf

    spec = feature_spec(storage, columns)
    cols = [c for c in storage["columns"] if columns is None or c["name"] in columns]

    def parse(record):
        raw = tf.io.parse_single_example(record, spec)
        out = {}
        for c in cols:
            v = raw[c["tfrecord"]["feature"]]
            if c["tfrecord"]["kind"] == "tensor_proto":
                v = tf.ensure_shape(tf.io.parse_tensor(v, tf.as_dtype(c["dtype"])), c["shape"])
            out[c["name"]] = v
        return out

    return parse


def to_tf_dataset(path: str | Output, columns: Sequence[str] | None = None) -> Any:
    """A `tf.data.Dataset` of one dict per example, tensors in their shapes.

    TFRecord outputs are parsed with the manifest's feature spec; Parquet outputs are
    streamed batch by batch from pyarrow. Files are read in manifest order; shuffle
    downstream if you train on it.

    Args:
        path: the output directory (or an `Output`).
        columns: the columns to read; default all.
    """
    import tensorflow as tf

    out = _as_output(path)
    cols = out.select(columns)
    if out.format == "tfrecord":
        ds = tf.data.TFRecordDataset(tf.constant(list(out.files), tf.string), compression_type=out.storage.get("compression") or "")
        return ds.map(parse_example_fn(out.storage, [c["name"] for c in cols]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    signature = {c["name"]: tf.TensorSpec((None, *c["shape"]), tf.as_dtype(_result_dtype(c))) for c in cols}

    def batches():
        for table in _parquet_batches(out, [c["name"] for c in cols]):
            yield {c["name"]: _column_numpy(table.column(c["name"]), c) for c in cols}

    return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()


# --------------------------------------------------------------------------- arrow / pandas


def arrow_dataset(path: str | Output) -> Any:
    """A `pyarrow.dataset.Dataset` over the output, partition columns typed from the manifest.

    Parquet: a lazy dataset over the committed files (filter and project without reading
    everything; tensor columns as stored). TFRecord: an in-memory dataset of `to_arrow`.
    """
    import pyarrow.dataset as ds

    out = _as_output(path)
    if out.format == "tfrecord":
        return ds.dataset(to_arrow(out))
    if not out.files:  # an empty output: no file to take the schema from
        return ds.dataset(_empty(out.columns))
    fs, root = arrow_fs(out.path)
    parts = [c for c in out.columns if c["role"] == "partition"]
    partitioning = ds.partitioning(pa.schema([(c["name"], _ARROW[c["dtype"]]) for c in parts]), flavor="hive") if parts else None
    files = [posixpath.join(root, f["path"]) for f in out.manifest["files"]]
    return ds.dataset(files, format="parquet", filesystem=fs, partitioning=partitioning, partition_base_dir=root)


def to_arrow(path: str | Output, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole output (or some columns) as one `pyarrow.Table`.

    Columns in manifest order (key, label, passthrough, outputs), partition columns
    included and typed as written; outputs as `fixed_shape_tensor` columns in their
    configured dtype (see the module docstring).
    """
    out = _as_output(path)
    cols = out.select(columns)
    names = [c["name"] for c in cols]
    if out.format == "tfrecord":
        tables = [_arrow_from_numpy(b, cols) for b in to_tf_dataset(out, names).batch(1024).as_numpy_iterator()]
        return pa.concat_tables(tables) if tables else _empty(cols)
    tables = list(_parquet_batches(out, names))
    if not tables:
        return _empty(cols)
    table = pa.concat_tables(tables)
    return pa.table([_restore(table.column(c["name"]), c) for c in cols], schema=_schema(cols))


def to_pandas(path: str | Output, columns: Sequence[str] | None = None):
    """A pandas DataFrame: scalar columns as usual, each output cell an ndarray of its shape."""
    import pandas as pd

    table = to_arrow(path, columns)
    data = {}
    for f in table.schema:
        col = table.column(f.name)
        if isinstance(f.type, pa.FixedShapeTensorType):
            data[f.name] = list(col.combine_chunks().to_numpy_ndarray()) if len(col) else []
        else:
            data[f.name] = col.to_pandas()
    return pd.DataFrame(data)


def head(path: str | Output, n: int = 5, columns: Sequence[str] | None = None) -> pa.Table:
    """The first `n` rows (of the first files), without reading the whole output."""
    out = _as_output(path)
    cols = out.select(columns)
    if out.format == "tfrecord":
        rows = list(to_tf_dataset(out, [c["name"] for c in cols]).take(n).batch(n).as_numpy_iterator())
        return _arrow_from_numpy(rows[0], cols) if rows else _empty(cols)
    tables, got = [], 0
    for t in _parquet_batches(out, [c["name"] for c in cols]):
        tables.append(t.slice(0, n - got))
        got += len(tables[-1])
        if got >= n:
            break
    if not tables:
        return _empty(cols)
    table = pa.concat_tables(tables)
    return pa.table([_restore(table.column(c["name"]), c) for c in cols], schema=_schema(cols))


# --------------------------------------------------------------------------- helpers


def _result_dtype(c: dict) -> str:
    """The dtype a reader gets: the stored one, narrowed back to float16 where it was widened."""
    if c["role"] == "output" and c.get("logical_dtype") == "float16":
        return "float16"
    return c["dtype"]


def _schema(cols: Sequence[dict]) -> pa.Schema:
    fields = []
    for c in cols:
        t = _ARROW[_result_dtype(c)]
        fields.append(pa.field(c["name"], pa.fixed_shape_tensor(t, c["shape"]) if c["role"] == "output" else t, nullable=False))
    return pa.schema(fields)


def _empty(cols: Sequence[dict]) -> pa.Table:
    return _schema(cols).empty_table()


def _parquet_batches(out: Output, names: list[str]) -> Iterator[pa.Table]:
    if not out.files:  # an output of no rows has no data files (a dataset of none has no columns)
        return
    dataset = arrow_dataset(out)
    for batch in dataset.to_batches(columns=names, use_threads=False):
        yield pa.Table.from_batches([batch])


def _column_numpy(col, c: dict) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if c["role"] != "output":
        return col.to_numpy(zero_copy_only=False)
    values = col.storage.flatten() if isinstance(col.type, pa.FixedShapeTensorType) else col.flatten()
    arr = values.to_numpy(zero_copy_only=False).astype(_result_dtype(c), copy=False)
    return arr.reshape((len(col), *c["shape"]))


def _restore(col, c: dict):
    """A stored column → its read-back type (tensor columns rebuilt from plain lists)."""
    if c["role"] != "output":
        return col
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(col.type, pa.FixedShapeTensorType) and col.type.value_type == _ARROW[_result_dtype(c)]:
        return col
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(_column_numpy(col, c)))


def _arrow_from_numpy(batch: dict, cols: Sequence[dict]) -> pa.Table:
    arrays = []
    for c in cols:
        v = batch[c["name"]]
        if c["role"] == "output":
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v)))
        elif c["dtype"] == "string":
            arrays.append(pa.array(list(v), type=pa.binary()).cast(pa.string()))
        else:
            arrays.append(pa.array(v, type=_ARROW[c["dtype"]]))
    return pa.table(arrays, schema=_schema(cols))
