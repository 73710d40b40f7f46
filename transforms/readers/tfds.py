"""TFDS prepared datasets, by name, split and data_dir (`input.pattern`): one file of the
split (TFRecord or ArrayRecord, as the dataset was prepared) is one shard. Nothing is
downloaded or prepared at run time: the dataset must already be in `data_dir`
(`tfds build` or `builder.download_and_prepare()`).

Records are decoded with the dataset's own feature spec (`info.features`) inside tf.data;
image features are kept encoded and go through the same decoding as every other format
(resize, pixel cap, EXIF, preprocessing). The key is TFDS's own id of the example,
`<file name>__<index>` (what `tfds_id` holds). ArrayRecord files are read with
`array_record`'s data source, record bytes only, into tf.data.
"""

from __future__ import annotations

import functools
import posixpath

import numpy as np

from ..deadletters import Failure
from ._common import explain_by_retry, sentinel_row, tagged, without_autotune
from .images import classify_image, decode_image
from .tensors import decode_tensor

__all__ = ["FRAMED", "is_framed", "shards", "dataset", "parser", "explain", "check_end", "check_inputs", "estimate_examples"]

FRAMED = False  # per file: see `is_framed`


def is_framed(path: str) -> bool:
    """TFRecord files carry TFRecord framing (checked like any TFRecord); ArrayRecord not."""
    return ".tfrecord" in posixpath.basename(path)


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError("input.format 'tfds' needs tensorflow-datasets (and array-record for ArrayRecord files): pip install 'layerbeam[tfds]'") from None
    return tfds


@functools.lru_cache(maxsize=8)
def _builder(name: str, data_dir: str):
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # TFDS raises several types for unknown or unprepared datasets
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"input.tfds_name {name!r} is not a dataset prepared in {data_dir!r} ({first}); prepare it there first (tfds build, no download at run time)") from None
    if not builder.info.splits:
        raise ValueError(f"input.tfds_name {name!r} is not prepared in {data_dir!r}; prepare it there first (tfds build)")
    return builder


def _split(spec):
    builder = _builder(spec.tfds_name, spec.pattern)
    splits = builder.info.splits
    if spec.tfds_split not in splits:
        raise ValueError(f"input.tfds_split {spec.tfds_split!r} is not a split of {spec.tfds_name!r}; its splits: {', '.join(splits)}")
    return builder, splits[spec.tfds_split]


def shards(spec):
    """The split's files, in order, as `Shard`s."""
    import os

    from . import Shard

    builder, split = _split(spec)
    out = []
    for i, name in enumerate(split.filenames):
        path = posixpath.join(str(builder.data_dir), name)
        out.append(Shard(f"s{i:05d}", (path,), os.path.getsize(path) if os.path.exists(path) else 0))
    return out


def _feature(ex, name: str):
    for part in name.split("/"):
        ex = ex[part]
    return ex


def check_inputs(spec, plans) -> None:
    builder, _ = _split(spec)
    have = builder.info.features
    wanted = [p.feature for p in plans.values()] + [c for c in (spec.label_feature, spec.key_feature) if c] + list(spec.passthrough)
    for name in wanted:
        try:
            _feature(have, name)
        except (KeyError, TypeError):
            raise ValueError(f"feature {name!r} is not in {spec.tfds_name!r}; its features: {', '.join(have.keys())}") from None
    for p in plans.values():
        if p.kind == "image" and type(_feature(have, p.feature)).__name__ != "Image":
            raise ValueError(f"input.inputs.{p.name}: feature {p.feature!r} of {spec.tfds_name!r} is a {type(_feature(have, p.feature)).__name__}, not an Image; declare it as a tensor {{feature: {p.feature}}}")


