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


def _read(data, pos, size: int):
    """The `size` bytes of a scalar string tensor at `pos` (clipped into it), zero-padded
    past its end: a read that never fails inside tf.data."""
    import tensorflow as tf

    pos = tf.cast(tf.clip_by_value(tf.cast(pos, tf.int64), 0, tf.cast(tf.strings.length(data), tf.int64)), tf.int32)
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, pos, size), tf.constant(b"\0" * size)]), 0, size)


_HEAD = 26  # the bytes that the PNG, GIF and BMP headers' sizes lie in


def _places(start: int, size: int, little: bool) -> list[int]:
    """A row that, multiplied by the head's bytes and summed, gives the `size`-byte unsigned
    integer at `start`."""
    row = [0] * _HEAD
    for i in range(size):
        row[start + i] = 1 << (8 * (i if little else size - 1 - i))
    return row


# PNG IHDR width, height (big-endian, at 16 and 20); GIF width, height (little-endian, at 6
# and 8); BMP width, height (little-endian, signed, at 18 and 22).
_PLACES = [_places(16, 4, False), _places(20, 4, False), _places(6, 2, True), _places(8, 2, True), _places(18, 4, True), _places(22, 4, True)]


def header_pixels(data):
    """width × height declared by a JPEG, PNG, GIF or BMP header (-1 for other formats or
    too-short data), read without decoding: the pixel cap is checked before any buffer of
    that size is allocated.

    Straight-line ops, no `tf.cond`: the PNG, GIF and BMP sizes are read from the first 26
    bytes, zero-padded, whatever the format, and the one that the signature names is kept;
    `extract_jpeg_shape` reads either the bytes or, for any other format, a 1×1 JPEG. The
    version with a `cond` per format cost each worker 0.2–0.35 s to trace and instantiate,
    in front of its first batch."""
    import tensorflow as tf

    n = tf.strings.length(data)
    b = tf.cast(tf.io.decode_raw(_read(data, 0, _HEAD), tf.uint8), tf.int64)
    # The six header integers (PNG, GIF, BMP width and height) in one product with their
    # bytes' place values, as signed 32-bit (BMP's height is negative when its rows run top
    # down; PNG's and GIF's never reach 2**31): each op traced costs start-up time.
    dims = tf.reduce_sum(tf.constant(_PLACES, tf.int64) * b, axis=1)
    dims = tf.abs(tf.where(dims >= 2**31, dims - 2**32, dims))
    png, gif, bmp = tf.unstack(dims[0::2] * dims[1::2])

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    hw = tf.cast(tf.image.extract_jpeg_shape(tf.where(is_jpeg, data, tf.constant(_TINY_JPEG))), tf.int64)
    sizes = [
        (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n"), n >= 24), png),
        (tf.logical_and(tf.strings.regex_full_match(tf.strings.substr(data, 0, 6), "GIF8[79]a"), n >= 10), gif),
        (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), n >= 26), bmp),
        (is_jpeg, hw[0] * hw[1]),
    ]
    out = tf.constant(-1, tf.int64)
    for found, pixels in reversed(sizes):
        out = tf.where(found, pixels, out)
    return out


# A 1×1 grey baseline JPEG (PIL's): what `extract_jpeg_shape` reads when the bytes are not a JPEG.
_TINY_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20"
    "242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b080001000101011100ffc4001f0000010501010101010100000000"
    "000000000102030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613516107227114328191a108"
    "2342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475"
    "767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2"
    "e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00f9febfffd9"
)


_EXIF_SCAN = 1 << 16  # the APP1 segment holding EXIF comes first and is at most 64 KB


def _exif_split(data):
    """The first 64 KB, split once at the first `Exif\0\0`: two parts when found, one
    otherwise. Not a regex: RE2 reads the pattern and bytes as UTF-8, which image bytes
    are not. The raw op: `tf.strings.split` adds a ragged tensor's dozen ops around it,
    and each op costs every worker start-up time."""
    import tensorflow as tf

    head = tf.reshape(tf.strings.substr(data, 0, _EXIF_SCAN), [1])
    return tf.raw_ops.StringSplitV2(input=head, sep=b"Exif\x00\x00", maxsplit=1).values


_IFD_ENTRIES = 64  # IFD0's entries read; tag 0x0112 comes early (tags are sorted)


def exif_orientation(data, before=None):
    """The EXIF orientation (1..8) of JPEG bytes, 1 when absent or unreadable; TensorFlow
    ops only (runs inside tf.data). Finds the first `Exif\0\0` in the first 64 KB, reads
    the TIFF byte order and IFD0, and the value of tag 0x0112.

    Straight-line ops, and few of them: `before` (the split that `decode_image` already
    made to test for the marker) gives the TIFF header's offset; the header and IFD0's
    entries are two fixed-size, zero-padded reads, decoded as 16- and 32-bit integers in
    both byte orders, the TIFF's kept; the value is kept only if the marker was found.
    Each op costs every worker start-up time to trace and instantiate, inside a `cond`
    too: the version that read the first 64 KB as bytes and gathered its offsets from
    them made the first reader pipeline's first batch 1.0–1.1 s, this one 0.57–0.67 s
    (cap included; `max_image_pixels` and this both off: 0.37–0.40 s)."""
    import tensorflow as tf

    def ints(raw, dtype):
        """`raw` as integers of `dtype`, in the TIFF's byte order, made unsigned."""
        v = tf.where(little, tf.io.decode_raw(raw, dtype, little_endian=True), tf.io.decode_raw(raw, dtype, little_endian=False))
        return tf.bitwise.bitwise_and(tf.cast(v, tf.int64), (1 << dtype.size * 8) - 1)

    before = _exif_split(data) if before is None else before
    t = tf.cast(tf.strings.length(before[0]), tf.int64) + 6  # the TIFF header: byte order, 42, IFD0's offset
    tiff = _read(data, t, 8)
    little = tf.equal(tf.strings.substr(tiff, 0, 2), b"II")
    ifd = ints(_read(data, t + ints(tiff, tf.int32)[1], 2 + 12 * _IFD_ENTRIES), tf.uint16)  # count, then 12-byte entries
    entries = tf.reshape(ifd[1:], [_IFD_ENTRIES, 6])  # tag, type, count (2), a SHORT value, 0
    hit = tf.equal(entries[:, 0], 0x0112) & (tf.range(_IFD_ENTRIES, dtype=tf.int64) < ifd[0])
    v = tf.gather(entries[:, 4], tf.argmax(tf.cast(hit, tf.int32)))  # the first hit's
    jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    ok = jpeg & (tf.size(before) > 1) & tf.reduce_any(hit) & (v >= 1) & (v <= 8)
    return tf.where(ok, v, tf.constant(1, tf.int64))


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
        # `Assert` with string data only: `assert_less_equal` carries the int64 values and
        # so wraps its `Assert` in a `tf.cond`, which each worker traces and instantiates
        # (the reason and the numbers come from `classify_image` on the bad path).
        check = tf.debugging.Assert(pixels <= cap, ["image_too_large"])
        with tf.control_dependencies([check]):
            data = tf.identity(data)
    img = tf.io.decode_image(data, channels=c, dtype=tf.uint8, expand_animations=False)
    if getattr(cfg, "exif_orientation", False):
        # Behind a `cond`: read for every image, the reading's few dozen ops (a few µs
        # each) cost an image without EXIF about 0.1 ms more CPU, which at a few
        # thousand images outweighs what the `cond` costs a worker once.
        before = _exif_split(data)
        img = tf.cond(tf.size(before) > 1, lambda: apply_orientation(img, exif_orientation(data, before)), lambda: img)
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
