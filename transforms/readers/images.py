"""Image files (jpg/png/gif/bmp/webp): a shard is a group of files; the key is the path,
the label the parent folder's name. Also the image decoding and its diagnosis, which the
TFRecord reader shares for encoded-image features."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..deadletters import Failure
from ..errors import first_line
from ._common import explain_by_retry, tagged

__all__ = ["FRAMED", "dataset", "parser", "explain", "check_end", "check_inputs", "estimate_examples", "decode_image", "classify_image", "single_image_input"]

FRAMED = False


def dataset(paths, spec):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(list(paths))


def check_inputs(spec, plans) -> None:
    name, _ = single_image_input({n: p.shape for n, p in plans.items()})
    if plans[name].kind != "image":
        raise ValueError(f"input.format 'images' reads image files, but model input {name!r} is configured as a tensor; write the tensors as TFRecord features")


def check_end(shard, spec, local_path, consumed):
    return None, 1 << 62


def estimate_examples(spec, shards, budget: int = 2000) -> int:
    """Exact: one example per file."""
    cap = spec.max_examples_per_shard
    return sum(min(len(s.paths), cap) if cap else len(s.paths) for s in shards)


def parser(shard, cfg, plans, preprocess):
    import tensorflow as tf

    return _image_file_parser(cfg, {n: p.shape for n, p in plans.items()}, preprocess, tf.constant(list(shard.paths)))


def decode_image(data, shape, cfg, preprocess):
    import tensorflow as tf

    h, w, c = shape
    img = tf.io.decode_image(data, channels=c, dtype=tf.uint8, expand_animations=False)
    img = tf.image.resize(img, (h, w), method=cfg.resize_method)
    img = tf.ensure_shape(tf.cast(img, tf.float32), (h, w, c))
    return tf.cast(preprocess(img), tf.float32)


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
                f"__input__{name}": decode_image(tf.io.read_file(path), shape, cfg, preprocess),
                "key": original,
                "label": parts[-2],
            }

        def fake():
            return {f"__input__{name}": dummy, "key": tf.constant(""), "label": tf.constant("")}

        return tagged(is_sentinel, fake, real, index, nbytes)

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
            return "truncated_image", f"{fmt} data of {len(data)} bytes ends before the image does ({first_line(e)})"
        return "undecodable_image", f"{fmt} data of {len(data)} bytes cannot be decoded: {first_line(e)}"
    return None


def explain(shard, cfg, plans, preprocess, parse, local_paths, missing: np.ndarray) -> list[Failure]:
    """One `Failure` per missing file, read again one by one (bad path only)."""
    import tensorflow as tf

    out: list[Failure] = []
    channels = next(iter(plans.values())).shape[-1]
    for i in missing.tolist():
        key = shard.paths[i]
        try:
            with open(local_paths[i], "rb") as f:
                data = f.read()
        except OSError as e:
            out.append(Failure(i, key, "read", "unreadable_file", f"{e.strerror or first_line(e)}"))
            continue
        bad = classify_image(data, channels)
        if bad and bad[0] == "empty_image":
            bad = ("empty_image", "the file is empty (0 bytes)")
        out.append(Failure(i, key, "decode", *bad) if bad else explain_by_retry(i, key, parse, tf.constant(local_paths[i])))
    return out
