"""Reading outputs back: the layerbeam API returns the same data for every Parquet
encoding and TFRecord (older outputs included); pandas, polars and DuckDB read the Parquet
outputs with shapes from the files; float16 survives every format bit-exactly; `layerbeam
show` summarizes an output. (Every other reader: tests/test_reader_conformance.py.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from layerbeam.transforms.readback import head, open_output, to_arrow, to_pandas, to_tf_dataset

FORMATS = ["parquet", "list", "tfrecord"]
ENCODINGS = ["portable", "arrow_tensor", "nested_float16", "list"]


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("key")


def _dense(x) -> np.ndarray:
    """pandas' nested object arrays (one per list level) → one numeric array."""
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object):
        return np.stack([_dense(y) for y in x])
    return np.asarray(x)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


@pytest.fixture(scope="module")
def reference(three_formats):
    """The Parquet output read with plain pyarrow (nested lists, shape from the data):
    {key: {column: value}}."""
    import pyarrow.parquet as pq

    out, _ = three_formats["parquet"]
    t = pq.read_table(str(out), partitioning=None)
    rows = {}
    arrays = {n: np.array(t.column(n).to_pylist(), dtype=np.float32) for n in ("pooled", "map16", "pooled_bf16")}
    arrays["map16"] = arrays["map16"].astype(np.float16)  # widened exactly by the portable encoding
    for i, key in enumerate(t.column("key").to_pylist()):
        rows[key] = {"label": t.column("label")[i].as_py(), **{n: a[i] for n, a in arrays.items()}}
    return rows


def test_arrow_readback_is_identical_for_every_format(three_formats, reference):
    tables = {f: _sorted(to_arrow(str(three_formats[f][0]))) for f in FORMATS}
    first = tables["parquet"]
    assert first.column_names == ["key", "label", "pooled", "map16", "pooled_bf16"]
    assert first.schema.field("label").type == pa.int64()  # typed from the manifest, not inferred as int32
    assert first.schema.field("map16").type == pa.fixed_shape_tensor(pa.float16(), [32, 32, 48])  # 64 px, α=0.35
    for f in FORMATS[1:]:
        assert tables[f].schema == first.schema, f
        assert tables[f].equals(first), f  # Arrow equality: float16 compared by value; bits below
    for f in FORMATS:
        t = tables[f]
        maps = t.column("map16").combine_chunks().to_numpy_ndarray()
        for i, key in enumerate(t.column("key").to_pylist()):
            np.testing.assert_array_equal(_bits(maps[i]), _bits(reference[key]["map16"]))
    # one column only, and the first rows
    assert to_arrow(str(three_formats["tfrecord"][0]), ["key", "pooled"]).column_names == ["key", "pooled"]
    assert len(head(str(three_formats["tfrecord"][0]), 3)) == 3 and len(head(str(three_formats["parquet"][0]), 3)) == 3


def test_tf_dataset_readback_is_identical_for_every_format(three_formats, reference):
    for f in FORMATS:
        ds = to_tf_dataset(str(three_formats[f][0]))
        assert ds.element_spec["map16"].shape == (32, 32, 48) and ds.element_spec["map16"].dtype.name == "float16", f
        assert ds.element_spec["pooled_bf16"].dtype.name == "float32"
        seen = set()
        for row in ds.as_numpy_iterator():
            key = row["key"].decode()
            seen.add(key)
            assert row["label"] == reference[key]["label"]
            for n in ("pooled", "map16", "pooled_bf16"):
                np.testing.assert_array_equal(_bits(row[n]), _bits(reference[key][n]), err_msg=f"{f} {n} {key}")
        assert seen == set(reference), f


def test_pandas_readback_has_shaped_cells(three_formats, reference):
    for f in FORMATS:
        df = to_pandas(str(three_formats[f][0]))
        assert list(df.columns) == ["key", "label", "pooled", "map16", "pooled_bf16"]
        assert str(df["label"].dtype) == "int64"
        for key, m in zip(df["key"], df["map16"]):
            assert m.shape == (32, 32, 48) and m.dtype == np.float16
            np.testing.assert_array_equal(_bits(m), _bits(reference[key]["map16"]))


