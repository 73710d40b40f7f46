"""TFRecord outputs load in TensorFlow Datasets: the commit names the files as TFDS shards
and writes `dataset_info.json` + `features.json`, so the real `tfds.builder_from_directory`
loads the output with its features, float16 bit-exact (stored as raw little-endian bytes)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from layerbeam.transforms.commit import finalize, publish_shard
from layerbeam.transforms.formats import make_writer
from layerbeam.transforms.formats import WriteSpec
from layerbeam.transforms.layers import OutputSpec
from layerbeam.transforms.readback import to_arrow
from layerbeam.transforms.schema import output_schema, to_record_batch
from layerbeam.transforms.staging import OutputLayout

RUN = "0123456789abcdef"


def _commit(tmp_path, partition_by=("label",), shards=2, compression="none"):
    """Two shards written by the TFRecord writer and committed by the library's commit steps."""
    specs = [
        OutputSpec(name="pooled", path="p", layer_type="Dense", reduce="mean", dtype="float32", shape=(8,)),
        OutputSpec(name="map16", path="m", layer_type="Conv2D", reduce="none", dtype="float16", shape=(3, 4, 5)),
    ]
    schema = output_schema(specs, {"key": pa.string(), "label": pa.int64()})
    spec = WriteSpec(path=str(tmp_path / "out"), format="tfrecord", partition_by=partition_by, tfrecord_compression=compression)
    writer = make_writer(spec, schema)
    layout = OutputLayout(spec.path, RUN)
    rng = np.random.default_rng(0)
    results, rows = [], {}
    for s in range(shards):
        n = 5
        keys = np.array([f"s{s}k{i}" for i in range(n)], dtype=object)
        labels = np.arange(n, dtype=np.int64) % 3
        outs = {"pooled": rng.normal(size=(n, 8)).astype(np.float32), "map16": np.maximum(0, rng.normal(size=(n, 3, 4, 5))).astype(np.float16)}
        for i, k in enumerate(keys):
            rows[k] = {"label": int(labels[i]), "pooled": outs["pooled"][i], "map16": outs["map16"][i]}
        batch = to_record_batch(schema, {"key": keys, "label": labels}, outs)
        files = writer.write_shard(iter([batch]), layout.shard_dir(f"s{s}", "a0"), f"part-{RUN[:8]}-s{s}")
        results.append({"shard": f"s{s}", "attempt": "a0", "paths": [f"in{s}"], "bytes_in": 0, "read": n, "rows": n, "dead_letters": 0, "dead_reasons": {},
                        "files": [{"path": f.path, "final_path": f.path, "rows": f.rows, "bytes": f.bytes} for f in files]})
    base = {"run_id": RUN, "model": {"source": "test"}, "config": {"output": {"partition_by": list(partition_by), "format": "tfrecord"}},
            "storage": writer.storage_spec(), "outputs": []}
    finalize(layout, [publish_shard(layout, r) for r in results], base)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    return tmp_path / "out", manifest, rows


def test_commit_names_tfrecord_files_as_tfds_shards_and_writes_the_metadata(tmp_path):
    out, manifest, _ = _commit(tmp_path)
    paths = sorted(f["path"] for f in manifest["files"])
    assert paths == [f"label={lab}/part-01234567.tfrecord-{i:05d}-of-00002" for lab in range(3) for i in range(2)]
    info = json.loads((out / "dataset_info.json").read_text())
    assert [s["name"] for s in info["splits"]] == ["label_0", "label_1", "label_2"]
    assert info["splits"][0]["filepathTemplate"] == "label=0/part-01234567.{FILEFORMAT}-{SHARD_X_OF_Y}"
    feats = json.loads((out / "features.json").read_text())["featuresDict"]["features"]
    assert feats["map16"]["tensor"] == {"dtype": "float16", "encoding": "bytes", "shape": {"dimensions": ["3", "4", "5"]}}
    assert feats["pooled"]["tensor"]["encoding"] == "none" and feats["key"]["pythonClassName"].endswith("Text")
    assert to_arrow(str(out)).num_rows == 10  # layerbeam reads the renamed files through the manifest


def test_gzip_outputs_get_no_tfds_metadata(tmp_path):
    out, manifest, _ = _commit(tmp_path, partition_by=(), compression="gzip")
    assert not (out / "dataset_info.json").exists()
    assert all(f["path"].endswith(".tfrecord.gz") for f in manifest["files"])
    assert to_arrow(str(out)).num_rows == 10


@pytest.mark.readers
@pytest.mark.parametrize("partition_by", [("label",), ()])
def test_tfds_builder_from_directory_loads_the_output(tmp_path, partition_by):
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install '.[readers]')")
    out, _, rows = _commit(tmp_path, partition_by=partition_by)

    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["map16"].shape == (3, 4, 5) and builder.info.features["map16"].dtype == np.float16
    got = list(tfds.as_numpy(builder.as_dataset(split="all", shuffle_files=False)))
    assert sorted(g["key"].decode() for g in got) == sorted(rows)
    for g in got:
        want = rows[g["key"].decode()]
        assert int(g["label"]) == want["label"]
        np.testing.assert_array_equal(g["map16"].view(np.uint16), want["map16"].view(np.uint16))
        np.testing.assert_array_equal(g["pooled"].view(np.uint32), want["pooled"].view(np.uint32))
    if partition_by:
        one = list(tfds.as_numpy(builder.as_dataset(split="label_1", shuffle_files=False)))
        assert sorted(g["key"].decode() for g in one) == sorted(k for k, r in rows.items() if r["label"] == 1)
