"""Every record accounted for, whatever the bytes: hand-made damage to TFRecord framing
(a bad data CRC, a bad length CRC, a header claiming 2^40 bytes), strings that are not
UTF-8, and images over the pixel cap. Each run finishes; records read = rows + dead
letters, and bytes that cannot be framed are named on the shard."""

from __future__ import annotations

import struct

import numpy as np

import layerbeam
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from layerbeam.config import load_config
from tests.conftest import encode_png, example, photo_crops, run_cli
from tests.tiny import SIZE, save_tiny_model, tiny_config


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes, length: int | None = None) -> bytes:
    """One TFRecord record, framed by hand (`length` overrides the header's, CRC still valid)."""
    n = struct.pack("<Q", len(data) if length is None else length)
    return n + struct.pack("<I", _masked_crc(n)) + data + struct.pack("<I", _masked_crc(data))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("badbytes")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(6, SIZE, seed=4)
    recs = [example({"image/encoded": encode_png(im), "image/key": f"k{i}", "image/class/label": i}) for i, im in enumerate(imgs)]
    return root, model, recs


def _run(root, model, name, data: bytes, **overrides):
    from layerbeam.run import run_job

    (root / name).mkdir()
    (root / name / "part-00000.tfrecord").write_bytes(data)
    overrides.setdefault("output.max_dead_letter_fraction", 1.0)  # these runs are mostly bad records on purpose
    raw = tiny_config(f"{root}/{name}/*.tfrecord", f"{root}/{name}-out", model, **overrides)
    manifest = run_job(load_config(raw=raw))
    dead = pq.read_table(root / f"{name}-out" / "_dead_letters").to_pylist() if manifest["counts"]["dead_letters"] or manifest["shard_errors"] else []
    table = ds.dataset(str(root / f"{name}-out"), format="parquet").to_table()
    keys = table.column("key").to_pylist() if manifest["counts"]["rows_written"] else []
    return manifest, dead, sorted(keys)


def test_bad_data_crc_is_one_dead_letter_and_the_records_after_it_are_read(setup):
    root, model, recs = setup
    damaged = bytearray(frame(recs[2]))
    damaged[30] ^= 0xFF  # inside the data: the length and its CRC hold
    data = b"".join(frame(r) for r in recs[:2]) + bytes(damaged) + b"".join(frame(r) for r in recs[3:])
    manifest, dead, keys = _run(root, model, "datacrc", data)
    c = manifest["counts"]
    assert keys == ["k0", "k1", "k3", "k4", "k5"]
    assert c["records_read"] == 6 and c["rows_written"] == 5 and c["dead_letters"] == 1
    (d,) = dead
    assert d["reason"] == "corrupt_record" and d["index"] == 2 and "data CRC mismatch" in d["detail"]
    assert manifest["shard_errors"] == []


def test_bad_length_crc_is_skipped_and_reading_resynchronises(setup):
    root, model, recs = setup
    damaged = bytearray(frame(recs[2]))
    damaged[9] ^= 0x01  # the length's CRC
    data = b"".join(frame(r) for r in recs[:2]) + bytes(damaged) + b"".join(frame(r) for r in recs[3:])
    manifest, dead, keys = _run(root, model, "lencrc", data)
    c = manifest["counts"]
    assert keys == ["k0", "k1", "k3", "k4", "k5"]
    # The unframeable record is not counted as read; its bytes are named on the shard.
    assert c["records_read"] == c["rows_written"] + c["dead_letters"] == 5
    (err,) = manifest["shard_errors"]
    assert err["reason"] == "corrupt_shard" and f"{len(damaged)} bytes at offset" in err["detail"] and "bad length CRC" in err["detail"]


def test_a_header_claiming_2_to_the_40_bytes_does_not_reach_tensorflow(setup, tmp_path):
    """Through the CLI (a crash would be exit 139): the size estimate and the read both walk
    the framing first."""
    root, model, recs = setup
    liar = frame(recs[2][:50], length=1 << 40)[:12] + recs[2][:50]  # valid header CRC, 2^40 claimed
    data = b"".join(frame(r) for r in recs[:2]) + liar + b"".join(frame(r) for r in recs[3:])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-00000.tfrecord").write_bytes(data)
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(tiny_config(f"{tmp_path}/data/*.tfrecord", str(tmp_path / "out"), model)))
    r = run_cli(["run", str(p)])
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    said = " ".join(r.stdout.split())  # the console wraps long lines
    assert "5 rows, 0 dead letters" in said and "from 5 records" in said
    assert "corrupt_shard: kept the 5 records that are intact" in said and f"the header claims {1 << 40} bytes" in said
    keys = sorted(ds.dataset(str(tmp_path / "out"), format="parquet").to_table().column("key").to_pylist())
    assert keys == ["k0", "k1", "k3", "k4", "k5"]
    import json

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    (err,) = manifest["shard_errors"]
    assert f"the header claims {1 << 40} bytes" in err["detail"]
    assert manifest["counts"]["records_read"] == 5