@pytest.mark.parametrize("fmt", ["parquet", "list"])
def test_pandas_polars_duckdb_read_the_parquet_with_shapes_from_the_manifest(three_formats, reference, fmt):
    import duckdb
    import pandas as pd
    import polars as pl

    out, manifest = three_formats[fmt]
    shapes = {c["name"]: c["shape"] for c in manifest["storage"]["columns"] if c["role"] == "output"}
    logical = {c["name"]: c["logical_dtype"] for c in manifest["storage"]["columns"] if c["role"] == "output"}
    stored = {c["name"]: c["dtype"] for c in manifest["storage"]["columns"] if c["role"] == "output"}
    assert stored["map16"] == "float32"  # both encodings widen float16 exactly

    def check(key, name, values):
        v = np.asarray(values, dtype=stored[name]).reshape(shapes[name])
        if logical[name] == "float16":
            v = v.astype(np.float16)  # widened float16 exactly; narrowing back is exact
        np.testing.assert_array_equal(_bits(v), _bits(reference[key][name]), err_msg=f"{fmt} {name} {key}")

    # pandas, through its pyarrow engine: the folder, the label from the files
    df = pd.read_parquet(str(out), partitioning=None)
    assert sorted(df["key"]) == sorted(reference)
    for key, label, values in zip(df["key"], df["label"], df["map16"]):
        assert int(label) == reference[key]["label"]
        check(key, "map16", _dense(values).reshape(-1))

    # polars: an Array with the tensor's shape (portable), or a plain List (list)
    pdf = pl.read_parquet(f"{out}/**/*.parquet")
    dtype = pdf.schema["map16"]
    assert dtype == pl.Array(pl.Float32, (32, 32, 48)) if fmt == "parquet" else dtype == pl.List(pl.Float32), dtype
    for key, m, p in zip(pdf["key"].to_list(), pdf["map16"].to_list(), pdf["pooled_bf16"].to_list()):
        check(key, "map16", np.asarray(m).reshape(-1))
        check(key, "pooled_bf16", p)

    # DuckDB: nested lists (portable) or flat lists; both only float32
    con = duckdb.connect()
    rows = con.execute(f"select key, label, map16, pooled from read_parquet('{out}/**/*.parquet')").fetchall()
    assert sorted(r[0] for r in rows) == sorted(reference)
    for key, label, m, p in rows:
        assert int(label) == reference[key]["label"]
        check(key, "map16", np.asarray(m).reshape(-1))
        check(key, "pooled", p)
    if fmt == "list":
        import pyarrow.parquet as pq

        f = next(out.rglob("*.parquet"))
        schema = pq.read_schema(f)
        assert all(schema.field(n).type == pa.list_(pa.float32()) for n in shapes)
        assert json.loads(schema.metadata[b"layerbeam.outputs"])[1]["shape"] == shapes["map16"]


def _float16_batch(n: int = 6):
    from layerbeam.transforms.schema import output_schema, to_record_batch

    class Spec:
        name, shape, dtype = "h", (4, 3), "float16"

        def to_json(self):
            return {"name": "h", "shape": [4, 3], "dtype": "float16"}

    bits = np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFD55, 0x0001, 0x83FF, 0x7BFF, 0x3C00, 0xBC01, 0x0400], np.uint16)
    values = np.stack([np.roll(bits, i).view(np.float16).reshape(4, 3) for i in range(n)])
    schema = output_schema([Spec()], {"key": pa.string()})
    return schema, values, to_record_batch(schema, {"key": np.array([f"r{i}" for i in range(n)], dtype=object)}, {"h": values})


