"""TFRecord files of `tf.train.Example`: one file is one shard; features → model inputs
and row columns."""

from __future__ import annotations

import os
import posixpath
import threading

import numpy as np

from ..deadletters import Failure
from ..errors import first_line
from ._common import explain_by_retry, sentinel_row, tagged, without_autotune
from .images import classify_image, decode_image
from .framing import count_records
from .tensors import decode_tensor, list_kind, tensor_parse_spec

__all__ = ["FRAMED", "dataset", "parser", "explain", "check_end", "check_inputs", "estimate_examples", "feature_map"]

FRAMED = True


def dataset(paths, spec):
    """`paths`: a list, or a string tensor (a shard's files inside a long-lived pipeline)."""
    import tensorflow as tf

    files = paths if isinstance(paths, tf.Tensor) else list(paths)
    return tf.data.TFRecordDataset(files, compression_type=spec.compression or None, buffer_size=8 << 20)


def check_inputs(spec, plans) -> None:
    """Every kind of input is read from TFRecord features: nothing more to check."""


def feature_map(plans) -> dict[str, str]:
    """model input name → the feature holding it."""
    return {n: p.feature for n, p in plans.items()}


def parser(shard, cfg, plans, preprocess):
    # Without a key feature the keys name the shard's file, so each shard has its own parser.
    base = None if cfg.key_feature else posixpath.basename(shard.paths[0])
    return _cached((repr(cfg), repr(plans), preprocess, base), lambda: _traced_parser(cfg, plans, preprocess, base))


def shared_parser(cfg, plans, preprocess):
    """The parser of every shard at once, for `readers.ShardReaders`' long-lived pipeline:
    `(index, item, base) → row`, `base` (the shard's file name, which keys name when there
    is no key feature) a string tensor instead of a constant traced in. Traced once per worker."""
    return _cached((repr(cfg), repr(plans), preprocess, "shared"), lambda: _traced_parser(cfg, plans, preprocess, None, shared=True))


_PARSERS: dict[tuple, object] = {}  # (spec, plans, preprocess, file name, None or "shared") → traced parser
_PARSERS_LOCK = threading.Lock()


def _cached(key: tuple, build):
    """The parser under `key`, built once per worker (the 8 most recently built kept)."""
    with _PARSERS_LOCK:
        if key not in _PARSERS:
            if len(_PARSERS) >= 8:
                _PARSERS.pop(next(iter(_PARSERS)))
            _PARSERS[key] = build()
        return _PARSERS[key]


def _traced_parser(cfg, plans, preprocess, base, shared: bool = False):
    """The parser as a `tf.function` with a fixed signature, traced once per worker and
    reused by every shard: tf.data re-traces a plain Python map function for each new
    dataset, which cost each shard more than its model time on small shards (py-spy: the
    map's trace was half of `read_shard`'s set-up). Its `explain` attribute is the
    plain parser, which `explain()` runs eagerly for the exact error of a failed record.

    Without AutoGraph: the parser's own branches are on Python values (the config), and
    converting it cost the first shard 3.5 s of its 5 s trace under load (py-spy; 1.4 s
    without). A user's `input.preprocess` function may branch on tensors, so it alone is
    converted, as its own `tf.function`."""
    import tensorflow as tf

    user = preprocess is not None and not getattr(preprocess, "__module__", "").startswith(("keras.", "layerbeam."))
    scalar = tf.TensorSpec([], tf.int64)
    item = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.int64))
    pre = tf.function(preprocess) if user else preprocess
    if shared:  # the file name is an argument: `_tfrecord_parser` takes a tensor as well as a str

        def parse_any(index, item, base):
            return _tfrecord_parser(cfg, plans, pre, base)(index, item)

        return tf.function(parse_any, input_signature=[scalar, item, tf.TensorSpec([], tf.string)], autograph=False)
    parse = _tfrecord_parser(cfg, plans, pre, base)
    traced = tf.function(parse, input_signature=[scalar, item], autograph=False)
    traced.explain = _tfrecord_parser(cfg, plans, preprocess, base) if user else parse  # all eager: the op's own error
    return traced


