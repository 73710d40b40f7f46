"""Input formats behind the reader contract: a Parquet table (a Hugging Face-style image
struct column, numeric and list columns) gives the same rows as the same examples read
from TFRecord; bad rows become dead letters with reasons."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from layerbeam.config import load_config
from tests.conftest import encode_png, photo_crops, write_tfrecords
from tests.test_inputs import _example2_config, _tf_example, example2, example2_layer_names  # noqa: F401  (fixture)
from tests.tiny import SIZE, save_tiny_model, tiny_config


def _rows(out) -> dict:
    t = ds.dataset(str(out), format="parquet").to_table()
    keys = t.column("key").to_pylist()
    return {c: dict(zip(keys, t.column(c).combine_chunks().to_numpy_ndarray() if isinstance(t.column(c).type, pa.FixedShapeTensorType) else t.column(c).to_pylist())) for c in t.column_names if c != "key"}


def _run(raw):
    from layerbeam.run import run_job

    raw.setdefault("output", {}).setdefault("max_dead_letter_fraction", 1.0)  # bad rows on purpose
    return run_job(load_config(raw=raw))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    model = save_tiny_model(root / "tiny.keras")
    pngs = [encode_png(im) for im in photo_crops(7, SIZE, seed=12)]
    keys = [f"img{i}" for i in range(7)]
    return root, model, pngs, keys


def test_parquet_image_struct_column_equals_tfrecord(images):
    root, model, pngs, keys = images
    recs = [_tf_example({"image": png, "id": k, "label": np.array([i % 3], np.int64), "score": np.array([i / 10], np.float32)}) for i, (png, k) in enumerate(zip(pngs, keys))]
    write_tfrecords(root / "tfr", [recs[:4], recs[4:]])
    table = pa.table({
        "image": pa.array([{"bytes": p, "path": f"{k}.png"} for p, k in zip(pngs, keys)], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "id": keys,
        "label": pa.array([i % 3 for i in range(7)], pa.int64()),
        "score": pa.array([i / 10 for i in range(7)], pa.float32()),
    })
    (root / "pq").mkdir()
    pq.write_table(table.slice(0, 3), root / "pq" / "a.parquet")
    pq.write_table(table.slice(3), root / "pq" / "b.parquet", row_group_size=2)
    common = {"input.key_feature": "id", "input.label_feature": "label", "input.image_feature": "image", "input.passthrough": {"score": "float32"}}
    _run(tiny_config(f"{root}/tfr/*.tfrecord", str(root / "out_tfr"), model, **common))
    manifest = _run(tiny_config(f"{root}/pq/*.parquet", str(root / "out_pq"), model, **common, **{"input.format": "parquet"}))
    assert manifest["counts"]["records_read"] == manifest["counts"]["rows_written"] == 7
    a, b = _rows(root / "out_tfr"), _rows(root / "out_pq")
    assert sorted(b["conv1"]) == sorted(keys)
    for k in keys:
        np.testing.assert_array_equal(b["conv1"][k], a["conv1"][k])
        assert b["label"][k] == a["label"][k] and b["score"][k] == pytest.approx(a["score"][k])


def test_parquet_list_column_into_a_vector_model_equals_tfrecord(example2, tmp_path):
    root, _, _, x, keys = example2
    pq.write_table(pa.table({"x": pa.array(x.tolist(), pa.list_(pa.float32())), "id": keys}), tmp_path / "x.parquet")
    cfg = _example2_config(example2, tmp_path / "out", {"feature": "x", "dtype": "float32", "shape": [10]})
    _run(cfg)
    cfg = _example2_config(example2, tmp_path / "out_pq", {"feature": "x", "dtype": "float32", "shape": [10]})
    cfg["input"].update(pattern=str(tmp_path / "x.parquet"), format="parquet")
    _run(cfg)
    a, b = _rows(tmp_path / "out"), _rows(tmp_path / "out_pq")
    for name in example2_layer_names(example2[1])[1:4]:  # the three Dense layers
        for k in keys:
            np.testing.assert_array_equal(b[name][k], a[name][k])


def test_parquet_bad_rows_are_dead_letters_with_reasons(images):
    root, model, pngs, keys = images
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    values = [{"bytes": pngs[0], "path": "a"}, None, {"bytes": b"not an image at all", "path": "c"}, {"bytes": None, "path": "d"}, {"bytes": pngs[1], "path": "e"}]
    table = pa.table({"image": pa.array(values, struct), "id": ["ok0", "null_row", "text", "null_bytes", "ok1"]})
    (root / "badpq").mkdir()
    pq.write_table(table, root / "badpq" / "bad.parquet")
    manifest = _run(tiny_config(f"{root}/badpq/*.parquet", str(root / "out_bad"), model, **{"input.format": "parquet", "input.image_feature": "image", "input.key_feature": "id", "input.label_feature": None}))
    c = manifest["counts"]
    assert c["records_read"] == 5 and c["rows_written"] == 2 and c["dead_letters"] == 3
    dead = {d["key"]: d["reason"] for d in pq.read_table(root / "out_bad" / "_dead_letters").to_pylist()}
    assert dead == {"null_row": "null_value", "text": "not_an_image", "null_bytes": "null_value"}


def test_parquet_missing_column_is_refused_before_any_work(images, tmp_path):
    import yaml

    from tests.conftest import run_cli
    from tests.test_errors import _one_line_error

    root, model, pngs, _ = images
    pq.write_table(pa.table({"picture": [pngs[0]]}), tmp_path / "t.parquet")
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(tiny_config(str(tmp_path / "t.parquet"), str(tmp_path / "out"), model, **{"input.format": "parquet", "input.image_feature": "image", "input.key_feature": None, "input.label_feature": None})))
    line = _one_line_error(run_cli(["run", str(p)]))
    assert "column 'image' is not in" in line and "picture" in line, line
    assert not (tmp_path / "out").exists()


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards_equal_tfrecord_and_bad_samples_are_dead_letters(images, tmp_path):
    import json

    root, model, pngs, keys = images
    members = []
    for i, (png, k) in enumerate(zip(pngs, keys)):
        members += [(f"train/{k}.png", png), (f"train/{k}.cls", str(i % 3).encode()), (f"train/{k}.json", json.dumps({"i": i}).encode())]
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "shard-000000.tar", members[:12])
    # Shard 2: the rest, a sample without its image, one whose .png is text.
    bad = [("train/noimg.cls", b"1"), ("train/noimg.json", b"{}"), ("train/text.png", b"hello"), ("train/text.cls", b"2"), ("train/text.json", b"{}")]
    _tar(tmp_path / "wds" / "shard-000001.tar", members[12:] + bad)
    # The TFRecord twin, keyed like the tar samples.
    recs = [_tf_example({"image": png, "id": f"train/{k}", "label": np.array([i % 3], np.int64), "meta": json.dumps({"i": i})}) for i, (png, k) in enumerate(zip(pngs, keys))]
    write_tfrecords(tmp_path / "tfr", [recs])
    _run(tiny_config(f"{tmp_path}/tfr/*.tfrecord", str(tmp_path / "out_tfr"), model, **{"input.key_feature": "id", "input.label_feature": "label", "input.image_feature": "image", "input.passthrough": {"meta": "string"}}))
    manifest = _run(tiny_config(
        f"{tmp_path}/wds/*.tar", str(tmp_path / "out_wds"), model,
        **{"input.format": "webdataset", "input.key_feature": None, "input.image_feature": "png", "input.label_feature": "cls", "input.passthrough": {"json": "string"}},
    ))
    c = manifest["counts"]
    assert c["records_read"] == 9 and c["rows_written"] == 7 and c["dead_letters"] == 2
    a, b = _rows(tmp_path / "out_tfr"), _rows(tmp_path / "out_wds")
    assert sorted(b["conv1"]) == sorted(f"train/{k}" for k in keys)
    for k in b["conv1"]:
        np.testing.assert_array_equal(b["conv1"][k], a["conv1"][k])
        assert b["label"][k] == a["label"][k] and b["json"][k] == a["meta"][k]
    dead = {d["key"]: (d["reason"], d["detail"]) for d in pq.read_table(tmp_path / "out_wds" / "_dead_letters").to_pylist()}
    assert dead["train/noimg"][0] == "missing_member" and ".png" in dead["train/noimg"][1]
    assert dead["train/text"][0] == "not_an_image"


def _prepare_tfds(data_dir, file_format: str, images: list[np.ndarray]):
    """A tiny TFDS dataset (image, label, id), prepared offline in `data_dir` (no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    if file_format == "array_record":
        pytest.importorskip("array_record")

    # Not registered: the reader finds the dataset from its files alone (dataset_info.json,
    # features.json), as it would a dataset whose code is not installed.
    class TinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
                "id": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, im in enumerate(images):
                yield f"img{i}", {"image": im, "label": i % 3, "id": f"img{i}"}

    TinyPhotos(data_dir=str(data_dir), file_format=file_format).download_and_prepare()


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_prepared_dataset_equals_tfrecord(images, tmp_path, file_format):
    root, model, pngs, keys = images
    arrays = photo_crops(7, SIZE, seed=12)
    _prepare_tfds(tmp_path / "tfds", file_format, arrays)
    recs = [_tf_example({"image": png, "id": k, "label": np.array([i % 3], np.int64)}) for i, (png, k) in enumerate(zip(pngs, keys))]
    write_tfrecords(tmp_path / "tfr", [recs])
    common = {"input.label_feature": "label", "input.image_feature": "image"}
    _run(tiny_config(f"{tmp_path}/tfr/*.tfrecord", str(tmp_path / "out_tfr"), model, **common, **{"input.key_feature": "id"}))
    tfds_cfg = {"input.format": "tfds", "input.tfds_name": "tiny_photos", "input.tfds_split": "train"}
    manifest = _run(tiny_config(str(tmp_path / "tfds"), str(tmp_path / "out_tfds"), model, **common, **tfds_cfg, **{"input.key_feature": "id"}))
    assert manifest["counts"]["records_read"] == manifest["counts"]["rows_written"] == 7
    a, b = _rows(tmp_path / "out_tfr"), _rows(tmp_path / "out_tfds")
    assert sorted(b["conv1"]) == sorted(keys)
    for k in keys:
        np.testing.assert_array_equal(b["conv1"][k], a["conv1"][k])
        assert b["label"][k] == a["label"][k]
    # Without a key feature, the key is TFDS's own id: <file name>__<index>.
    _run(tiny_config(str(tmp_path / "tfds"), str(tmp_path / "out_ids"), model, **common, **tfds_cfg, **{"input.key_feature": None}))
    ids = sorted(_rows(tmp_path / "out_ids")["conv1"])
    assert ids == sorted(f"tiny_photos-train.{file_format}-00000-of-00001__{i}" for i in range(7))
