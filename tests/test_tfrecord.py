"""TFRecord output: the wire-format encoder against TensorFlow's own protobuf and
tensor parsers, the writer's file bounds and partitions, and a run's TFRecord output read
with plain tf.data from the manifest's spec alone, equal to the same run's Parquet."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from layerbeam.transforms.formats.tfrecord import ExampleEncoder, TFRecordShardWriter
from layerbeam.transforms.readback import to_arrow
from layerbeam.transforms.schema import output_schema, to_record_batch


class _Spec:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    def to_json(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _f16_specials(shape) -> np.ndarray:
    """float16 values with every awkward bit pattern: ±0, ±inf, NaN payloads, subnormals, max."""
    bits = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFD55, 0x0001, 0x83FF, 0x7BFF, 0x3C00, 0xBC01, 0x0400], np.uint16)
    n = int(np.prod(shape))
    return np.resize(bits, n).view(np.float16).reshape(shape)


def _batch(n: int, start: int = 0):
    schema = output_schema(
        [_Spec("vec", (5,), "float32"), _Spec("map", (2, 3, 2), "float16")],
        {"key": pa.string(), "label": pa.int64(), "score": pa.float32(), "note": pa.string()},
    )
    rng = np.random.default_rng(start)
    cols = {
        "key": np.array([f"kéy/{start + i}" for i in range(n)], dtype=object),
        "label": np.array([(start + i) % 3 - 1 for i in range(n)], np.int64) * (1 << 40),
        "score": rng.standard_normal(n).astype(np.float32),
        "note": np.array(["" if i % 2 else "a b/c" for i in range(n)], dtype=object),
    }
    maps = np.stack([_f16_specials((2, 3, 2)) for _ in range(n)])
    maps[:, 0, 0, 0] = rng.standard_normal(n).astype(np.float16)
    outs = {"vec": rng.standard_normal((n, 5)).astype(np.float32), "map": maps}
    return schema, cols, outs, to_record_batch(schema, cols, outs)


def test_encoded_examples_parse_with_protobuf_and_tf_io_bit_exactly():
    import tensorflow as tf

    schema, cols, outs, batch = _batch(7)
    records = ExampleEncoder(schema).encode(batch.slice(2))  # a sliced batch: offsets honoured
    assert len(records) == 5
    spec = {
        "key": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "score": tf.io.FixedLenFeature([], tf.float32),
        "note": tf.io.FixedLenFeature([], tf.string),
        "vec": tf.io.FixedLenFeature([5], tf.float32),
        "vec.shape": tf.io.FixedLenFeature([1], tf.int64),
        "map": tf.io.FixedLenFeature([], tf.string),
    }
    for j, rec in enumerate(records):
        i = j + 2
        # protobuf's own parser accepts it and re-serializes to the same size
        ex = tf.train.Example.FromString(rec)
        assert ex.ByteSize() == len(rec)
        assert set(ex.features.feature) == set(spec)
        # float16: the raw little-endian values, numpy alone decodes them
        raw = ex.features.feature["map"].bytes_list.value[0]
        assert raw == outs["map"][i].astype("<f2").tobytes()
        np.testing.assert_array_equal(np.frombuffer(raw, "<f2").reshape(2, 3, 2).view(np.uint16), outs["map"][i].view(np.uint16))
        got = tf.io.parse_single_example(rec, spec)
        assert got["key"].numpy().decode() == cols["key"][i]
        assert got["label"].numpy() == cols["label"][i]
        assert got["score"].numpy().view(np.uint32) == cols["score"][i].view(np.uint32)
        assert got["note"].numpy().decode() == cols["note"][i]
        np.testing.assert_array_equal(got["vec"].numpy().view(np.uint32), outs["vec"][i].view(np.uint32))
        assert got["vec.shape"].numpy().tolist() == [5]
        m = tf.reshape(tf.io.decode_raw(got["map"], tf.float16, little_endian=True), (2, 3, 2)).numpy()
        np.testing.assert_array_equal(m.view(np.uint16), outs["map"][i].view(np.uint16))


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_writer_bounds_files_partitions_and_counts(tmp_path, compression):
    import tensorflow as tf

    schema, _, _, first = _batch(40)
    batches = [first] + [_batch(40, start=40 * k)[3] for k in (1, 2)]
    record = len(ExampleEncoder(schema).encode(first.slice(0, 1))[0])
    w = TFRecordShardWriter(schema, partition_by=["label"], max_rows_per_file=1000, max_bytes_per_file=10 * record, compression=compression)
    files = w.write_shard(iter(batches), str(tmp_path), "part-s00000")
    assert sum(f.rows for f in files) == 120
    assert {Path(f.path).parent.name for f in files} == {f"label={v * (1 << 40)}" for v in (-1, 0, 1)}
    keys = []
    for f in files:
        p = tmp_path / f.path
        assert p.stat().st_size == f.bytes
        assert p.name.endswith(".tfrecord.gz" if compression == "gzip" else ".tfrecord")
        recs = list(tf.data.TFRecordDataset(str(p), compression_type="GZIP" if compression == "gzip" else "").as_numpy_iterator())
        assert len(recs) == f.rows <= 10
        label = int(Path(f.path).parent.name.split("=")[1])
        for r in recs:
            ex = tf.train.Example.FromString(r).features.feature
            assert ex["label"].int64_list.value[0] == label  # each row in its partition folder
            keys.append(ex["key"].bytes_list.value[0].decode())
        if compression == "none":
            assert f.bytes <= 10 * (record + 16)  # 16 bytes of TFRecord framing per record
    assert sorted(keys) == sorted(f"kéy/{i}" for i in range(120))


def test_tfrecord_read_with_plain_tf_data_from_manifest_spec_equals_parquet(three_formats):
    """Only the manifest's storage spec (no layerbeam reader) → the same rows as Parquet."""
    import tensorflow as tf

    out, manifest = three_formats["tfrecord"]
    spec = json.loads((out / "_manifest.json").read_text())["storage"]
    assert spec["format"] == "tfrecord" and spec["compression"] == "GZIP"
    dtypes = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}
    features = {}
    for c in spec["columns"]:
        t = c["tfrecord"]
        features[t["feature"]] = tf.io.FixedLenFeature([], tf.string) if t["kind"] == "raw_bytes" else tf.io.FixedLenFeature(c["shape"], dtypes[c["dtype"]])

    def parse(r):
        x = tf.io.parse_single_example(r, features)
        for c in spec["columns"]:
            if c["tfrecord"]["kind"] == "raw_bytes":
                x[c["name"]] = tf.reshape(tf.io.decode_raw(x[c["name"]], tf.float16, little_endian=True), c["shape"])
        return x

    files = sorted(str(p) for p in out.rglob("*.tfrecord.gz"))
    assert len(files) == len(manifest["files"])
    got = {}
    for row in tf.data.TFRecordDataset(files, compression_type="GZIP").map(parse).as_numpy_iterator():
        got[row["key"].decode()] = row

    pq_out, _ = three_formats["parquet"]
    table = to_arrow(str(pq_out))
    assert sorted(got) == sorted(table.column("key").to_pylist()) and len(got) == 10
    outputs = [c for c in spec["columns"] if c["role"] == "output"]
    assert [c["name"] for c in outputs] == ["pooled", "map16", "pooled_bf16"]
    arrays = {c["name"]: table.column(c["name"]).combine_chunks().to_numpy_ndarray() for c in outputs}
    for i, key in enumerate(table.column("key").to_pylist()):
        assert got[key]["label"] == table.column("label")[i].as_py()
        for c in outputs:
            ref = arrays[c["name"]][i]
            assert got[key][c["name"]].dtype == ref.dtype and got[key][c["name"]].shape == tuple(c["shape"])
            # bit-exact, float16 included
            bits = np.uint16 if ref.dtype == np.float16 else np.uint32
            np.testing.assert_array_equal(got[key][c["name"]].view(bits), ref.view(bits))