def _tfrecord_parser(cfg, plans, preprocess, shard_base):
    import tensorflow as tf

    spec = {}
    for p in plans.values():
        spec[p.feature] = tf.io.FixedLenFeature([], tf.string) if p.kind == "image" else tensor_parse_spec(p)
    if cfg.key_feature:
        spec[cfg.key_feature] = tf.io.FixedLenFeature([], tf.string)
    if cfg.label_feature:
        spec[cfg.label_feature] = tf.io.FixedLenFeature([], tf.as_dtype(cfg.label_type))
    for name, typ in cfg.passthrough.items():
        spec[name] = tf.io.FixedLenFeature([], tf.as_dtype(typ))

    def utf8(value):
        # Output string columns are UTF-8 text: invalid bytes fail the record here (a
        # dead letter, `invalid_utf8`) instead of failing the shard's Arrow conversion.
        return tf.strings.unicode_transcode(value, "UTF-8", "UTF-8", errors="strict")

    def decode(p, value):
        return decode_image(value, p.shape, cfg, preprocess) if p.kind == "image" else decode_tensor(value, p)

    def parse(index, item):
        record, is_sentinel, nbytes = item

        def real():
            ex = tf.io.parse_single_example(record, spec)
            out = {f"__input__{n}": decode(p, ex[p.feature]) for n, p in plans.items()}
            out["key"] = utf8(ex[cfg.key_feature]) if cfg.key_feature else tf.strings.join([shard_base, tf.strings.as_string(index)], ":")
            if cfg.label_feature:
                out["label"] = utf8(ex[cfg.label_feature]) if cfg.label_type == "string" else ex[cfg.label_feature]
            for name, typ in cfg.passthrough.items():
                out[name] = utf8(ex[name]) if typ == "string" else ex[name]
            return out

        def fake():
            return sentinel_row(cfg, plans)

        return tagged(is_sentinel, fake, real, index, nbytes)

    return parse


_KINDS = {"int64": "int64_list", "float32": "float_list", "string": "bytes_list"}


def _needed_features(cfg, plans) -> list[tuple[str, str, int | None]]:
    need = [(p.feature, *list_kind(p)) for p in plans.values()]
    if cfg.key_feature:
        need.append((cfg.key_feature, "bytes_list", 1))
    if cfg.label_feature:
        need.append((cfg.label_feature, _KINDS[cfg.label_type], 1))
    need += [(name, _KINDS[typ], 1) for name, typ in cfg.passthrough.items()]
    return need


def _explain_record(record: bytes, index: int, base: str, cfg, plans, parse) -> Failure:
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    key = f"{base}:{index}"
    ex = tf.train.Example()
    try:
        ex.ParseFromString(record)
    except DecodeError as e:
        return Failure(index, key, "decode", "unparseable_record", f"{len(record)} bytes that are not a tf.train.Example ({first_line(e)})")
    feats = ex.features.feature
    if cfg.key_feature and cfg.key_feature in feats and feats[cfg.key_feature].WhichOneof("kind") == "bytes_list":
        values = feats[cfg.key_feature].bytes_list.value
        if len(values) == 1:
            key = values[0].decode("utf-8", "backslashreplace")
    for name, kind, count in _needed_features(cfg, plans):
        if name not in feats:
            have = ", ".join(sorted(feats)[:8]) or "none"
            return Failure(index, key, "decode", "missing_feature", f"feature {name!r} is missing; the record has: {have}")
        got = feats[name].WhichOneof("kind")
        if got != kind:
            return Failure(index, key, "decode", "wrong_feature_type", f"feature {name!r} is a {got}, the config reads a {kind}")
        n = len(getattr(feats[name], kind).value)
        if count is not None and n != count:
            return Failure(index, key, "decode", "wrong_feature_type", f"feature {name!r} holds {n} values, the config reads exactly {count}")
    texts = [cfg.key_feature] if cfg.key_feature else []
    texts += [cfg.label_feature] if cfg.label_feature and cfg.label_type == "string" else []
    texts += [n for n, typ in cfg.passthrough.items() if typ == "string"]
    for name in texts:
        raw = feats[name].bytes_list.value[0]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Failure(index, key, "decode", "invalid_utf8", f"feature {name!r} holds {raw[:40]!r}, not UTF-8 text ({e.reason} at byte {e.start})")
    for input_name, p in plans.items():
        if p.kind == "image":
            bad = classify_image(feats[p.feature].bytes_list.value[0], p.shape[-1], getattr(cfg, "max_image_pixels", None))
            if bad:
                return Failure(index, key, "decode", bad[0], f"feature {p.feature!r}: {bad[1]}")
    return explain_by_retry(index, key, parse, tf.constant(record))


