"""Find input shards and read them through tf.data into decoded, batched examples.

Decoding happens inside tf.data (parallel, in C++), never per element in Python. A record
that cannot be parsed or decoded is dropped by tf.data and reported by index, so the caller
can turn it into a dead letter: every record read is accounted for.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["Shard", "Batch", "match_shards", "read_shard", "tf_readable"]

# Schemes TensorFlow's own file systems read; anything else goes through an fsspec bridge.
_TF_SCHEMES = ("gs://", "ram://")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: a TFRecord file, or a group of image files.

    Attributes:
        id: stable id used in output file names (`s00003`).
        paths: the files; one for TFRecord.
        size: total bytes.
    """

    id: str
    paths: tuple[str, ...]
    size: int = 0


@dataclasses.dataclass
class Batch:
    """Decoded examples of one batch.

    Attributes:
        index: record index within the shard, per example (int64).
        columns: key, label and passthrough columns as numpy arrays.
        inputs: model input name → float32 tensor (B, H, W, C).
    """

    index: np.ndarray
    columns: dict[str, np.ndarray]
    inputs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.index)


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def match_shards(pattern: str, fmt: str, files_per_shard: int = 512) -> list[Shard]:
    """Expand a pattern into shards, in sorted path order (deterministic ids).

    Args:
        pattern: glob over a local path or any fsspec URL (`gs://`, `memory://`, `s3://` …).
        fmt: 'tfrecord' (one shard per file) or 'images' (groups of `files_per_shard` files).
    """
    fs, path = _fs(pattern)
    if not any(c in path for c in "*?["):
        if fs.isdir(path):
            path = path.rstrip("/") + ("/**" if fmt == "images" else "/*")
    infos = fs.glob(path, detail=True)
    files = sorted((p, int(i.get("size") or 0)) for p, i in infos.items() if i.get("type") != "directory")
    local = "://" not in pattern or pattern.startswith("file://")
    name = (lambda p: p) if local else fs.unstrip_protocol
    if fmt == "tfrecord":
        return [Shard(f"s{i:05d}", (name(p),), s) for i, (p, s) in enumerate(files)]
    out = []
    for k in range(0, len(files), files_per_shard):
        chunk = files[k : k + files_per_shard]
        out.append(Shard(f"s{k // files_per_shard:05d}", tuple(name(p) for p, _ in chunk), sum(s for _, s in chunk)))
    return out


def tf_readable(path: str) -> bool:
    return "://" not in path or path.startswith(_TF_SCHEMES)


