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

__all__ = ["Shard", "Batch", "Failure", "ShardEnd", "REASONS", "match_shards", "read_shard", "tf_readable"]

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


# Dead-letter reasons: code → what it means. The code is what is counted (manifest, Beam
# counters); each dead letter also carries a one-line detail naming the value.
REASONS = {
    "unparseable_record": "the TFRecord record is not a serialized tf.train.Example",
    "missing_feature": "a feature the config reads is not in the record",
    "wrong_feature_type": "a feature has another type than the config says, or not exactly one value",
    "empty_image": "the image bytes or the image file are empty (0 bytes)",
    "truncated_image": "the image data ends before the image does",
    "undecodable_image": "the image has a known format's signature but its data cannot be decoded",
    "not_an_image": "the bytes are not an image (no known image signature)",
    "unsupported_image_format": "an image format tf.io.decode_image cannot read (TIFF, …); convert it to PNG or JPEG",
    "unreadable_file": "the file cannot be opened or read",
    "decode_failed": "decoding or preprocessing failed for another reason (see the detail)",
    "duplicate_key": "the record's key was already written by an earlier record of this run",
    "corrupt_shard": "a TFRecord file is corrupt or truncated part-way; the records before the damage are kept",
}


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why one record (or, with `index` None, the rest of a shard) is not in the output.

    Attributes:
        index: record index within the shard; None for a shard-level failure.
        key: the record's key when it could be read, else `<shard file>:<index>` (images:
            the file path; shard-level: the shard's path).
        stage: 'read', 'decode' or 'dedupe'.
        reason: a code from `REASONS`.
        detail: one line naming the value.
    """

    index: int | None
    key: str
    stage: str
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class ShardEnd:
    """The last item `read_shard` yields: how many records the shard had and which failed.

    Attributes:
        records: records read (for a corrupt file: those before the damage).
        failures: one `Failure` per record missing from the batches, in index order.
        shard_error: a shard-level `Failure` when the file stopped part-way, else None.
    """

    records: int
    failures: tuple[Failure, ...] = ()
    shard_error: Failure | None = None


def fsspec_fs(url: str):
    """(fsspec file system, path in it) for a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def match_shards(pattern: str, fmt: str, files_per_shard: int = 512) -> list[Shard]:
    """Expand a pattern into shards, in sorted path order (deterministic ids).

    Args:
        pattern: glob over a local path or any fsspec URL (`gs://`, `memory://`, `s3://` …).
        fmt: 'tfrecord' (one shard per file) or 'images' (groups of `files_per_shard` files).
    """
    fs, path = fsspec_fs(pattern)
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
            fs, fp = fsspec_fs(p)
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
) -> Iterator[tuple[Batch | None, Any]]:
    """Yield `(batch, records_so_far)`; the final item is `(None, ShardEnd)`.

    Decoding runs per record inside tf.data, so one bad record never takes its batch with
    it. Records that fail are missing from the batches; at the end they are read again,
    one by one and only they, to say why each failed (`ShardEnd.failures`). A TFRecord
    file that is corrupt or truncated part-way keeps the records before the damage and
    reports it once (`ShardEnd.shard_error`).

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
        # A sentinel after the last record carries the record count (its index) and the
        # bytes of TFRecord framing consumed (the running sum) through the same pipeline,
        # so records that fail at the very end are still counted, and a file that stops
        # part-way (DataLossError, which ends the file's dataset under ignore_errors) is
        # noticed: its records do not add up to its size.
        sentinel = tf.data.Dataset.from_tensors((tf.constant(b"" if cfg.format == "tfrecord" else ""), tf.constant(True)))
        framed = cfg.format == "tfrecord"

        def running_bytes(total, item):
            record, is_sentinel = item
            if framed:
                size = tf.where(is_sentinel, tf.constant(0, tf.int64), tf.cast(tf.strings.length(record), tf.int64) + 16)
            else:
                size = tf.constant(0, tf.int64)
            total = total + size
            return total, (record, is_sentinel, total)

        ds = raw.map(lambda r: (r, tf.constant(False))).concatenate(sentinel)
        ds = ds.scan(tf.constant(0, tf.int64), running_bytes).enumerate()
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = _without_autotune(ds.ignore_errors().batch(batch_size).prefetch(2))
        seen = 0
        got: list[np.ndarray] = []
        for el in ds:
            index = el.pop("__index__").numpy()
            is_sentinel = el.pop("__sentinel__").numpy()
            consumed = el.pop("__bytes__").numpy()
            inputs = {n: el.pop(f"__input__{n}") for n in input_shapes}
            if is_sentinel.any():
                total = int(index[is_sentinel][0])
                keep = ~is_sentinel
                index = index[keep]
                inputs = {n: tf.boolean_mask(v, keep) for n, v in inputs.items()}
                el = {k: tf.boolean_mask(v, keep) for k, v in el.items()}
                if len(index):
                    got.append(index)
                    yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen + len(index)
                done = np.concatenate(got) if got else np.zeros(0, np.int64)
                shard_error = None
                if framed and not (max_examples and total >= max_examples):
                    shard_error, readable = _check_whole_file(shard, cfg, bridge.paths[0], int(consumed[is_sentinel][0]))
                    # The read error itself took an index (the last before the sentinel);
                    # it is the shard-level dead letter, not a record.
                    total = min(total, readable)
                missing = np.setdiff1d(np.arange(total, dtype=np.int64), done)
                failures = _explain_failures(shard, cfg, input_shapes, preprocess, parse, bridge.paths, missing) if len(missing) else ()
                yield None, ShardEnd(total, tuple(failures), shard_error)
                return
            seen += len(index)
            got.append(index)
            yield Batch(index, {k: v.numpy() for k, v in el.items()}, inputs), seen
        raise RuntimeError(f"shard {shard.id} ended without its sentinel record; this is a bug")
    finally:
        bridge.close()


def _without_autotune(ds):
    """`ds` with tf.data's autotuning off. With it on, each iterator runs a model thread
    that its destructor joins, and the destructor runs in Python's `EagerTensor_dealloc`,
    holding the GIL: measured (py-spy, 2 cores) at about 2 s after a worker's first shard
    in about half the runs, and up to 0.3 s after later ones; one iterator per shard makes
    that recur, where a long-lived training loop would never notice it. With
    autotuning off, `AUTOTUNE` parallelism resolves to min(initial_parallelism, CPU
    threads), with initial_parallelism raised from 16 to the CPU count so that a big worker
    decodes on every core; `prefetch` keeps its fixed buffer."""
    import os

    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.autotune.initial_parallelism = max(16, os.cpu_count() or 1)
    return ds.with_options(options)


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
        spec[name] = tf.io.FixedLenFeature([], tf.as_dtype(typ))
    dummy = {n: tf.zeros(s, tf.float32) for n, s in input_shapes.items()}

    def parse(index, item):
        record, is_sentinel, nbytes = item

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
                out[name] = tf.zeros([], tf.as_dtype(typ))
            return out

        return _tagged(is_sentinel, fake, real, index, nbytes)

    return parse


def _tagged(is_sentinel, fake, real, index, nbytes) -> dict:
    """A parsed record (`real()`, or `fake()` for the sentinel) with the pipeline's
    bookkeeping: its index, whether it is the sentinel, the framing bytes so far."""
    import tensorflow as tf

    out = tf.cond(is_sentinel, fake, real)
    out["__index__"] = index
    out["__sentinel__"] = is_sentinel
    out["__bytes__"] = nbytes
    return out


def single_image_input(input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of the model's one input, which `input.format: images` needs.

    Raises:
        ValueError: the model has several inputs.
    """
    if len(input_shapes) != 1:
        raise ValueError(
            f"input.format 'images' feeds one image per example, but the model has inputs {list(input_shapes)}; "
            "write the inputs as features of TFRecord examples and map them with input.inputs"
        )
    ((name, shape),) = input_shapes.items()
    return name, shape