def test_non_utf8_key_and_passthrough_are_dead_letters_not_a_crash(setup):
    root, model, recs = setup
    png = encode_png(photo_crops(1, SIZE, seed=8)[0])
    odd = [
        example({"image/encoded": png, "image/key": b"bad\xff\xfekey", "image/class/label": 1, "note": "fine"}),
        example({"image/encoded": png, "image/key": "good_key", "image/class/label": 1, "note": b"caf\xe9"}),
        example({"image/encoded": png, "image/key": "ok", "image/class/label": 1, "note": "fine"}),
    ]
    manifest, dead, keys = _run(root, model, "utf8", b"".join(frame(r) for r in odd), **{"input.passthrough": {"note": "string"}})
    assert keys == ["ok"]
    assert manifest["counts"]["records_read"] == 3 and manifest["counts"]["dead_letters"] == 2
    by_index = {d["index"]: d for d in dead}
    assert by_index[0]["reason"] == "invalid_utf8" and by_index[0]["key"] == "bad\\xff\\xfekey" and "'image/key'" in by_index[0]["detail"]
    assert by_index[1]["reason"] == "invalid_utf8" and by_index[1]["key"] == "good_key" and "'note'" in by_index[1]["detail"]


def test_images_over_the_pixel_cap_are_dead_letters_before_decoding(setup):
    """A real 32×32 PNG over a cap of 1000 pixels, and a PNG header declaring 20000×20000
    (which would take 1.2 GB to decode): both `image_too_large`, read from the header."""
    root, model, recs = setup
    png = encode_png(photo_crops(1, SIZE, seed=8)[0])
    ihdr = struct.pack(">II", 20000, 20000) + b"\x08\x02\x00\x00\x00"
    import zlib

    giant = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00" * 64
    tiny = encode_png(photo_crops(1, 20, seed=8)[0])  # 400 pixels, under both caps
    records = [
        example({"image/encoded": giant, "image/key": "giant", "image/class/label": 1}),
        example({"image/encoded": png, "image/key": "small", "image/class/label": 1}),
        example({"image/encoded": tiny, "image/key": "tiny", "image/class/label": 1}),
    ]
    data = b"".join(frame(r) for r in records)
    manifest, dead, keys = _run(root, model, "pixels", data)
    assert keys == ["small", "tiny"]
    (d,) = dead
    assert d["reason"] == "image_too_large" and "400,000,000 pixels" in d["detail"]
    manifest, dead, keys = _run(root, model, "pixels_capped", data, **{"input.max_image_pixels": 1000})
    assert keys == ["tiny"] and sorted(d["reason"] for d in dead) == ["image_too_large", "image_too_large"]
    assert manifest["counts"]["records_read"] == 3