def test_bfloat16_is_float32_rounded_to_nearest_even(three_formats):
    import ml_dtypes

    out, manifest = three_formats["parquet"]
    table = to_arrow(str(out))
    pooled = table.column("pooled").combine_chunks().to_numpy_ndarray()
    bf = table.column("pooled_bf16").combine_chunks().to_numpy_ndarray()
    assert bf.dtype == np.float32
    assert not (bf.view(np.uint32) & 0xFFFF).any()
    np.testing.assert_array_equal(bf.view(np.uint32), pooled.astype(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32))
    spec = {c["name"]: c for c in manifest["storage"]["columns"]}
    assert spec["pooled_bf16"]["dtype"] == "float32" and spec["pooled_bf16"]["logical_dtype"] == "bfloat16"
    assert {o["name"]: o["bytes_per_example"] for o in manifest["outputs"]}["pooled_bf16"] == 4 * spec["pooled_bf16"]["shape"][0]


def test_parquet_encoding_is_parquet_only_and_old_keys_say_what_to_use(tmp_path):
    from layerbeam.config import ConfigError, load_config
    from tests.conftest import base_config

    with pytest.raises(ConfigError, match="parquet_encoding.*tfrecord"):
        load_config(raw=base_config("x/*.tfrecord", str(tmp_path), **{"output.format": "tfrecord", "output.parquet_encoding": "list"}))
    with pytest.raises(ConfigError, match=r"output.parquet_compat = True was replaced by output.parquet_encoding; write output.parquet_encoding: list") as e:
        load_config(raw=base_config("x/*.tfrecord", str(tmp_path), **{"output.parquet_compat": True}))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="float16_byte_stream_split = False was replaced by output.parquet_encoding"):
        load_config(raw=base_config("x/*.tfrecord", str(tmp_path), **{"output.float16_byte_stream_split": False}))