def _records(path: str):
    """Record bytes of an ArrayRecord file, in order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    src = ArrayRecordDataSource([path])
    for start in range(0, len(src), 256):
        yield from src.__getitems__(range(start, min(start + 256, len(src)))) if hasattr(src, "__getitems__") else (src[i] for i in range(start, min(start + 256, len(src))))


def dataset(paths, spec):
    import tensorflow as tf

    if is_framed(paths[0]):
        return tf.data.TFRecordDataset(list(paths), buffer_size=8 << 20)
    return tf.data.Dataset.from_generator(lambda: _records(paths[0]), output_signature=tf.TensorSpec([], tf.string))


def parser(shard, cfg, plans, preprocess):
    import tensorflow as tf

    tfds = _tfds()
    builder, _ = _split(cfg)
    features = builder.info.features
    images = {p.feature for p in plans.values() if p.kind == "image"}
    decoders = _nest({f: tfds.decode.SkipDecoding() for f in images})
    base = posixpath.basename(shard.paths[0])
    types = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}

    def utf8(value):
        return tf.strings.unicode_transcode(value, "UTF-8", "UTF-8", errors="strict")

    def column(value, typ):
        if typ == "string":
            return utf8(value if value.dtype == tf.string else tf.strings.as_string(value))
        return tf.cast(value, types[typ])

    def parse(index, item):
        record, is_sentinel, nbytes = item

        def real():
            ex = features.deserialize_example(record, decoders=decoders)
            out = {}
            for n, p in plans.items():
                v = _feature(ex, p.feature)
                out[f"__input__{n}"] = decode_image(v, p.shape, cfg, preprocess) if p.kind == "image" else decode_tensor(v, p)
            if cfg.key_feature:
                out["key"] = column(_feature(ex, cfg.key_feature), "string")
            else:
                out["key"] = tf.strings.join([base, tf.strings.as_string(index)], "__")  # TFDS's tfds_id
            if cfg.label_feature:
                out["label"] = column(_feature(ex, cfg.label_feature), cfg.label_type)
            for name, typ in cfg.passthrough.items():
                out[name] = column(_feature(ex, name), typ)
            return out

        def fake():
            return sentinel_row(cfg, plans)

        return tagged(is_sentinel, fake, real, index, nbytes)

    return parse


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        node = out
        parts = name.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def check_end(shard, spec, local_path, consumed):
    if is_framed(local_path):
        from .tfrecord import check_end as tfrecord_check_end

        return tfrecord_check_end(shard, spec, local_path, consumed)
    return None, 1 << 62


def estimate_examples(spec, shard_list, budget: int = 2000) -> int:
    """Exact: the split's shard lengths from the dataset's info."""
    _, split = _split(spec)
    cap = spec.max_examples_per_shard
    lengths = list(split.shard_lengths)[: len(shard_list)]
    return sum(min(n, cap) if cap else n for n in lengths)


def explain(shard, cfg, plans, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing record, read again (bad path only)."""
    import tensorflow as tf

    tfds = _tfds()
    builder, _ = _split(cfg)
    base = posixpath.basename(shard.paths[0])
    want = set(missing.tolist())
    if is_framed(local_paths[0]):
        raw = without_autotune(tf.data.TFRecordDataset(local_paths).ignore_errors())
        records = {i: r.numpy() for i, r in enumerate(raw) if i in want}
    else:
        records = {i: r for i, r in enumerate(_records(local_paths[0])) if i in want}
    images = [p for p in plans.values() if p.kind == "image"]
    decoders = _nest({p.feature: tfds.decode.SkipDecoding() for p in images})
    out = []
    for i in missing.tolist():
        key = f"{base}__{i}"
        if i not in records:
            out.append(Failure(i, key, "read", "unreadable_file", "the record could not be read again to explain its failure"))
            continue
        failure = None
        try:
            ex = builder.info.features.deserialize_example(tf.constant(records[i]), decoders=decoders)
        except Exception as e:  # the dataset's own decoder refused the record
            failure = Failure(i, key, "decode", "unparseable_record", f"{len(records[i])} bytes the dataset's feature spec cannot decode ({str(e).splitlines()[0][:200]})")
        if failure is None:
            for p in images:
                bad = classify_image(_feature(ex, p.feature).numpy(), p.shape[-1], getattr(cfg, "max_image_pixels", None))
                if bad:
                    failure = Failure(i, key, "decode", bad[0], f"feature {p.feature!r}: {bad[1]}")
                    break
        out.append(failure or explain_by_retry(i, key, parse, tf.constant(records[i])))
    return out
