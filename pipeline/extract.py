"""`extract()` and `list_layers()`: the library without Beam, for notebooks and tests.

`extract` computes the selected outputs of arrays in memory (or a `tf.data.Dataset`) and
returns them as a `pyarrow.Table`; with `output=` it writes them as a committed output
through the same staging, lock and `commit_run` as `layerbeam run`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .transforms.errors import ConfigError, LayerbeamError

__all__ = ["list_layers", "extract"]


def list_layers(
    model,
    input_shape: Sequence[int] | None = None,
    *,
    reduce: str = "none",
    dtype: str = "float32",
    match: Sequence[str] = (),
    include_inputs: bool = False,
    weights: str | None = None,
    safe_mode: bool = True,
) -> list[dict]:
    """Every tensor of a model that can be tapped: the records `layerbeam layers --json`
    prints under `tensors`.

    Args:
        model: a `keras.Model`, a `.keras`/`.h5` path, `keras.applications.<Name>` or
            `module:function`.
        input_shape: the input shape without the batch axis (default: the model's own).
        reduce, dtype: how `stored_shape` and `bytes_per_example` are computed.
        match: only what these selectors pick, as `layers.select` would.
        include_inputs: let patterns in `match` pick model inputs.
        weights: `keras.applications` weights (default None: random, seeded).

    Returns:
        One dict per tensor, in execution order: `path`, `type`, `shape`, `dtype`,
        `stored_shape`, `bytes_per_example`, `params`, `depth`, `is_model`, `is_input`,
        `opaque` (see `layerbeam.transforms.layers.ModelGraph.describe`).

    Raises:
        ModelError, SelectionError: the model cannot be loaded or traced, a selector in
            `match` picks nothing.
    """
    from .transforms.layers import ModelGraph
    from .transforms.models import resolve_model

    keras_model, _, shapes = resolve_model(model, input_shape=input_shape, weights=weights, safe_mode=safe_mode)
    graph = ModelGraph(keras_model, input_shapes=shapes)
    rows = graph.describe(reduce=reduce, dtype=dtype)
    if match:
        keep = {t.path for sel in match for t in graph.match(sel, include_inputs, what="match selector")}
        rows = [r for r in rows if r["path"] in keep]
    return rows


def extract(
    model,
    inputs,
    select: str | Sequence[str | Mapping[str, Any]] = "all",
    reduce: str = "mean",
    dtype: str = "float32",
    batch_size: int = 32,
    *,
    keys: Sequence[Any] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    exclude: Sequence[str] = (),
    include_inputs: bool = False,
    input_shape: Sequence[int] | None = None,
    output: str | None = None,
    format: str = "parquet",
    partition_by: Sequence[str] = (),
    overwrite: bool = False,
    weights: str | None = None,
    safe_mode: bool = True,
    jit_compile: bool = False,
):
    """The selected layer outputs of every example, as a table or a committed output.

    What you pass is what the model sees (as float32): apply your model's preprocessing
    first (e.g. `keras.applications.mobilenet_v2.preprocess_input`). Every output is held
    in memory until the end (also with `output=`): for more than fits, run a job
    (`layerbeam.run`) or use `ExtractLayers` + `WriteLayers` in a Beam pipeline.

    Args:
        model: a `keras.Model` (used as is), a `.keras`/`.h5` path,
            `keras.applications.<Name>` or `module:function` (as `model.source`).
        inputs: a numpy array of examples (single-input models), a dict {input name:
            array} (multi-input models), or a `tf.data.Dataset` of either, batched or
            not; a dataset of `(x, y)` tuples is read as Keras does (x only).
        select: selectors as in `layers.select`: a string or a list of strings and
            mappings `{layer, as, reduce, dtype}`. Run `layerbeam.list_layers(model)`
            to see the paths.
        reduce: none | mean | max | flatten (default for every selector).
        dtype: float32 | float16 | bfloat16 (stored as float32 rounded to bfloat16).
        batch_size: examples per model call.
        keys: one unique key per example (default: the row index, as a string).
        columns: extra per-example columns, e.g. `{"label": y}` (ints → int64, floats →
            float32, strings → string); `partition_by` may name them.
        exclude, include_inputs: as `layers.exclude` / `layers.include_inputs`.
        input_shape: trace (or build, for `keras.applications`) the model at this shape.
        output: write here (local path or fsspec URL) instead of returning the table:
            the same layout, `_manifest.json` and `_SUCCESS` as `layerbeam run`,
            readable with `layerbeam.read(output)`.
        format: parquet | tfrecord (with `output`).
        partition_by: Hive partition columns, from `columns` (with `output`).
        overwrite: replace an existing complete output.

    Returns:
        Without `output`: a `pyarrow.Table`, one row per example: `key`, the `columns`,
        then one `fixed_shape_tensor` column per output (what `layerbeam.read` gives for
        the same data written). With `output`: the committed manifest (a dict).

    Raises:
        ModelError, SelectionError: the model cannot be loaded, a selector matches nothing.
        ConfigError: inputs that do not fit the model, keys that repeat or do not match
            the examples in number, a bad column, or an output that exists already.
    """
    from .transforms.extractor import Extractor, extractor_model
    from .transforms.layers import ModelGraph
    from .transforms.models import model_fingerprint, resolve_model

    keras_model, spec, shapes = resolve_model(model, input_shape=input_shape, weights=weights, safe_mode=safe_mode)
    graph = ModelGraph(keras_model, input_shapes=shapes)
    selectors = [select] if isinstance(select, (str, Mapping)) else list(select)
    specs = graph.select(selectors, exclude=exclude, reduce=reduce, dtype=dtype, include_inputs=include_inputs)
    extractor = Extractor(extractor_model(graph, specs), jit_compile=jit_compile)
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size!r} must be at least 1")

    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    n = 0
    for batch in _batches(inputs, graph.input_shapes, batch_size):
        for name, v in extractor(batch).items():
            parts[name].append(v)
        n += len(next(iter(batch.values())))
    outputs = {s.name: np.concatenate(parts[s.name]) if parts[s.name] else np.zeros((0, *s.shape), np.float16 if s.dtype == "float16" else np.float32) for s in specs}
    keys = _keys(keys, n)
    plain = _columns(columns or {}, n, [s.name for s in specs])
    import pyarrow as pa

    from .transforms.schema import output_schema, to_record_batch

    col_types = {"key": pa.string(), **{k: t for k, (_, t) in plain.items()}}
    schema = output_schema(specs, col_types)
    values = {k: v for k, (v, _) in plain.items()}
    if output is None:
        if partition_by:
            raise ConfigError(f"partition_by {list(partition_by)} is given without output; pass output=PATH to write a partitioned output")
        batch = to_record_batch(schema, {"key": np.array(keys, dtype=object), **values}, outputs)
        return pa.Table.from_batches([batch], schema=schema)
    for p in partition_by:
        if p not in plain:
            raise ConfigError(f"partition_by names {p!r}, which is not a column; partition by one of {sorted(plain) or 'nothing yet: pass columns={...}'}")
    model_info = {
        "source": spec.source if spec else f"<in-memory keras.Model {keras_model.name!r}>",
        "weights": spec.weights if spec else None,
        "fingerprint": model_fingerprint(keras_model),
        "input_shapes": {k: list(v) for k, v in graph.input_shapes.items()},
    }
    config = {
        "input": {"kind": "python", "examples": n, "columns": sorted(plain)},
        "model": {"source": model_info["source"], "weights": model_info["weights"], "input_shape": list(shapes[0]) if shapes else None},
        "layers": {"select": [s if isinstance(s, str) else dict(s) for s in selectors], "exclude": list(exclude), "reduce": reduce, "dtype": dtype, "include_inputs": include_inputs},
        "batching": {"batch_size": batch_size, "jit_compile": jit_compile},
        "output": {"path": output, "format": format, "partition_by": list(partition_by), "overwrite": overwrite},
    }
    return _write(output, format, tuple(partition_by), overwrite, schema, specs, keys, values, outputs, model_info, config)


def _write(output, fmt, partition_by, overwrite, schema, specs, keys, values, outputs, model_info, config) -> dict:
    """Stage the rows as one shard and commit them as a pipeline run does."""
    import json

    from .transforms.commit import OutputLock
    from .transforms.formats import FORMATS, WriteSpec, make_writer
    from .transforms.rows import commit_rows, manifest_base, refuse_existing, write_rows
    from .transforms.staging import OutputLayout

    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    run_id = uuid.uuid4().hex[:16]  # rows in memory cannot be resumed: every call is a new run
    layout = OutputLayout(output, run_id)
    refuse_existing(layout, overwrite)
    writer = make_writer(WriteSpec(path=output, format=fmt, partition_by=partition_by, overwrite=overwrite), schema)
    lock = OutputLock(layout)
    lock.acquire()
    try:
        if overwrite:
            layout.discard_runs(layout.other_runs())  # half-built runs left by crashed calls
        layout.write_run_info({"run_id": run_id, "config": config, "model_fingerprint": model_info["fingerprint"]})
        result = write_rows(layout, writer, schema, "s00000", keys, values, outputs, model_info["fingerprint"], origin="<layerbeam.extract>")
        commit_rows([result], manifest_base(run_id, config, model_info, specs, writer.storage_spec()))
    finally:
        lock.release()
    with layout.fs.open(f"{layout.out}/{layout.MANIFEST}") as f:
        return json.load(f)


def _is_dataset(x) -> bool:
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def _batches(inputs, input_shapes: Mapping[str, tuple[int, ...]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """{input name: float32 batch}, checked against the model's input shapes."""
    from .transforms.extractor import model_inputs

    try:
        if _is_dataset(inputs):
            yield from _dataset_batches(inputs, input_shapes, batch_size)
            return
        if isinstance(inputs, (list, tuple)):
            inputs = np.asarray(inputs)
        arrays = model_inputs(inputs, input_shapes, batched=True)
    except ValueError as e:
        if isinstance(e, LayerbeamError):
            raise
        raise ConfigError(str(e)) from None
    sizes = {n: len(a) for n, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"inputs have different numbers of examples {sizes}; give every model input the same number")
    total = next(iter(sizes.values()))
    for lo in range(0, total, batch_size):
        yield {n: a[lo : lo + batch_size] for n, a in arrays.items()}


def _dataset_batches(ds, input_shapes, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
    import tensorflow as tf

    from .transforms.extractor import model_inputs

    spec = ds.element_spec
    if isinstance(spec, tuple):  # (x, y) or (x, y, weights), as Keras reads it
        ds = ds.map(lambda *xs: xs[0])
        spec = ds.element_spec
    first = next(iter(spec.values())) if isinstance(spec, Mapping) else spec
    if not isinstance(first, tf.TensorSpec):
        raise ConfigError(f"the dataset's elements are {spec}; give a dataset of arrays or of dicts {{input name: array}}")
    rank = len(next(iter(input_shapes.values())))
    if first.shape.rank == rank:  # single examples
        ds = ds.batch(batch_size)
    for b in ds.as_numpy_iterator():
        yield model_inputs(b, input_shapes, batched=True, what="a dataset batch")


def _keys(keys: Sequence[Any] | None, n: int) -> list[str]:
    if keys is None:
        return [str(i) for i in range(n)]
    out = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
    if len(out) != n:
        raise ConfigError(f"keys has {len(out)} entries for {n} examples; give one key per example")
    seen: set[str] = set()
    for k in out:
        if k in seen:
            raise ConfigError(f"key {k!r} is given twice; keys must be unique (they name the rows)")
        seen.add(k)
    return out


def _columns(columns: Mapping[str, Sequence[Any]], n: int, outputs: Sequence[str]) -> dict[str, tuple[np.ndarray, Any]]:
    """name → (values, Arrow type) for the extra columns."""
    import pyarrow as pa

    out = {}
    for name, values in columns.items():
        if name == "key" or name in outputs:
            raise ConfigError(f"column {name!r} has the name of {'the key' if name == 'key' else 'an output'}; rename it")
        a = np.asarray(values)
        if a.shape != (n,):
            raise ConfigError(f"column {name!r} has shape {a.shape}; give one scalar per example ({n})")
        if a.dtype.kind in "biu":
            out[name] = (a.astype(np.int64), pa.int64())
        elif a.dtype.kind == "f":
            out[name] = (a.astype(np.float32), pa.float32())
        elif a.dtype.kind in "USO":
            out[name] = (np.array([v.decode() if isinstance(v, bytes) else str(v) for v in a.tolist()], dtype=object), pa.string())
        else:
            raise ConfigError(f"column {name!r} has dtype {a.dtype}; give ints, floats or strings")
    return out
