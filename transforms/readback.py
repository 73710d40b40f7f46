"""Read any layerbeam output back, whatever its format, in one line.

    >>> from layerbeam import read, to_pandas, to_tf_dataset
    >>> table = read("out/demo")              # pyarrow.Table: tensors as fixed_shape_tensor
    >>> df = to_pandas("out/demo")            # one ndarray of the output's shape per cell
    >>> ds = to_tf_dataset("out/demo")        # tf.data.Dataset of {column: tensor}

Everything is driven by `_manifest.json` (its `storage` section, written by the writer):
the files to read (only committed ones), each column's type and shape, the partition
columns' types. How a format's files are read is the format module's business
(`formats.read_tables`); this module never branches on the format. Parquet and TFRecord
outputs of the same run, in any encoding (older outputs included: they are read by the
`storage` their manifest records), read back identically: same columns in the same order
(key, label, passthrough, outputs), same dtypes, same values. Outputs come back in their
configured dtype where that is lossless: a float16 output widened to float32 by the
Parquet encoding is narrowed back exactly; a bfloat16 output is float32 (as stored).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from . import formats
from ._fs import fsspec_fs
from .errors import OutputError
from .schema import read_schema

__all__ = ["Output", "open_output", "to_arrow", "arrow_dataset", "to_pandas", "to_tf_dataset", "head"]


@dataclasses.dataclass(frozen=True)
class Output:
    """A committed output: its root, manifest, storage spec and data files (full paths)."""

    path: str
    manifest: dict
    files: tuple[str, ...]
    # relative paths of this version's files that left the latest version: they are read
    # from the history folder beside the output (`versions.history_root`)
    in_history: frozenset = frozenset()
    relative: tuple[str, ...] = ()  # the files' paths relative to the version's root

    @property
    def version(self) -> int:
        from .versions import manifest_version

        return manifest_version(self.manifest)

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


def open_output(path: str, version: int | None = None) -> Output:
    """Open a committed output directory (local or any fsspec URL), at its latest version or
    at an earlier `version` (see `layerbeam history`): the files of that version are read
    where they lie, in the output or in its history folder.

    Raises:
        OutputError: no `_SUCCESS` (the run is unfinished or failed), or no manifest, or a
            manifest written before layerbeam stored the feature spec, or no such version.
    """
    from .versions import history_root, load_version, paths_of, resolve

    root = path.rstrip("/")
    fs, fs_root = fsspec_fs(root)
    if not fs.exists(f"{fs_root}/_SUCCESS"):
        raise OutputError(f"{path!r} is not a complete layerbeam output (no _SUCCESS); wait for the run to finish or re-run it")
    if version is not None:
        manifest, latest = load_version(root, version)
    else:
        try:
            with fs.open(f"{fs_root}/_manifest.json", "r") as f:
                manifest = latest = json.load(f)
        except FileNotFoundError:
            raise OutputError(f"{path!r} has _SUCCESS but no _manifest.json; it was not written by layerbeam, read it with pyarrow directly") from None
    if "storage" not in manifest:
        raise OutputError(f"{path!r}: the manifest has no 'storage' spec (written by an older layerbeam); re-run the job to read it back here")
    rel = paths_of(manifest, root, latest)  # a big output's come from its sidecar (one column)
    if manifest is latest:  # every file in <out>
        files, in_history = tuple(f"{root}/{p}" for p in rel), frozenset()
    else:
        files = tuple(resolve(root, manifest, latest, p) for p in rel)
        hist = history_root(root)
        in_history = frozenset(p for p, full in zip(rel, files) if full.startswith(hist + "/"))
    if manifest.get("sample"):
        import warnings

        warnings.warn(
            f"{path!r} is a sample (a smoke run over {manifest.get('shards_planned', '?')} of {manifest.get('shards_total', '?')} shards"
            + (f", at most {manifest['config']['input']['max_examples_per_shard']} examples each" if manifest["config"]["input"].get("max_examples_per_shard") else "")
            + "), not the whole input",
            SampleWarning,
            stacklevel=3,
        )
    return Output(root, manifest, files, in_history, tuple(rel))


class SampleWarning(UserWarning):
    """The output read is a smoke run's sample (`--max-shards`, `--max-examples-per-shard`)."""


def _as_output(path: str | Output, version: int | None = None) -> Output:
    return path if isinstance(path, Output) else open_output(path, version)


def to_tf_dataset(path: str | Output, columns: Sequence[str] | None = None) -> Any:
    """A `tf.data.Dataset` of one dict per example, tensors in their shapes.

    TFRecord outputs are parsed by tf.data with the manifest's feature spec; Parquet
    outputs are streamed batch by batch from pyarrow. Files are read in manifest order;
    shuffle downstream if you train on it.

    Args:
        path: the output directory (or an `Output`).
        columns: the columns to read; default all.
    """
    out = _as_output(path)
    return formats.tf_dataset(out, out.select(columns))


def arrow_dataset(path: str | Output) -> Any:
    """A `pyarrow.dataset.Dataset` over the output, partition columns typed from the manifest.

    Parquet: a lazy dataset over the committed files (filter and project without reading
    everything; tensor columns as stored). TFRecord: an in-memory dataset.
    """
    return formats.arrow_dataset(_as_output(path))


def to_arrow(path: str | Output, columns: Sequence[str] | None = None, version: int | None = None) -> pa.Table:
    """The whole output (or some columns) as one `pyarrow.Table`; `version`: an earlier
    version of it (`layerbeam history` lists them), default the latest.

    Columns in manifest order (key, label, passthrough, outputs), partition columns
    included and typed as written; outputs as `fixed_shape_tensor` columns in their
    configured dtype (see the module docstring).
    """
    out = _as_output(path, version)
    cols = out.select(columns)
    tables = list(formats.read_tables(out, cols))
    return pa.concat_tables(tables) if tables else read_schema(cols).empty_table()


def to_pandas(path: str | Output, columns: Sequence[str] | None = None, version: int | None = None):
    """A pandas DataFrame: scalar columns as usual, each output cell an ndarray of its shape."""
    import pandas as pd

    table = to_arrow(path, columns, version)
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
    tables, got = [], 0
    for t in formats.read_tables(out, cols):
        if got >= n:
            break
        tables.append(t.slice(0, n - got))
        got += len(tables[-1])
    return pa.concat_tables(tables) if tables else read_schema(cols).empty_table()