def _image_file_parser(cfg, input_shapes, preprocess, originals):
    import tensorflow as tf

    name, shape = single_image_input(input_shapes)
    dummy = tf.zeros(shape, tf.float32)

    def parse(index, item):
        path, is_sentinel, nbytes = item

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

        return _tagged(is_sentinel, fake, real, index, nbytes)

    return parse


# --------------------------------------------------------------------------- the bad path
# Everything below runs only for records that already failed in tf.data: Python per record
# is fine here, and it says *why* each one failed.

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def _sniff(data: bytes) -> str | None:
    for sig, fmt in _SIGNATURES:
        if data.startswith(sig):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, fmt: str) -> bool:
    """Whether the data stops before the format's end marker or declared size."""
    if fmt == "PNG":
        return b"IEND" not in data[-16:]
    if fmt == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "BMP":
        return len(data) < 6 or int.from_bytes(data[2:6], "little") > len(data)
    if fmt == "WEBP":
        return len(data) < 8 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _first_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line[:300]


def classify_image(data: bytes, channels: int = 3) -> tuple[str, str] | None:
    """(reason, detail) for image bytes tf.io.decode_image refuses; None if they decode.

    Args:
        data: the encoded image.
        channels: channels it is decoded to.
    """
    import tensorflow as tf

    if not data:
        return "empty_image", "the image is 0 bytes"
    fmt = _sniff(data)
    if fmt is None:
        try:
            from PIL import Image
            import io

            with Image.open(io.BytesIO(data)) as im:
                other = im.format
        except Exception:  # PIL raises many types for non-images
            other = None
        if other:
            return "unsupported_image_format", f"{other} image: tf.io.decode_image reads JPEG, PNG, GIF, BMP and WebP; convert it"
        return "not_an_image", f"{len(data)} bytes with no image signature, starting {data[:12]!r}"
    try:
        tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        if _looks_truncated(data, fmt):
            return "truncated_image", f"{fmt} data of {len(data)} bytes ends before the image does ({_first_line(e)})"
        return "undecodable_image", f"{fmt} data of {len(data)} bytes cannot be decoded: {_first_line(e)}"
    return None


_KINDS = {"int64": "int64_list", "float32": "float_list", "string": "bytes_list"}


