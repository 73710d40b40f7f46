"""Bad records never stop a run and never vanish: every record read is a row or a dead
letter with the right reason; good records of every image mode equal Keras's predict."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from layerbeam.run import run_job
from layerbeam.config import load_config
from tests.conftest import encode_png, example, photo_crops, write_tfrecords
from tests.tiny import SIZE, reference, save_tiny_model, tiny_config
from layerbeam.transforms.readback import to_arrow


def _enc(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _good_images():
    """key → (encoded bytes, reference uint8 RGB pixels): every mode that must be converted."""
    import tensorflow as tf
    from PIL import Image

    a, b, c, d, e, f, g, h = photo_crops(8, SIZE, seed=3)
    rgba = np.concatenate([b, np.full((SIZE, SIZE, 1), 77, np.uint8)], axis=-1)
    g16 = (c.astype(np.uint16) * 257 + np.arange(SIZE, dtype=np.uint16)[None, :, None]).astype(np.uint16)
    jpeg = _enc(Image.fromarray(d), "JPEG", quality=95)
    cmyk = _enc(Image.fromarray(e).convert("CMYK"), "JPEG", quality=95)
    gif = _enc(Image.fromarray(f).convert("P"), "GIF")
    return {
        "rgb_png": (encode_png(a), a),
        "rgba_png": (_enc(Image.fromarray(rgba, "RGBA"), "PNG"), b),  # alpha dropped
        "rgb16_png": (tf.io.encode_png(g16).numpy(), (g16 // 256).astype(np.uint8)),  # 16 → 8 bit
        "gray_png": (_enc(Image.fromarray(h[..., 0]), "PNG"), np.repeat(h[..., :1], 3, axis=-1)),
        "jpeg": (jpeg, tf.io.decode_jpeg(jpeg, channels=3).numpy()),
        "cmyk_jpeg": (cmyk, tf.io.decode_jpeg(cmyk, channels=3).numpy()),  # libjpeg's CMYK → RGB
        "gif": (gif, np.asarray(Image.open(io.BytesIO(gif)).convert("RGB"))),
        "bmp": (_enc(Image.fromarray(g), "BMP"), g),
    }


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    model = save_tiny_model(root / "tiny.keras")
    good = _good_images()
    png = encode_png(photo_crops(1, SIZE, seed=9)[0])
    rec = lambda key, img, label=1, **extra: example({"image/encoded": img, "image/key": key, "image/class/label": label, **extra})  # noqa: E731
    shard0 = [rec(k, v[0]) for k, v in good.items()]
    bad0 = {
        "trunc_png": (rec("trunc_png", png[: len(png) // 2]), "truncated_image"),
        "bad_jpeg": (rec("bad_jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2 + b"\xff\xd9"), "undecodable_image"),
        "text": (rec("text", b"just some text, not a picture"), "not_an_image"),
        "empty": (rec("empty", b""), "empty_image"),
        "no_image": (example({"image/key": "no_image", "image/class/label": 1}), "missing_feature"),
        "int_image": (example({"image/encoded": 5, "image/key": "int_image", "image/class/label": 1}), "wrong_feature_type"),
        "text_label": (example({"image/encoded": png, "image/key": "text_label", "image/class/label": "cat"}), "wrong_feature_type"),
        "part-00000.tfrecord:15": (b"\xff\xfe\x00 this is not a tf.train.Example", "unparseable_record"),
        "rgb_png": (rec("rgb_png", png), "duplicate_key"),  # repeats record 0's key
        "tiff": (rec("tiff", _enc(Image.fromarray(good["bmp"][1]), "TIFF")), "unsupported_image_format"),
    }
    shard0 += [r for r, _ in bad0.values()]
    # Shard 1: good records, a key shard 0 already wrote, and a file cut part-way.
    extra = photo_crops(4, SIZE, seed=5)
    shard1 = [rec("s1_a", encode_png(extra[0])), rec("s1_b", encode_png(extra[1])), rec("jpeg", encode_png(extra[2])), rec("s1_c", encode_png(extra[3])), rec("s1_lost", png)]
    paths = write_tfrecords(root / "data", [shard0, shard1])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 40])  # the last record loses its end
    # half the records are bad on purpose: accept them all (the default limit is 0.1)
    cfg = load_config(raw=tiny_config(f"{root}/data/*.tfrecord", f"{root}/out", model, **{"output.max_dead_letter_fraction": 1.0}))
    manifest = run_job(cfg)
    refs = {k: v[1] for k, v in good.items()} | {"s1_a": extra[0], "s1_b": extra[1], "s1_c": extra[3]}
    expected_bad = {k: r for k, (_, r) in bad0.items()} | {"jpeg": "duplicate_key"}
    return root, model, manifest, refs, expected_bad


def test_every_record_is_a_row_or_a_dead_letter(bad_run):
    root, _, manifest, refs, expected_bad = bad_run
    c = manifest["counts"]
    print("manifest counts:", c, "shard errors:", manifest["shard_errors"])
    assert c["records_read"] == 18 + 4  # shard 1's fifth record is lost with the file's end
    assert c["rows_written"] == len(refs) == 11
    assert c["dead_letters"] == len(expected_bad) == 11
    assert c["records_read"] == c["rows_written"] + c["dead_letters"]
    assert c["dead_letter_reasons"] == {
        "duplicate_key": 2, "empty_image": 1, "missing_feature": 1, "not_an_image": 1, "truncated_image": 1,
        "undecodable_image": 1, "unparseable_record": 1, "unsupported_image_format": 1, "wrong_feature_type": 2,
    }
    table = to_arrow(str(root / "out"))
    assert sorted(table.column("key").to_pylist()) == sorted(refs)


def test_each_bad_record_has_its_reason_in_the_dead_letters(bad_run):
    root, _, manifest, _, expected_bad = bad_run
    dead = pq.read_table(root / "out" / "_dead_letters").to_pylist()
    records = [d for d in dead if d["index"] is not None]
    assert {d["key"]: d["reason"] for d in records} == expected_bad
    assert all(d["detail"] and d["stage"] in ("decode", "dedupe") for d in records)
    by_key = {d["key"]: d for d in records}
    assert "'image/encoded'" in by_key["no_image"]["detail"]
    assert "image/class/label" in by_key["text_label"]["detail"]
    assert by_key["rgb_png"]["stage"] == "dedupe" and by_key["rgb_png"]["index"] == 16
    assert by_key["jpeg"]["shard"].endswith("part-00001.tfrecord") and "shard s00000" in by_key["jpeg"]["detail"]
    assert sorted(f.split("/")[-1].split("-")[0] for f in manifest["dead_letter_files"]) == ["s00000", "s00001"]  # <shard>-<run>.parquet


def test_a_file_corrupt_part_way_keeps_its_first_records_and_one_shard_dead_letter(bad_run):
    root, _, manifest, _, _ = bad_run
    dead = pq.read_table(root / "out" / "_dead_letters").to_pylist()
    shard_level = [d for d in dead if d["index"] is None]
    assert len(shard_level) == 1
    (d,) = shard_level
    assert d["reason"] == "corrupt_shard" and d["stage"] == "read" and d["key"].endswith("part-00001.tfrecord")
    assert "kept the 4 records" in d["detail"] and "truncated" in d["detail"]
    (err,) = manifest["shard_errors"]
    assert err["shard"] == "s00001" and err["records_kept"] == 4 and err["reason"] == "corrupt_shard"


def test_good_records_of_every_image_mode_equal_keras_predict(bad_run):
    root, model, _, refs, _ = bad_run
    table = to_arrow(str(root / "out"))
    rows = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    keys = sorted(refs)
    got = table.column("conv1").combine_chunks().to_numpy_ndarray()[[rows[k] for k in keys]]
    ref = reference(model, "conv1", np.stack([refs[k] for k in keys]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The converted CMYK JPEG is the photo, not garbage.
    cmyk = _good_images()["cmyk_jpeg"][1].astype(int)
    assert np.abs(cmyk - photo_crops(8, SIZE, seed=3)[4].astype(int)).mean() < 8


def test_image_folders_empty_and_non_image_files_are_dead_letters(tmp_path, bad_run):
    _, model, _, _, _ = bad_run
    imgs = photo_crops(3, SIZE, seed=11)
    (tmp_path / "data/cat").mkdir(parents=True)
    (tmp_path / "data/dog").mkdir(parents=True)
    (tmp_path / "data/cat/a.png").write_bytes(encode_png(imgs[0]))
    (tmp_path / "data/cat/b.png").write_bytes(encode_png(imgs[1]))
    (tmp_path / "data/cat/empty.png").write_bytes(b"")
    (tmp_path / "data/dog/c.png").write_bytes(encode_png(imgs[2]))
    (tmp_path / "data/dog/notes.txt").write_text("not an image\n")
    (tmp_path / "data/dog/cut.png").write_bytes(encode_png(imgs[2])[:300])
    cfg = tiny_config(f"{tmp_path}/data", f"{tmp_path}/out", model, **{"input.format": "images", "input.files_per_shard": 4, "output.max_dead_letter_fraction": 1.0})
    del cfg["input"]["key_feature"], cfg["input"]["label_feature"]
    manifest = run_job(load_config(raw=cfg))
    c = manifest["counts"]
    assert (c["records_read"], c["rows_written"], c["dead_letters"]) == (6, 3, 3)
    dead = {os.path.basename(d["key"]): (d["reason"], d["detail"]) for d in pq.read_table(tmp_path / "out/_dead_letters").to_pylist()}
    assert dead["empty.png"] == ("empty_image", "the file is empty (0 bytes)")
    assert dead["notes.txt"][0] == "not_an_image"
    assert dead["cut.png"][0] == "truncated_image"
    table = to_arrow(str(tmp_path / "out"))
    rows = {os.path.basename(k): i for i, k in enumerate(table.column("key").to_pylist())}
    got = table.column("conv1").combine_chunks().to_numpy_ndarray()[[rows[n] for n in ("a.png", "b.png", "c.png")]]
    np.testing.assert_allclose(got, reference(model, "conv1", np.stack(imgs)), rtol=1e-5, atol=1e-5)


def test_the_readme_globs_read_only_data_files_when_there_are_dead_letters(bad_run):
    """`_dead_letters/*.parquet` sits inside the output; the documented globs skip it."""
    import duckdb
    import polars as pl

    root, _, manifest, refs, _ = bad_run
    out = root / "out"
    assert list((out / "_dead_letters").glob("*.parquet"))
    df = pl.read_parquet(f"{out}/**/part-*.parquet", hive_partitioning=True)
    assert sorted(df["key"].to_list()) == sorted(refs)
    keys = duckdb.sql(f"select key from read_parquet('{out}/**/part-*.parquet', hive_partitioning=true)").fetchall()
    assert sorted(k for (k,) in keys) == sorted(refs)