@pytest.mark.parametrize("fmt", ENCODINGS + ["tfrecord"])
def test_float16_specials_survive_every_format_bit_exactly(tmp_path, fmt):
    """±0, ±inf, NaN payloads, subnormals and the largest float16 through each writer,
    read back by the project API and by an independent reader."""
    from layerbeam.transforms.formats import make_writer
    from layerbeam.config import OutputConfig
    from layerbeam.transforms.commit import finalize, publish_shard
    from layerbeam.transforms.staging import OutputLayout

    schema, values, batch = _float16_batch()
    cfg = OutputConfig(path=str(tmp_path / "out"), **({"format": "tfrecord"} if fmt == "tfrecord" else {"parquet_encoding": fmt}))
    writer = make_writer(cfg, schema)
    layout = OutputLayout(cfg.path, "run")
    files = writer.write_shard(iter([batch]), layout.shard_dir("s0", "a0"), "part-s0")
    n = sum(f.rows for f in files)
    result = {"shard": "s0", "attempt": "a0", "paths": ["in"], "bytes_in": 0, "read": n, "rows": n, "dead_letters": 0, "dead_reasons": {},
              "files": [{"path": f.path, "final_path": f.path, "rows": f.rows, "bytes": f.bytes} for f in files]}
    base = {"run_id": "run", "config": {"output": {"partition_by": [], "format": cfg.format}}, "storage": writer.storage_spec(), "outputs": []}
    finalize(layout, [publish_shard(layout, result)], base)

    got = to_arrow(cfg.path).column("h").combine_chunks().to_numpy_ndarray()
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), values.view(np.uint16))
    if fmt == "tfrecord":
        import tensorflow as tf

        # raw little-endian bytes: numpy alone decodes them, and so does tf.io.decode_raw
        committed = json.loads((tmp_path / "out" / "_manifest.json").read_text())["files"]  # TFDS shard names
        recs = [r.numpy() for r in tf.data.TFRecordDataset([str(tmp_path / "out" / f["path"]) for f in committed])]
        raw = [tf.train.Example.FromString(r).features.feature["h"].bytes_list.value[0] for r in recs]
        independent = np.stack([np.frombuffer(b, "<f2").reshape(4, 3) for b in raw])
        decoded = np.stack([tf.reshape(tf.io.decode_raw(b, tf.float16, little_endian=True), (4, 3)).numpy() for b in raw])
        np.testing.assert_array_equal(decoded.view(np.uint16), values.view(np.uint16))
    else:
        import pyarrow.parquet as pq

        col = pq.read_table(str(tmp_path / "out" / files[0].path)).column("h").combine_chunks()
        # the shape is in the file itself: field metadata (and nested lists, but for `list`)
        assert json.loads(pq.read_schema(str(tmp_path / "out" / files[0].path)).field("h").metadata[b"layerbeam.shape"]) == [4, 3]
        flat = (col.storage if fmt == "arrow_tensor" else col).flatten()
        while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        flat = flat.to_numpy(zero_copy_only=False)
        assert flat.dtype == (np.float16 if fmt in ("arrow_tensor", "nested_float16") else np.float32)
        independent = flat.astype(np.float16).reshape(values.shape)
    np.testing.assert_array_equal(independent.view(np.uint16), values.view(np.uint16))


def test_show_prints_the_summary_and_first_rows(three_formats, capsys):
    from layerbeam.cli import main

    out, manifest = three_formats["tfrecord"]
    assert main(["show", str(out), "--rows", "2"]) == 0
    text = capsys.readouterr().out
    for expected in ("tfrecord", "GZIP", "keras.applications.MobileNetV2", manifest["model"]["fingerprint"][:12],
                     "map16", "32×32×48", "float16 raw_bytes", "pooled_bf16", "bfloat16", "rows: 10", f"files: {len(manifest['files'])}",
                     "label=0", "first 2 rows", "min", "std"):
        assert expected in text, expected
    first_keys = head(str(out), 2).column("key").to_pylist()
    assert all(k in text for k in first_keys)