def _needed_features(cfg, features: Mapping[str, str]) -> list[tuple[str, str]]:
    need = [(f, "bytes_list") for f in dict.fromkeys(features.values())]
    if cfg.key_feature:
        need.append((cfg.key_feature, "bytes_list"))
    if cfg.label_feature:
        need.append((cfg.label_feature, _KINDS[cfg.label_type]))
    need += [(name, _KINDS[typ]) for name, typ in cfg.passthrough.items()]
    return need


def _explain_record(record: bytes, index: int, base: str, cfg, input_shapes, parse) -> Failure:
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    key = f"{base}:{index}"
    ex = tf.train.Example()
    try:
        ex.ParseFromString(record)
    except DecodeError as e:
        return Failure(index, key, "decode", "unparseable_record", f"{len(record)} bytes that are not a tf.train.Example ({_first_line(e)})")
    feats = ex.features.feature
    if cfg.key_feature and cfg.key_feature in feats and feats[cfg.key_feature].WhichOneof("kind") == "bytes_list":
        values = feats[cfg.key_feature].bytes_list.value
        if len(values) == 1:
            key = values[0].decode("utf-8", "replace")
    for name, kind in _needed_features(cfg, _feature_map(cfg, input_shapes)):
        if name not in feats:
            have = ", ".join(sorted(feats)[:8]) or "none"
            return Failure(index, key, "decode", "missing_feature", f"feature {name!r} is missing; the record has: {have}")
        got = feats[name].WhichOneof("kind")
        if got != kind:
            return Failure(index, key, "decode", "wrong_feature_type", f"feature {name!r} is a {got}, the config reads a {kind}")
        n = len(getattr(feats[name], kind).value)
        if n != 1:
            return Failure(index, key, "decode", "wrong_feature_type", f"feature {name!r} holds {n} values, the config reads exactly one")
    for input_name, name in _feature_map(cfg, input_shapes).items():
        bad = classify_image(feats[name].bytes_list.value[0], input_shapes[input_name][-1])
        if bad:
            return Failure(index, key, "decode", bad[0], f"feature {name!r}: {bad[1]}")
    return _explain_by_retry(index, key, parse, tf.constant(record))


def _explain_by_retry(index: int, key: str, parse, item) -> Failure:
    """Run the record's own tf.data map function eagerly and report its error."""
    import tensorflow as tf

    try:
        parse(tf.constant(index, tf.int64), (item, tf.constant(False), tf.constant(0, tf.int64)))
    except Exception as e:  # whatever the map function raised is the answer
        return Failure(index, key, "decode", "decode_failed", _first_line(e))
    return Failure(index, key, "decode", "decode_failed", "failed inside tf.data but decoded when retried alone")


def _explain_failures(shard: Shard, cfg, input_shapes, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing index, read again record by record (bad path only)."""
    import tensorflow as tf

    out: list[Failure] = []
    if cfg.format == "images":
        channels = next(iter(input_shapes.values()))[-1]
        for i in missing.tolist():
            key = shard.paths[i]
            try:
                with open(local_paths[i], "rb") as f:
                    data = f.read()
            except OSError as e:
                out.append(Failure(i, key, "read", "unreadable_file", f"{e.strerror or _first_line(e)}"))
                continue
            bad = classify_image(data, channels)
            if bad and bad[0] == "empty_image":
                bad = ("empty_image", "the file is empty (0 bytes)")
            out.append(Failure(i, key, "decode", *bad) if bad else _explain_by_retry(i, key, parse, tf.constant(local_paths[i])))
        return out
    base = posixpath.basename(shard.paths[0])
    wanted = tf.constant(missing, tf.int64)
    ds = _without_autotune(tf.data.TFRecordDataset(local_paths, compression_type=cfg.compression or None).enumerate())
    ds = ds.filter(lambda i, r: tf.reduce_any(tf.equal(i, wanted))).ignore_errors()
    found = {}
    for i, rec in ds:
        found[int(i)] = _explain_record(rec.numpy(), int(i), base, cfg, input_shapes, parse)
    for i in missing.tolist():
        out.append(found.get(i) or Failure(i, f"{base}:{i}", "read", "unreadable_file", "the record could not be read again to explain its failure"))
    return out


def _check_whole_file(shard: Shard, cfg, local_path: str, consumed: int) -> tuple[Failure | None, int]:
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
    raw = _without_autotune(tf.data.TFRecordDataset([local_path], compression_type=cfg.compression or None))
    try:
        raw.reduce(np.int64(0), lambda n, _: n + 1)
        return None, 1 << 62
    except tf.errors.OpError as e:
        m = re.search(r"(corrupted|truncated) record at \d+", str(e))
        what = m.group(0) if m else _first_line(e)
    readable = int(raw.ignore_errors().reduce(np.int64(0), lambda n, _: n + 1))
    where = f"{what} (byte offset)" + (f", file size {tf.io.gfile.stat(local_path).length}" if not cfg.compression else "")
    return (
        Failure(
            None, shard.paths[0], "read", "corrupt_shard",
            f"{where}: kept the {readable} records before the damage, the rest of the file cannot be read; re-create or re-download the file",
        ),
        readable,
    )