def test_writer_uploads_to_a_non_local_destination():
    """Non-local destinations (any fsspec URL): written locally, then uploaded."""
    import fsspec
    import tensorflow as tf

    schema, _, _, batch = _batch(6)
    files = TFRecordShardWriter(schema, partition_by=["label"]).write_shard(iter([batch]), "memory://t4-upload/shard", "part")
    fs = fsspec.filesystem("memory")
    keys = []
    for f in files:
        data = fs.cat(f"/t4-upload/shard/{f.path}")
        assert len(data) == f.bytes
        local = Path(tempfile.mkdtemp()) / "f.tfrecord"
        local.write_bytes(data)
        keys += [tf.train.Example.FromString(r).features.feature["key"].bytes_list.value[0].decode() for r in tf.data.TFRecordDataset(str(local)).as_numpy_iterator()]
    assert sorted(keys) == sorted(f"kéy/{i}" for i in range(6))


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_key_repeated_across_shards_is_written_once_in_tfrecord_too(tmp_path, compression):
    """The commit filters later shards' repeats out of TFRecord files as it does for Parquet:
    the earliest record keeps the key, the later one becomes a dead letter saying why."""
    import pyarrow.parquet as pq

    from layerbeam.run import run_job
    from layerbeam.config import load_config
    from tests.conftest import base_config, encode_png, example, photo_crops, write_tfrecords

    imgs = photo_crops(5, 64, seed=7)
    rec = lambda i, key, label: example({"image/encoded": encode_png(imgs[i]), "image/key": key, "image/class/label": label})  # noqa: E731
    # "a" in shard 0 (label 0) and again in shard 1 (label 1): shard 0's must win
    write_tfrecords(tmp_path / "data", [[rec(0, "a", 0), rec(1, "b", 1)], [rec(2, "c", 0), rec(3, "a", 1), rec(4, "d", 1)]])
    raw = base_config(f"{tmp_path}/data/*.tfrecord", str(tmp_path / "out"), **{
        "output.format": "tfrecord", "output.partition_by": ["label"], "output.tfrecord_compression": compression,
        "output.max_dead_letter_fraction": 0.5})  # one of five is a repeat on purpose
    manifest = run_job(load_config(raw=raw))
    assert manifest["counts"]["records_read"] == 5
    assert manifest["counts"]["rows_written"] == 4
    assert manifest["counts"]["dead_letter_reasons"] == {"duplicate_key": 1}
    # gzip keeps the writer's names; uncompressed files are named as TFDS shards
    pattern = r"label=\d/part-\w+-s\d+-\d+\.tfrecord\.gz" if compression == "gzip" else r"label=\d/part-\w{8}\.tfrecord-\d{5}-of-\d{5}"
    assert all(re.fullmatch(pattern, f["path"]) for f in manifest["files"]), [f["path"] for f in manifest["files"]]
    table = to_arrow(str(tmp_path / "out"))
    rows = dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))
    assert rows == {"a": 0, "b": 1, "c": 0, "d": 1}  # the kept "a" is shard 0's
    assert sum(f["rows"] for f in manifest["files"]) == 4
    (dead_file,) = (tmp_path / "out" / "_dead_letters").glob("s00001-*.parquet")  # <shard>-<run>.parquet
    dead = pq.read_table(dead_file).to_pylist()
    assert [(d["key"], d["index"], d["reason"]) for d in dead] == [("a", 1, "duplicate_key")]
    assert "record 0 of shard s00000" in dead[0]["detail"]
