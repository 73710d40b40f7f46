"""Parquet tables: one file is one shard; columns are mapped to model inputs, the key,
the label and passthrough columns exactly as TFRecord features are.

pyarrow reads the columns a batch of rows at a time (never a row at a time) into
`tf.data.Dataset.from_generator`; everything after that, image decoding included, runs in
tf.data. Column types:

* binary/string: encoded images (or strings); a Hugging Face `Image` column, a struct
  `{bytes, path}`, is read through its `bytes` field;
* integer, floating and boolean scalars: tensors of shape [] (or any shape of one value);
* lists (list, large_list, fixed_size_list) of numbers or strings: one flat list per row,
  reshaped to the input's shape (row-major), or padded per batch for `[null]` shapes.

A null in a column the run reads makes that row a `null_value` dead letter.
"""

from __future__ import annotations

import posixpath

import numpy as np

from ..deadletters import Failure
from ._common import explain_by_retry, sentinel_row, tagged
from .images import classify_image, decode_image
from .tensors import decode_tensor

__all__ = ["FRAMED", "dataset", "parser", "explain", "check_end", "check_inputs", "check_shards", "estimate_examples"]

FRAMED = False
_VALID = "__valid__"
_LENGTHS = "/__lengths__"
_BATCH_ROWS = 1024


def _columns(spec) -> list[str]:
    """Every column the run reads, in a stable order."""
    inputs = spec.inputs or {"": spec.image_feature}
    cols = [v if isinstance(v, str) else v["feature"] for v in inputs.values()]
    cols += [c for c in (spec.key_feature, spec.label_feature) if c]
    cols += list(spec.passthrough)
    return list(dict.fromkeys(cols))


def _leaf(typ):
    """(tf dtype name, is_list, is_image_struct) of an Arrow column type, or raise ValueError."""
    import pyarrow as pa

    t = typ
    image = False
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        t, image = t.field("bytes").type, True
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if is_list:
        t = t.value_type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            raise ValueError(f"a nested list ({typ}); store each row as one flat list (the input's shape restores it)")
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string", is_list, image
    if pa.types.is_integer(t):
        return "int64", is_list, image
    if pa.types.is_floating(t):
        return "float64" if t.bit_width == 64 else "float32", is_list, image
    if pa.types.is_boolean(t):
        return "bool", is_list, image
    raise ValueError(f"a column of type {typ}, which layerbeam cannot feed to a model or store")


def _schema(spec, path: str) -> dict:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    out = {}
    for c in _columns(spec):
        if c not in schema.names:
            raise ValueError(f"column {c!r} is not in {path!r}; its columns are {', '.join(schema.names[:12])}")
        try:
            out[c] = _leaf(schema.field(c).type)
        except ValueError as e:
            raise ValueError(f"column {c!r} of {path!r} is {e}") from None
    return out


def check_inputs(spec, plans) -> None:
    """Nothing beyond the plans: columns are checked against the first file (`check_shards`)."""


def check_shards(spec, shard) -> None:
    from .._fs import LocalBridge

    bridge = LocalBridge(shard.paths[:1])
    try:
        _schema(spec, bridge.paths[0])
    finally:
        bridge.close()


def _flat(arr, dtype: str, is_list: bool, image: bool):
    """(values, lengths or None, validity) numpy arrays of one column chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    if image:
        arr = pc.struct_field(arr, "bytes")
        valid &= np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    lengths = None
    if is_list:
        lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False), np.int64)
        arr = pc.list_flatten(arr)
    if dtype == "string":
        values = np.array(arr.cast(pa.binary()).fill_null(b"").to_pylist(), dtype=object) if len(arr) else np.zeros(0, object)
    else:
        values = np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False)).astype(dtype)
    return values, lengths, valid


def dataset(paths, spec):
    """Rows of the file as dicts of column → value (lists as flat 1-D tensors), plus a
    validity flag (no null in any column read)."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    path = paths[0]
    kinds = _schema(spec, path)
    columns = list(kinds)
    signature = {_VALID: tf.TensorSpec([None], tf.bool)}
    for c, (dtype, is_list, _) in kinds.items():
        signature[c] = tf.TensorSpec([None], tf.as_dtype(dtype))
        if is_list:
            signature[c + _LENGTHS] = tf.TensorSpec([None], tf.int64)

    def batches():
        for rb in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            out = {}
            valid = np.ones(rb.num_rows, bool)
            for c, (dtype, is_list, image) in kinds.items():
                values, lengths, ok = _flat(rb.column(c), dtype, is_list, image)
                valid &= ok
                out[c] = values
                if is_list:
                    out[c + _LENGTHS] = lengths
            out[_VALID] = valid
            yield out

    def rows(batch):
        out = {_VALID: batch[_VALID]}
        for c, (_, is_list, _) in kinds.items():
            out[c] = tf.RaggedTensor.from_row_lengths(batch[c], batch[c + _LENGTHS]) if is_list else batch[c]
        return out

    return tf.data.Dataset.from_generator(batches, output_signature=signature).map(rows).unbatch()


