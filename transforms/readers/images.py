"""Image files (jpg/png/gif/bmp/webp): a shard is a run of one folder's files (listed and
described compactly by `folders`); the key is the path, the label the parent folder's name. Also the image decoding and its diagnosis, which the
TFRecord reader shares for encoded-image features."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..deadletters import Failure
from ..errors import first_line
from ._common import explain_by_retry, path_bytes, tagged

__all__ = ["FRAMED", "dataset", "parser", "explain", "check_end", "check_inputs", "estimate_examples", "decode_image", "classify_image", "single_image_input"]

FRAMED = False


def dataset(paths, spec):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices([path_bytes(p) for p in paths])


def check_inputs(spec, plans) -> None:
    name, _ = single_image_input({n: p.shape for n, p in plans.items()})
    if plans[name].kind != "image":
        raise ValueError(f"input.format 'images' reads image files, but model input {name!r} is configured as a tensor; write the tensors as TFRecord features")


def check_end(shard, spec, local_path, consumed):
    return None, 1 << 62


def estimate_examples(spec, shards, budget: int = 2000) -> int:
    """Exact: one example per file."""
    cap = spec.max_examples_per_shard
    counts = [s.span[3] if getattr(s, "span", None) else len(s.paths) for s in shards]
    return sum(min(c, cap) if cap else c for c in counts)


def parser(shard, cfg, plans, preprocess):
    import tensorflow as tf

    return _image_file_parser(cfg, {n: p.shape for n, p in plans.items()}, preprocess, tf.constant([path_bytes(p) for p in shard.paths]))


def _u(data, start: int, n: int, little: bool):
    """The unsigned integer of `n` bytes at `start` of a scalar string tensor."""
    import tensorflow as tf

    b = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, n), tf.uint8), tf.int64)
    order = tf.range(n, dtype=tf.int64) if little else tf.range(n - 1, -1, -1, dtype=tf.int64)
    return tf.reduce_sum(b * tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * order))


def header_pixels(data):
    """width × height declared by a JPEG, PNG, GIF or BMP header (-1 for other formats or
    too-short data), read without decoding: the pixel cap is checked before any buffer of
    that size is allocated."""
    import tensorflow as tf

    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 8)

    def jpeg():
        hw = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return hw[0] * hw[1]

    branches = [
        (tf.logical_and(tf.equal(head, b"\x89PNG\r\n\x1a\n"), n >= 24), lambda: _u(data, 16, 4, False) * _u(data, 20, 4, False)),
        (tf.logical_and(tf.strings.regex_full_match(tf.strings.substr(data, 0, 6), "GIF8[79]a"), n >= 10), lambda: _u(data, 6, 2, True) * _u(data, 8, 2, True)),
        (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), n >= 26), lambda: tf.abs(_bmp_signed(data, 18)) * tf.abs(_bmp_signed(data, 22))),
        (tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"), jpeg),
    ]
    out = tf.constant(-1, tf.int64)
    for cond, fn in reversed(branches):
        out = tf.cond(cond, fn, lambda o=out: o)
    return out


def _bmp_signed(data, start):
    import tensorflow as tf

    v = _u(data, start, 4, True)
    return tf.where(v >= 2**31, v - 2**32, v)


_EXIF_SCAN = 1 << 16  # the APP1 segment holding EXIF comes first and is at most 64 KB


def _exif_head(data):
    """(the first 64 KB, split once at the first `Exif\0\0`: two parts when found). Not a
    regex: RE2 reads the pattern and bytes as UTF-8, which image bytes are not."""
    import tensorflow as tf

    head = tf.strings.substr(data, 0, _EXIF_SCAN)
    return head, tf.strings.split(head, sep=b"Exif\x00\x00", maxsplit=1)


def has_exif(data):
    """Whether the first 64 KB of the bytes hold an EXIF marker: only those pay for reading it.
    `scripts/bench_decode_exif.py`: decode + resize 1.27 ms CPU an image reading it always,
    1.06 with this test, 0.89 with EXIF off. A `tf.cond` with two small branches costs
    little to trace, unlike the `switch_case` that the reading replaced."""
    import tensorflow as tf

    return tf.size(_exif_head(data)[1]) > 1


def exif_orientation(data):
    """The EXIF orientation (1..8) of JPEG bytes, 1 when absent or unreadable; TensorFlow
    ops only (runs inside tf.data). Finds the first `Exif\0\0` in the first 64 KB, reads
    the TIFF byte order and IFD0, and the value of tag 0x0112.

    Straight-line ops only, no `tf.cond` or `map_fn`: the search is one substring split,
    the IFD's entries are read as one gather, and the reads are done whether or not the
    marker was found (offsets clipped into the bytes), the value kept only if it was.
    The version with two `map_fn` loops and a `cond` cost each worker about a second to
    trace and instantiate, in front of its first batch."""
    import tensorflow as tf

    head, before = _exif_head(data)
    jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    b = tf.io.decode_raw(head, tf.uint8)
    n = tf.shape(b, out_type=tf.int64)[0]
    b = tf.concat([b, tf.zeros([8], tf.uint8)], 0)  # reads clipped into fewer than 4 bytes stay inside

    def at(i, size, little):
        """The `size`-byte unsigned integers at offsets `i` (any shape), clipped into the bytes."""
        i = tf.clip_by_value(i, 0, tf.maximum(n - size, 0))
        order = tf.range(size, dtype=tf.int64)
        order = tf.where(little, order, size - 1 - order)
        raw = tf.cast(tf.gather(b, i[..., None] + tf.range(size, dtype=tf.int64)), tf.int64)
        return tf.reduce_sum(raw * tf.bitwise.left_shift(tf.constant(1, tf.int64), 8 * order), axis=-1)

    t = tf.cast(tf.strings.length(before[0]), tf.int64) + 6  # the TIFF header
    little = tf.equal(b[tf.clip_by_value(t, 0, tf.maximum(n - 1, 0))], 0x49)  # "II"
    ifd = t + at(t + 4, 4, little)
    count = tf.clip_by_value(at(ifd, 2, little), 0, 64)
    entries = ifd + 2 + 12 * tf.range(count)
    tags, values = at(entries, 2, little), at(entries + 8, 2, little)
    value = tf.concat([tf.boolean_mask(values, tf.equal(tags, 0x0112)), tf.ones([1], tf.int64)], 0)[0]
    ok = jpeg & (tf.size(before) > 1) & (value >= 1) & (value <= 8)
    return tf.where(ok, value, tf.constant(1, tf.int64))


def apply_orientation(img, orientation):
    """Turn an (H, W, C) image as EXIF orientation 1..8 says (as PIL's exif_transpose).

    Every orientation is an optional transpose, then optional up-down and left-right
    flips (`tf.image.rot90` is built the same way), given to the ops as tensors: no
    control flow to trace (a `switch_case` traced eight branch functions per worker)."""
    import tensorflow as tf

    o = tf.cast(orientation, tf.int32)
    transpose = o >= 5  # 5: transpose; 6: rot90 k=3 (transpose, then flip LR); 7: transverse; 8: rot90 k=1 (transpose, then flip UD)
    up_down = tf.reduce_any(tf.equal(o, [3, 4, 7, 8]))
    left_right = tf.reduce_any(tf.equal(o, [2, 3, 6, 7]))
    img = tf.transpose(img, tf.where(transpose, [1, 0, 2], [0, 1, 2]))
    return tf.reverse(img, tf.boolean_mask([0, 1], tf.stack([up_down, left_right])))


def decode_image(data, shape, cfg, preprocess):
    import tensorflow as tf

    h, w, c = shape
    cap = getattr(cfg, "max_image_pixels", None)
    if cap:
        pixels = header_pixels(data)
        check = tf.debugging.assert_less_equal(pixels, tf.constant(cap, tf.int64), message="image_too_large")
        with tf.control_dependencies([check]):
            data = tf.identity(data)
    img = tf.io.decode_image(data, channels=c, dtype=tf.uint8, expand_animations=False)
    if getattr(cfg, "exif_orientation", False):
        img = tf.cond(has_exif(data), lambda: apply_orientation(img, exif_orientation(data)), lambda: img)
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
            # The key and label are text columns: a file name that is not UTF-8 fails here,
            # as an `invalid_utf8` dead letter, not in the shard's Arrow conversion.
            original = tf.strings.unicode_transcode(originals[index], "UTF-8", "UTF-8", errors="strict")
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


def _py_header_pixels(data: bytes, fmt: str | None) -> int | None:
    """Python twin of `header_pixels` for the bad path."""
    if fmt == "PNG" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    if fmt == "GIF" and len(data) >= 10:
        return int.from_bytes(data[6:8], "little") * int.from_bytes(data[8:10], "little")
    if fmt == "BMP" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)) * abs(int.from_bytes(data[22:26], "little", signed=True))
    if fmt == "JPEG":
        import tensorflow as tf

        try:
            h, w, _ = tf.image.extract_jpeg_shape(data).numpy().tolist()
            return h * w
        except tf.errors.OpError:
            return None
    return None


def classify_image(data: bytes, channels: int = 3, max_pixels: int | None = None) -> tuple[str, str] | None:
    """(reason, detail) for image bytes tf.io.decode_image refuses; None if they decode.

    Args:
        data: the encoded image.
        channels: channels it is decoded to.
        max_pixels: the pixel cap (`input.max_image_pixels`), checked from the header.
    """
    import tensorflow as tf

    if not data:
        return "empty_image", "the image is 0 bytes"
    fmt = _sniff(data)
    pixels = _py_header_pixels(data, fmt) if max_pixels else None
    if pixels is not None and pixels > max_pixels:
        return "image_too_large", f"{fmt} header declares {pixels:,} pixels, over input.max_image_pixels = {max_pixels:,}; raise the cap knowingly or shrink the image"
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
        key = path_bytes(shard.paths[i]).decode("utf-8", "backslashreplace")
        if key != shard.paths[i]:
            out.append(Failure(i, key, "decode", "invalid_utf8", f"the file name {key!r} is not UTF-8 text, which the key and label columns hold; rename the file"))
            continue
        try:
            with open(local_paths[i], "rb") as f:
                data = f.read()
        except OSError as e:
            out.append(Failure(i, key, "read", "unreadable_file", f"{e.strerror or first_line(e)}"))
            continue
        bad = classify_image(data, channels, getattr(cfg, "max_image_pixels", None))
        if bad and bad[0] == "empty_image":
            bad = ("empty_image", "the file is empty (0 bytes)")
        out.append(Failure(i, key, "decode", *bad) if bad else explain_by_retry(i, key, parse, tf.constant(path_bytes(local_paths[i]))))
    return out