def test_show_and_open_refuse_an_incomplete_output(tmp_path, capsys):
    from layerbeam.cli import main
    from layerbeam.transforms.errors import OutputError

    (tmp_path / "half").mkdir()
    with pytest.raises(OutputError, match="no _SUCCESS"):
        open_output(str(tmp_path / "half"))
    assert main(["show", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no _SUCCESS" in err


def test_duckdb_reads_float16_of_nested_float16(tmp_path):
    """`nested_float16` keeps float16 without BYTE_STREAM_SPLIT, which DuckDB 2.0 decodes
    bit-exactly; `arrow_tensor` splits float16 leaves too (the old default), the
    portable default splits its float32 leaves, one `.list.element` per nesting level."""
    import duckdb

    from layerbeam.config import OutputConfig
    from layerbeam.transforms.layers import OutputSpec
    from layerbeam.transforms.formats import make_writer
    from layerbeam.transforms.schema import output_schema, to_record_batch

    values = np.array([[0.0, -0.0, 1.5, 65504.0], [6e-8, -2.0, np.inf, 0.333]], np.float16).reshape(2, 2, 2)
    spec = OutputSpec(name="m16", path="m16", layer_type="Conv2D", reduce="none", dtype="float16", shape=(2, 2))
    schema = output_schema([spec], {"key": pa.string()})
    writer = make_writer(OutputConfig(path=str(tmp_path), parquet_encoding="nested_float16"), schema)
    assert writer.byte_stream_split == []  # the config reaches the writer
    assert make_writer(OutputConfig(path=str(tmp_path), parquet_encoding="arrow_tensor"), schema).byte_stream_split == ["m16.list.element"]
    assert make_writer(OutputConfig(path=str(tmp_path)), schema).byte_stream_split == ["m16.list.element.list.element"]
    batch = to_record_batch(schema, {"key": np.array([b"a", b"b"], dtype=object)}, {"m16": values})
    files = writer.write_shard(iter([batch]), str(tmp_path), "part-x")
    rows = duckdb.connect().execute(f"select key, m16 from read_parquet('{tmp_path}/{files[0].path}') order by key").fetchall()
    got = np.array([r[1] for r in rows], np.float16).reshape(values.shape)
    np.testing.assert_array_equal(got.view(np.uint16), values.view(np.uint16))


def test_bss_reaches_every_nested_leaf(tmp_path):
    """The portable encoding's BYTE_STREAM_SPLIT is on the leaf of a 3-D nested list (the
    path repeats `.list.element` per level; a wrong path is silently ignored)."""
    import pyarrow.parquet as pq

    from layerbeam.config import OutputConfig
    from layerbeam.transforms.formats import make_writer
    from layerbeam.transforms.layers import OutputSpec
    from layerbeam.transforms.schema import output_schema, to_record_batch

    spec = OutputSpec(name="m", path="m", layer_type="Conv2D", reduce="none", dtype="float16", shape=(2, 3, 4))
    schema = output_schema([spec], {"key": pa.string()})
    values = np.arange(48, dtype=np.float16).reshape(2, 2, 3, 4)
    batch = to_record_batch(schema, {"key": np.array([b"a", b"b"], dtype=object)}, {"m": values})
    files = make_writer(OutputConfig(path=str(tmp_path)), schema).write_shard(iter([batch]), str(tmp_path), "p")
    md = pq.read_metadata(str(tmp_path / files[0].path))
    col = next(md.row_group(0).column(i) for i in range(md.num_columns) if md.row_group(0).column(i).path_in_schema.startswith("m."))
    assert col.path_in_schema == "m.list.element.list.element.list.element"
    assert "BYTE_STREAM_SPLIT" in col.encodings and col.physical_type == "FLOAT"


def test_old_outputs_still_read(tmp_path):
    """Outputs written before the portable default: Parquet `fixed_shape_tensor<float16>`
    (the old default, spec_version 1, partition values only in folder names) and TFRecord
    float16 as a serialized TensorProto, read back by their manifest's storage spec."""
    import pyarrow.dataset as ds
    import tensorflow as tf

    values = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    col = {"name": "h", "role": "output", "dtype": "float16", "shape": [3, 4], "logical_dtype": "float16"}
    key = {"name": "key", "role": "column", "dtype": "string", "shape": []}
    label = {"name": "label", "role": "partition", "dtype": "int64", "shape": []}
    # Parquet, as the old writer did: write_dataset drops the partition column from the files
    old = tmp_path / "old_parquet"
    table = pa.table({"key": ["a", "b"], "label": pa.array([3, 3], pa.int64()), "h": pa.FixedShapeTensorArray.from_numpy_ndarray(values)})
    ds.write_dataset(table, str(old), format="parquet", partitioning=ds.partitioning(pa.schema([("label", pa.int64())]), flavor="hive"), basename_template="part-{i}.parquet")
    spec = {"spec_version": 1, "format": "parquet", "compression": None, "partition_by": ["label"], "compat": False,
            "columns": [dict(key, parquet={"type": "string", "in": "file"}), dict(label, parquet={"type": "int64", "in": "path"}), dict(col, parquet={"type": "fixed_shape_tensor<float16>", "in": "file"})]}
    (old / "_manifest.json").write_text(json.dumps({"files": [{"path": "label=3/part-0.parquet", "rows": 2, "bytes": 0}], "storage": spec}))
    (old / "_SUCCESS").write_text("")
    # TFRecord, float16 as tf.io.serialize_tensor
    oldtf = tmp_path / "old_tfrecord"
    oldtf.mkdir()
    with tf.io.TFRecordWriter(str(oldtf / "part-0.tfrecord")) as w:
        for k, v in zip(["a", "b"], values):
            feat = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[k.encode()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
                    "h": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.serialize_tensor(tf.constant(v)).numpy()]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    spec = {"spec_version": 1, "format": "tfrecord", "compression": None, "partition_by": [], "compat": False,
            "columns": [dict(key, tfrecord={"feature": "key", "kind": "bytes_list"}), dict(label, role="column", tfrecord={"feature": "label", "kind": "int64_list"}),
                        dict(col, tfrecord={"feature": "h", "kind": "tensor_proto"})]}
    (oldtf / "_manifest.json").write_text(json.dumps({"files": [{"path": "part-0.tfrecord", "rows": 2, "bytes": 0}], "storage": spec}))
    (oldtf / "_SUCCESS").write_text("")
    for out in (old, oldtf):
        t = to_arrow(str(out))
        assert t.column("key").to_pylist() == ["a", "b"] and t.column("label").to_pylist() == [3, 3]
        np.testing.assert_array_equal(t.column("h").combine_chunks().to_numpy_ndarray().view(np.uint16), values.view(np.uint16))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_size_plan_counts_outputs_as_they_are_stored(three_formats, fmt):
    """The plan's bytes per example (and so the cap and the projection) match the stored
    columns: the compatibility mode widens float16 to float32, bfloat16 is stored as float32."""
    _, manifest = three_formats[fmt]
    width = {"float32": 4, "float16": 2}
    outputs = [c for c in manifest["storage"]["columns"] if c["role"] == "output"]
    assert manifest["bytes_per_example"] == sum(int(np.prod(c["shape"])) * width[c["dtype"]] for c in outputs)


def test_the_size_plan_names_the_readers_an_opt_in_encoding_loses(tmp_path, png_dataset):
    """`--plan-only` says which readers cannot open an opt-in encoding, and nothing for the
    portable default; a float16 output sized as stored (widened by the default)."""
    import contextlib
    import io

    import yaml

    from layerbeam.cli import main
    from tests.conftest import base_config

    folder, _, _ = png_dataset
    select = [{"layer": "block_1_expand_relu", "as": "m16", "reduce": "none", "dtype": "float16"}]
    texts = {}
    for enc in ("portable", "arrow_tensor", "nested_float16"):
        cfg = tmp_path / f"{enc}.yaml"
        cfg.write_text(yaml.safe_dump(base_config(f"{folder}/*.tfrecord", str(tmp_path / enc), **{"layers.select": select, "output.parquet_encoding": enc})))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["run", str(cfg), "--plan-only", "-q"]) == 0
        texts[enc] = " ".join(out.getvalue().split())
    assert "cannot be read by" not in texts["portable"]
    assert "32×32×48" in texts["portable"]
    for reader in ("Spark", "DuckDB", "Hugging Face datasets"):
        assert reader in texts["arrow_tensor"].split("cannot be read by", 1)[1], reader
    lost = texts["nested_float16"].split("cannot be read by", 1)[1]
    assert "Spark" in lost and "DuckDB" not in lost