def parser(shard, cfg, plans, preprocess):
    import tensorflow as tf

    base = posixpath.basename(shard.paths[0])
    passthrough_types = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}

    def utf8(value):
        return tf.strings.unicode_transcode(value, "UTF-8", "UTF-8", errors="strict")

    def parse(index, item):
        row, is_sentinel, nbytes = item

        def real():
            check = tf.debugging.assert_equal(row[_VALID], True, message="null_value")
            with tf.control_dependencies([check]):
                out = {}
                for n, p in plans.items():
                    v = row[p.feature]
                    if isinstance(v, tf.RaggedTensor):
                        v = v.flat_values
                    out[f"__input__{n}"] = decode_image(v, p.shape, cfg, preprocess) if p.kind == "image" else decode_tensor(v, p)
                if cfg.key_feature:
                    k = row[cfg.key_feature]
                    out["key"] = utf8(k) if k.dtype == tf.string else tf.strings.as_string(k)  # an integer id column
                else:
                    out["key"] = tf.strings.join([base, tf.strings.as_string(index)], ":")
                if cfg.label_feature:
                    label = row[cfg.label_feature]
                    out["label"] = utf8(label) if cfg.label_type == "string" else tf.cast(label, tf.int64)
                for name, typ in cfg.passthrough.items():
                    v = row[name]
                    out[name] = utf8(v) if typ == "string" else tf.cast(v, passthrough_types[typ])
            return out

        def fake():
            return sentinel_row(cfg, plans)

        return tagged(is_sentinel, fake, real, index, nbytes)

    return parse


def check_end(shard, spec, local_path, consumed):
    return None, 1 << 62


def estimate_examples(spec, shards, budget: int = 2000) -> int:
    """Exact: the row counts in the files' footers."""
    import pyarrow.parquet as pq

    from .._fs import LocalBridge

    cap = spec.max_examples_per_shard
    total = 0
    for s in shards:
        bridge = LocalBridge(s.paths[:1])
        try:
            n = pq.ParquetFile(bridge.paths[0]).metadata.num_rows
        finally:
            bridge.close()
        total += min(n, cap) if cap else n
    return total


# --------------------------------------------------------------------------- the bad path


def explain(shard, cfg, plans, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing row, read again with pyarrow (bad path only)."""
    import pyarrow.parquet as pq
    import tensorflow as tf

    base = posixpath.basename(shard.paths[0])
    kinds = _schema(cfg, local_paths[0])
    table = pq.read_table(local_paths[0], columns=list(kinds)).take(missing)
    out = []
    for j, i in enumerate(missing.tolist()):
        row = {c: table.column(c)[j].as_py() for c in kinds}
        key = f"{base}:{i}"
        if cfg.key_feature and row[cfg.key_feature] is not None:
            k = row[cfg.key_feature]
            key = k.decode("utf-8", "backslashreplace") if isinstance(k, bytes) else str(k)
        nulls = [c for c, v in row.items() if v is None or (kinds[c][2] and v.get("bytes") is None)]
        if nulls:
            out.append(Failure(i, key, "decode", "null_value", f"column {nulls[0]!r} is null in this row"))
            continue
        texts = [c for c in (cfg.key_feature, cfg.label_feature if cfg.label_type == "string" else None, *[n for n, t in cfg.passthrough.items() if t == "string"]) if c]
        bad_text = [c for c in texts if isinstance(row[c], bytes) and not _is_utf8(row[c])]
        if bad_text:
            out.append(Failure(i, key, "decode", "invalid_utf8", f"column {bad_text[0]!r} holds {row[bad_text[0]][:40]!r}, not UTF-8 text"))
            continue
        failure = None
        for p in plans.values():
            if p.kind == "image":
                value = row[p.feature]
                data = value["bytes"] if isinstance(value, dict) else value
                bad = classify_image(data, p.shape[-1], getattr(cfg, "max_image_pixels", None))
                if bad:
                    failure = Failure(i, key, "decode", bad[0], f"column {p.feature!r}: {bad[1]}")
                    break
        if failure is None:
            item = {_VALID: tf.constant(True)}
            for c, (dtype, is_list, image) in kinds.items():
                v = row[c]["bytes"] if image else row[c]
                item[c] = tf.constant(v, dtype=tf.as_dtype(dtype))
            failure = explain_by_retry(i, key, parse, item)
        out.append(failure)
    return out


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