def test_header_pixels_reads_what_pil_reads():
    """The pixel cap's header read against PIL's size, for JPEG, PNG, GIF and BMP (a
    top-down BMP too, whose height is negative); -1 for WebP, TIFF, short or foreign
    bytes; a broken JPEG fails as decoding it would."""
    import io
    import struct

    import pytest
    import tensorflow as tf
    from PIL import Image

    from layerbeam.transforms.readers.images import header_pixels

    read = tf.function(header_pixels, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    rng = np.random.default_rng(0)
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        for w, h in ((1, 1), (37, 19), (300, 2)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
            data = buf.getvalue()
            width, height = Image.open(io.BytesIO(data)).size
            assert int(read(data)) == (width * height if fmt not in ("WEBP", "TIFF") else -1), (fmt, w, h)
            if fmt == "BMP":
                top_down = data[:22] + struct.pack("<i", -height) + data[26:]
                assert int(read(top_down)) == width * height
    for data in (b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF89a12", b"BM", b"not an image at all"):
        assert int(read(data)) == -1, data
    with pytest.raises(tf.errors.InvalidArgumentError):
        read(b"\xff\xd8\xff" + b"garbage" * 10)


def _jpeg_with_orientation(img: np.ndarray, orientation: int) -> bytes:
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _exif_transposed(data: bytes, orientation: int) -> np.ndarray:
    """PIL's ImageOps.exif_transpose (the reference) on TensorFlow's decoded pixels."""
    import tensorflow as tf
    from PIL import Image, ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    im = Image.fromarray(tf.io.decode_jpeg(data, channels=3).numpy())
    im.info["exif"] = exif.tobytes()
    return np.asarray(ImageOps.exif_transpose(im))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_equals_pil_exif_transpose(orientation):
    import tensorflow as tf

    from layerbeam.transforms.readers.images import apply_orientation, exif_orientation

    img = photo_crops(1, 40, seed=2)[0][:24]  # not square: turns swap height and width
    data = _jpeg_with_orientation(img, orientation)
    assert int(exif_orientation(tf.constant(data))) == orientation
    got = apply_orientation(tf.io.decode_jpeg(data, channels=3), exif_orientation(tf.constant(data))).numpy()
    np.testing.assert_array_equal(got, _exif_transposed(data, orientation))


def _app1_big_endian(orientation: int, extra_tags: int = 3) -> bytes:
    """A JPEG prefix whose APP1 holds a Motorola-order ("MM") TIFF with tag 0x0112 after a few others."""
    be = lambda v, n: v.to_bytes(n, "big")  # noqa: E731
    entries = b"".join(be(0x0100 + k, 2) + be(3, 2) + be(1, 4) + be(k, 2) + b"\0\0" for k in range(extra_tags))
    entries += be(0x0112, 2) + be(3, 2) + be(1, 4) + be(orientation, 2) + b"\0\0"
    tiff = b"MM\x00\x2a" + be(8, 4) + be(extra_tags + 1, 2) + entries + be(0, 4)
    seg = b"Exif\x00\x00" + tiff
    return b"\xff\xd8\xff\xe1" + be(len(seg) + 2, 2) + seg


def test_exif_orientation_reads_what_pil_reads_and_1_where_there_is_none():
    """Against PIL's own EXIF parser: Motorola and Intel byte order, the tag after
    others, JFIF before EXIF, no EXIF, a PNG, and bytes that are not an image."""
    import io

    import tensorflow as tf
    from PIL import Image

    from layerbeam.transforms.readers.images import exif_orientation

    img = photo_crops(1, 32, seed=3)[0]
    cases = []
    for o in range(1, 9):
        body = _jpeg_with_orientation(img, 1)[2:]  # a real JPEG after SOI
        cases.append(_app1_big_endian(o) + body)
        cases.append(_jpeg_with_orientation(img, o))
    plain = io.BytesIO()
    Image.fromarray(img).save(plain, "JPEG")  # JFIF, no EXIF
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    cases += [plain.getvalue(), png.getvalue()]
    for data in cases:
        want = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
        assert int(exif_orientation(tf.constant(data))) == want
    for data in (b"", b"\xff\xd8\xff", b"\xff\xd8\xffExif\x00\x00", b"not an image", _app1_big_endian(6)[:20]):
        assert int(exif_orientation(tf.constant(data))) in range(1, 9)  # never an error inside tf.data
    assert int(exif_orientation(tf.constant(b"\xff\xd8\xff" + b"\0" * 70_000 + _app1_big_endian(6)[2:]))) == 1  # past the 64 KB scanned


def test_exif_orientation_is_applied_through_the_pipeline_unless_turned_off(setup):
    import tensorflow as tf

    from tests.tiny import reference

    root, model, _ = setup
    img = photo_crops(1, SIZE, seed=6)[0]
    data = _jpeg_with_orientation(img, 6)
    rec = example({"image/encoded": data, "image/key": "phone", "image/class/label": 1})
    for on in (True, False):
        name = f"exif_{on}"
        _run(root, model, name, frame(rec), **{"input.exif_orientation": on})
        got = layerbeam.read(str(root / f"{name}-out")).column("conv1").combine_chunks().to_numpy_ndarray()
        pixels = _exif_transposed(data, 6) if on else tf.io.decode_jpeg(data, channels=3).numpy()
        np.testing.assert_allclose(got, reference(model, "conv1", pixels[None]), rtol=1e-5, atol=1e-5)


def test_non_utf8_image_file_name_is_a_dead_letter_not_a_crash(setup, tmp_path):
    import os

    from layerbeam.run import run_job

    root, model, _ = setup
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    a, b = photo_crops(2, SIZE, seed=10)
    (folder / "good.png").write_bytes(encode_png(a))
    with open(os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.png"), "wb") as f:
        f.write(encode_png(b))
    raw = tiny_config(str(tmp_path / "imgs"), str(tmp_path / "out"), model, **{"input.format": "images", "input.key_feature": None, "input.label_feature": None, "output.max_dead_letter_fraction": 1.0})
    manifest = run_job(load_config(raw=raw))
    c = manifest["counts"]
    assert c["records_read"] == 2 and c["rows_written"] == 1 and c["dead_letter_reasons"] == {"invalid_utf8": 1}
    (d,) = pq.read_table(tmp_path / "out" / "_dead_letters").to_pylist()
    assert d["key"].endswith("/cat/bad\\xff.png") and "not UTF-8" in d["detail"]