class _LocalBridge:
    """Copies files TensorFlow cannot read (memory://, s3://, …) to a local temp folder."""

    def __init__(self, paths: tuple[str, ...]):
        self.dir = None
        self.paths = []
        for p in paths:
            if tf_readable(p) or p.startswith("file://"):
                self.paths.append(p[len("file://"):] if p.startswith("file://") else p)
                continue
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="layerbeam-bridge-")
            local = os.path.join(self.dir, f"{len(self.paths):06d}-{posixpath.basename(p)}")
            fs, fp = _fs(p)
            fs.get(fp, local)
            self.paths.append(local)

    def close(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def read_shard(
    shard: Shard,
    cfg,
    input_shapes: Mapping[str, tuple[int, ...]],
    preprocess,
    batch_size: int,
    max_examples: int | None = None,
) -> Iterator[tuple[Batch | None, int]]:
    """Yield `(batch, records_so_far)`; the final item is `(None, total_records)`.

    Records that fail to parse or decode are missing from the batches; their indices are
    those in `range(total_records)` not seen in any batch.

    Args:
        shard: the shard.
        cfg: the `InputConfig`.
        input_shapes: model input name → (H, W, C) the images are resized to.
        preprocess: float32 (B?, H, W, C) 0..255 → model input; runs inside tf.data.
        batch_size: examples per batch.
        max_examples: read at most this many records of the shard.
    """
    import tensorflow as tf

    bridge = _LocalBridge(shard.paths)
    try:
        features = _feature_map(cfg, input_shapes)
        if cfg.format == "tfrecord":
            raw = tf.data.TFRecordDataset(bridge.paths, compression_type=cfg.compression or None, buffer_size=8 << 20)
            if max_examples:
                raw = raw.take(max_examples)
            base = posixpath.basename(shard.paths[0])
            parse = _tfrecord_parser(cfg, input_shapes, preprocess, features, base)
        else:
            raw = tf.data.Dataset.from_tensor_slices(list(bridge.paths))
            if max_examples:
                raw = raw.take(max_examples)
            originals = tf.constant(list(shard.paths))
            parse = _image_file_parser(cfg, input_shapes, preprocess, originals)
        # A sentinel after the last record carries the record count through the same
        # pipeline, so records that fail at the very end are still counted.
        sentinel = tf.data.Dataset.from_tensors((tf.constant(b"" if cfg.format == "tfrecord" else ""), tf.constant(True)))
        ds = raw.map(lambda r: (r, tf.constant(False))).concatenate(sentinel).enumerate()
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().batch(batch_size).prefetch(2)
        seen = 0
        for el in ds:
            index = el.pop("__index__").numpy()
            is_sentinel = el.pop("__sentinel__").numpy()
            inputs = {n: el.pop(f"__input__{n}") for n in input_shapes}
            if is_sentinel.any():
                total = int(index[is_sentinel][0])
                keep = ~is_sentinel
                index = index[keep]
                inputs = {n: tf.boolean_mask(v, keep) for n, v in inputs.items()}
                el = {k: tf.boolean_mask(v, keep) for k, v in el.items()}
                if len(index):
                    yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen + len(index)
                yield None, total
                return
            seen += len(index)
            yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen
        raise RuntimeError(f"shard {shard.id} ended without its sentinel record; this is a bug")
    finally:
        bridge.close()


def _feature_map(cfg, input_shapes) -> dict[str, str]:
    """model input name → feature holding its encoded image."""
    if cfg.inputs:
        missing = [n for n in input_shapes if n not in cfg.inputs]
        if missing:
            raise ValueError(
                f"input.inputs maps {sorted(cfg.inputs)}, but the model's inputs are {list(input_shapes)}; "
                f"add a feature for {missing}"
            )
        return {n: cfg.inputs[n] for n in input_shapes}
    if len(input_shapes) > 1:
        raise ValueError(
            f"the model has {len(input_shapes)} inputs {list(input_shapes)}; map each to a feature "
            "with input.inputs: {input_name: feature}"
        )
    return {next(iter(input_shapes)): cfg.image_feature}


_TF_TYPES = {"int64": "int64", "float32": "float32", "string": "string"}


def _decode_image(data, shape, cfg, preprocess):
    import tensorflow as tf

    h, w, c = shape
    img = tf.io.decode_image(data, channels=c, dtype=tf.uint8, expand_animations=False)
    img = tf.image.resize(img, (h, w), method=cfg.resize_method)
    img = tf.ensure_shape(tf.cast(img, tf.float32), (h, w, c))
    return tf.cast(preprocess(img), tf.float32)


def _tfrecord_parser(cfg, input_shapes, preprocess, features, shard_base):
    import tensorflow as tf

    spec = {f: tf.io.FixedLenFeature([], tf.string) for f in set(features.values())}
    if cfg.key_feature:
        spec[cfg.key_feature] = tf.io.FixedLenFeature([], tf.string)
    if cfg.label_feature:
        spec[cfg.label_feature] = tf.io.FixedLenFeature([], tf.as_dtype(cfg.label_type))
    for name, typ in cfg.passthrough.items():
        spec[name] = tf.io.FixedLenFeature([], tf.as_dtype(_TF_TYPES[typ]))
    dummy = {n: tf.zeros(s, tf.float32) for n, s in input_shapes.items()}

    def parse(index, item):
        record, is_sentinel = item

        def real():
            ex = tf.io.parse_single_example(record, spec)
            out = {f"__input__{n}": _decode_image(ex[f], input_shapes[n], cfg, preprocess) for n, f in features.items()}
            out["key"] = ex[cfg.key_feature] if cfg.key_feature else tf.strings.join([shard_base, tf.strings.as_string(index)], ":")
            if cfg.label_feature:
                out["label"] = ex[cfg.label_feature]
            for name in cfg.passthrough:
                out[name] = ex[name]
            return out

        def fake():
            out = {f"__input__{n}": v for n, v in dummy.items()}
            out["key"] = tf.constant("")
            if cfg.label_feature:
                out["label"] = tf.zeros([], tf.as_dtype(cfg.label_type))
            for name, typ in cfg.passthrough.items():
                out[name] = tf.zeros([], tf.as_dtype(_TF_TYPES[typ]))
            return out

        out = tf.cond(is_sentinel, fake, real)
        out["__index__"] = index
        out["__sentinel__"] = is_sentinel
        return out

    return parse


def _image_file_parser(cfg, input_shapes, preprocess, originals):
    import tensorflow as tf

    if len(input_shapes) != 1:
        raise ValueError(
            f"input.format 'images' feeds one image per example, but the model has inputs {list(input_shapes)}; "
            "write the inputs as features of TFRecord examples and map them with input.inputs"
        )
    ((name, shape),) = input_shapes.items()
    dummy = tf.zeros(shape, tf.float32)

    def parse(index, item):
        path, is_sentinel = item

        def real():
            original = originals[index]
            parts = tf.strings.split(original, "/")
            return {
                f"__input__{name}": _decode_image(tf.io.read_file(path), shape, cfg, preprocess),
                "key": original,
                "label": parts[-2],
            }

        def fake():
            return {f"__input__{name}": dummy, "key": tf.constant(""), "label": tf.constant("")}

        out = tf.cond(is_sentinel, fake, real)
        out["__index__"] = index
        out["__sentinel__"] = is_sentinel
        return out

    return parse