def explain(shard, cfg, plans, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing index, read again record by record (bad path only)."""
    import tensorflow as tf

    out: list[Failure] = []
    base = posixpath.basename(shard.paths[0])
    wanted = tf.constant(missing, tf.int64)
    ds = without_autotune(tf.data.TFRecordDataset(local_paths, compression_type=cfg.compression or None).enumerate())
    ds = ds.filter(lambda i, r: tf.reduce_any(tf.equal(i, wanted))).ignore_errors()
    found = {}
    for i, rec in ds:
        found[int(i)] = _explain_record(rec.numpy(), int(i), base, cfg, plans, parse)
    for i in missing.tolist():
        out.append(found.get(i) or Failure(i, f"{base}:{i}", "read", "unreadable_file", "the record could not be read again to explain its failure"))
    return out


def check_end(shard: Shard, cfg, local_path: str, consumed: int) -> tuple[Failure | None, int]:
    """(shard-level failure or None, records readable before any damage).

    Uncompressed files: the records' framing must add up to the file's size (free: the
    sum was carried through tf.data). Compressed files, and files that do not add up, are
    read once more in C++, counting records, to see whether and where DataLossError comes.
    """
    import re

    import tensorflow as tf

    if not cfg.compression:
        size = tf.io.gfile.stat(local_path).length
        if consumed == size:
            return None, 1 << 62
    raw = without_autotune(tf.data.TFRecordDataset([local_path], compression_type=cfg.compression or None))
    try:
        raw.reduce(np.int64(0), lambda n, _: n + 1)
        return None, 1 << 62
    except tf.errors.OpError as e:
        m = re.search(r"(corrupted|truncated) record at \d+", str(e))
        what = m.group(0) if m else first_line(e)
    readable = int(raw.ignore_errors().reduce(np.int64(0), lambda n, _: n + 1))
    where = f"{what} (byte offset)" + (f", file size {tf.io.gfile.stat(local_path).length}" if not cfg.compression else "")
    return (
        Failure(
            None, shard.paths[0], "read", "corrupt_shard",
            f"{where}: kept the {readable} records before the damage, the rest of the file cannot be read; re-create or re-download the file",
        ),
        readable,
    )


def estimate_examples(cfg, shards, budget: int = 2000) -> int | None:
    """Records are counted shard by shard (up to `budget` records read): exact when every
    shard fits in the budget, else scaled by file size from the shards read completely
    (or, when not even the first shard fits, by the mean record size, which assumes no
    compression)."""
    import tensorflow as tf

    from .._fs import LocalBridge

    cap = cfg.max_examples_per_shard
    counts: list[int] = []  # records of each shard read completely
    n_partial, nbytes = 0, 0
    for shard in shards:
        left = budget - sum(counts)
        if left <= 0:
            break
        bridge = LocalBridge(shard.paths[:1])
        try:
            n = 0
            if not cfg.compression and os.path.isfile(bridge.paths[0]):
                # Headers walked in Python: TensorFlow never sees an unchecked length here.
                # A damaged file counts its records up to the damage (the read counts the rest).
                n, size, _ = count_records(bridge.paths[0], left)
                nbytes += size
            else:
                for rec in tf.data.TFRecordDataset(bridge.paths, compression_type=cfg.compression or None).take(left + 1):
                    n += 1
                    nbytes += len(rec.numpy()) + 16  # 16 bytes of TFRecord framing per record
        except tf.errors.OpError:
            return None
        finally:
            bridge.close()
        if n > left:
            n_partial = n
            break
        counts.append(n)
    capped = [min(c, cap) if cap else c for c in counts]
    if len(counts) == len(shards):
        return sum(capped)
    rest = shards[len(counts):]
    if counts and sum(s.size for s in shards[: len(counts)]):
        per_byte = sum(counts) / sum(s.size for s in shards[: len(counts)])
    elif n_partial:
        per_byte = n_partial / nbytes
    else:
        return None
    est_rest = [round(s.size * per_byte) for s in rest]
    return sum(capped) + sum(min(e, cap) if cap else e for e in est_rest)
