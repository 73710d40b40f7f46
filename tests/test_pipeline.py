"""End to end: what the pipeline writes equals Keras's own predict on per-layer sub-models,
reads back identically in pyarrow, polars and DuckDB, and the CLI reports bad input in one
line with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from layerbeam.run import run_job
from layerbeam.config import load_config
from tests.conftest import base_config, encode_png, example, photo_crops, read_manifest, run_cli, write_tfrecords
from layerbeam.transforms.readback import to_arrow


def _read(out) -> pa.Table:
    return to_arrow(str(out))


def _tensor(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return col.to_numpy_ndarray()


def _by_key(table: pa.Table) -> dict[str, int]:
    return {k: i for i, k in enumerate(table.column("key").to_pylist())}


# --------------------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config (MobileNetV2, alpha 1, 224×224, same five outputs) on 6 PNG photos."""
    root = tmp_path_factory.mktemp("demo_eq")
    imgs = photo_crops(6, 224, seed=1)
    keys = [f"img{i}" for i in range(6)]
    recs = [example({"image/encoded": encode_png(im), "image/key": k, "image/class/label": i % 2, "image/class/text": "t"}) for i, (im, k) in enumerate(zip(imgs, keys))]
    write_tfrecords(root / "data", [recs[:3], recs[3:]])
    cfg = load_config("configs/demo.yaml", [f"input.pattern={root}/data/*.tfrecord", f"output.path={root}/out", "batching.batch_size=4"])
    manifest = run_job(cfg)
    return cfg, dict(zip(keys, imgs)), root / "out", manifest


def test_demo_model_outputs_equal_keras_predict_on_per_layer_submodels(demo_run):
    import keras

    cfg, imgs, out, manifest = demo_run
    model = keras.applications.MobileNetV2(weights=None)  # seed 0 below, as the config says
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None)
    from layerbeam.transforms.models import model_fingerprint

    assert manifest["model"]["fingerprint"] == model_fingerprint(model)
    table = _read(out)
    rows = _by_key(table)
    keys = sorted(imgs)
    x = keras.applications.mobilenet_v2.preprocess_input(np.stack([imgs[k] for k in keys]).astype("float32"))
    for spec in cfg.layers.select:
        name = spec.name or spec.layer
        sub = keras.Model(model.inputs, model.get_layer(spec.layer).output)
        ref = sub.predict(x, verbose=0)
        reduce = spec.reduce or cfg.layers.reduce
        if reduce == "mean":
            ref = ref.mean(axis=(1, 2))
        got = _tensor(table, name)[[rows[k] for k in keys]]
        if (spec.dtype or cfg.layers.dtype) == "float16":
            assert got.dtype == np.float16
            np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
        else:
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_demo_manifest_counts_and_files(demo_run):
    cfg, imgs, out, manifest = demo_run
    assert manifest["counts"] == {"records_read": 6, "rows_written": 6, "dead_letters": 0, "dead_letter_reasons": {}}
    assert [o["name"] for o in manifest["outputs"]] == ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_10_map", "out_relu"]
    assert (out / "_SUCCESS").exists()
    assert not Path(f"{out}.layerbeam-staging").exists()
    for f in manifest["files"]:
        assert (out / f["path"]).stat().st_size == f["bytes"]
    assert sum(f["rows"] for f in manifest["files"]) == 6
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["label=0", "label=1"]


def test_parquet_reads_back_the_same_in_pyarrow_polars_and_duckdb(demo_run):
    import duckdb
    import polars as pl

    _, imgs, out, manifest = demo_run
    table = _read(out)
    ref = {k: _tensor(table, "block_10_map")[i] for k, i in _by_key(table).items()}
    ref_pool = {k: _tensor(table, "out_relu")[i] for k, i in _by_key(table).items()}
    shapes = {o["name"]: o["shape"] for o in manifest["outputs"]}

    # polars: fixed-size lists come back as Array columns
    df = pl.read_parquet(f"{out}/**/part-*.parquet", hive_partitioning=True)
    assert sorted(df["key"].to_list()) == sorted(imgs)
    for k, v in zip(df["key"].to_list(), df["out_relu"].to_numpy()):
        np.testing.assert_array_equal(np.asarray(v, np.float32).reshape(shapes["out_relu"]), ref_pool[k])

    # polars reads the float16 map (BYTE_STREAM_SPLIT) bit-exactly; the shape comes from the
    # Parquet key-value metadata, as for any reader that does not know the tensor type
    import pyarrow.parquet as pq

    first = next(out.glob("label=*/*.parquet"))
    meta = json.loads(pq.read_schema(first).metadata[b"layerbeam.outputs"])
    shape = next(o["shape"] for o in meta if o["name"] == "block_10_map")
    for k, v in zip(df["key"].to_list(), df["block_10_map"].to_list()):
        np.testing.assert_array_equal(np.asarray(v, np.float16).reshape(shape).view(np.uint16), ref[k].view(np.uint16))

    # DuckDB: plain lists (float32 columns; it cannot decode BYTE_STREAM_SPLIT float16)
    con = duckdb.connect()
    rows = con.execute(f"select key, out_relu, label from read_parquet('{out}/**/part-*.parquet', hive_partitioning=true)").fetchall()
    assert sorted(r[0] for r in rows) == sorted(imgs)
    for key, values, _ in rows:
        np.testing.assert_array_equal(np.asarray(values, np.float32).reshape(shapes["out_relu"]), ref_pool[key])


# --------------------------------------------------------------------------- a Sequential model from a .keras file


def test_sequential_keras_file_equals_predict_on_prefix_models(tmp_path, png_dataset):
    import keras

    folder, imgs, labels = png_dataset
    keras.utils.set_random_seed(3)
    seq = keras.Sequential(
        [
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Conv2D(6, 3, name="c2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(5, name="head"),
        ]
    )
    seq.build((None, 64, 64, 3))
    path = tmp_path / "seq.keras"
    seq.save(path)
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"))
    raw["model"] = {"source": str(path)}
    raw["input"]["preprocess"] = "scale"
    raw["layers"] = {"select": ["all", {"layer": "c2", "reduce": "none", "dtype": "float16"}], "reduce": "max"}
    manifest = run_job(load_config(raw=raw))
    assert [o["name"] for o in manifest["outputs"]] == ["c1", "bn", "pool", "drop", "c2", "gap", "head"]
    table = _read(tmp_path / "out")
    keys = sorted(imgs)
    order = [_by_key(table)[k] for k in keys]
    x = np.stack([imgs[k] for k in keys]).astype("float32") / 255.0
    for i, layer in enumerate(seq.layers):
        ref = keras.Sequential(seq.layers[: i + 1]).predict(x, verbose=0)
        got = _tensor(table, layer.name)[order]
        if layer.name == "c2":
            np.testing.assert_allclose(got.astype("float32"), ref.astype("float16").astype("float32"), rtol=2e-3, atol=2e-3)
            continue
        if ref.ndim == 4:
            ref = ref.max(axis=(1, 2))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_run_end_to_end(tmp_path, png_dataset):
    import yaml

    folder, imgs, labels = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"output.partition_by": ["label"]})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    r = run_cli(["run", str(cfg), "--set", "batching.batch_size=3", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(tmp_path / "out")
    assert m["counts"]["records_read"] == len(imgs) == m["counts"]["rows_written"]
    assert m["config"]["batching"]["batch_size"] == 3
    assert len(m["inputs"]) == 3 and sum(i["records"] for i in m["inputs"]) == 10
    assert "10 rows" in r.stdout
    labels_seen = _read(tmp_path / "out").column("label").to_pylist()
    assert sorted(labels_seen) == sorted(labels.values())

    # the same command again over the same input: up to date, nothing replaced (tests/test_versions.py has the rest)
    again = run_cli(["run", str(cfg), "-q"])
    assert again.returncode == 0 and again.stdout.strip() == "up to date at version 1", again.stdout + again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"output.pathh": "x"}, "unknown key 'output.pathh'; did you mean 'path'?"),
        ({"layers.select": ["block_1_expand_rlu"]}, "layer selector 'block_1_expand_rlu' matches no tensor"),
        ({"layers.select": ["block_*_nothing"]}, "layer selector 'block_*_nothing' matches no tensor"),
        ({"input.pattern": "/nonexistent/folder/*.tfrecord"}, "matches no file"),
    ],
)
def test_cli_bad_config_is_one_line_exit_2(tmp_path, png_dataset, change, expected):
    import yaml

    folder, _, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **change)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    from layerbeam.cli import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(cfg), "-q"])
    msg = err.getvalue().strip()
    assert code == 2
    assert expected in msg, msg
    assert msg.count("\n") == 0 and "Traceback" not in msg
    if "rlu" in expected:
        assert "block_1_expand_relu" in msg and "layerbeam layers" in msg
    assert not (tmp_path / "out").exists()


def test_cli_bad_config_in_a_subprocess_has_no_traceback(tmp_path):
    r = run_cli(["run", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2
    assert r.stderr.strip().startswith("layerbeam: error: config file") and "Traceback" not in r.stderr
    assert "tensorflow" not in r.stderr.lower()  # a config error does not even load TensorFlow


def test_size_plan_counts_examples_exactly_when_the_shards_are_small(png_dataset, tmp_path):
    from layerbeam.transforms.readers import estimate_examples
    from layerbeam.transforms.readers import match_shards

    folder, imgs, _ = png_dataset
    cfg = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out")))
    shards = match_shards(cfg.input.pattern, "tfrecord")
    assert estimate_examples(cfg.input, shards) == len(imgs) == 10  # 4 + 3 + 3, all read
    # a budget that covers only the first shard: the rest is scaled by file size
    est = estimate_examples(cfg.input, shards, budget=4)
    assert 8 <= est <= 12
    capped = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"input.max_examples_per_shard": 2}))
    assert estimate_examples(capped.input, shards) == 6


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"input.preprocess": "tff"}, "input.preprocess 'tff' is unknown"),
        ({"input.preprocess": "no_such_module:fn"}, "input.preprocess 'no_such_module:fn': cannot import it"),
        ({"input.pattern": "s3://bucket/data/*.tfrecord"}, "needs a file system package for s3:// that is not installed"),
        ({"output.path": "s3://bucket/out"}, "pip install 'layerbeam[s3]'"),
    ],
)
def test_preflight_catches_what_would_otherwise_fail_on_a_worker(tmp_path, png_dataset, change, expected):
    from layerbeam.plan import prepare
    from layerbeam.config import ConfigError

    folder, _, _ = png_dataset
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401

        if "s3://" in str(change):
            pytest.skip("s3fs is installed here")
    except ImportError:
        pass
    cfg = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **change))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


def test_commit_refuses_when_the_input_changed_since_the_launcher_listed_it(tmp_path, png_dataset):
    from layerbeam.plan import manifest_base, prepare
    from layerbeam.transforms.commit import commit_run, inputs_digest
    from layerbeam.transforms.readers import match_shards
    from layerbeam.transforms.errors import CommitError

    folder, _, _ = png_dataset
    cfg = load_config(raw=base_config(f"{folder}/*.tfrecord", str(tmp_path / "out")))
    plan = prepare(cfg)
    shards = match_shards(cfg.input.pattern, "tfrecord")
    assert inputs_digest(shards) == inputs_digest(plan.inputs)  # the launcher's and the workers' listings agree
    with pytest.raises(CommitError, match="changed while the job ran"):
        commit_run([], shards[:-1], manifest_base(plan), plan.run_id, inputs_digest(plan.inputs))
    assert not (tmp_path / "out").exists()


def test_plan_only_writes_nothing_and_beam_flags_may_take_values_after_a_space(tmp_path, png_dataset, capsys):
    import yaml

    from layerbeam.cli import main

    folder, _, _ = png_dataset
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(base_config(f"{folder}/*.tfrecord", f"file://{tmp_path}/out")))
    assert main(["run", str(cfg), "--plan-only", "--runner", "DirectRunner", "-q"]) == 0
    assert "size plan" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # no output, no staging folder
    assert main(["run", str(cfg), "stray", "-q"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err


def test_a_file_url_output_commits_like_a_local_path(tmp_path, png_dataset):
    folder, imgs, _ = png_dataset
    manifest = run_job(load_config(raw=base_config(f"{folder}/*.tfrecord", f"file://{tmp_path}/out")))
    assert manifest["counts"]["rows_written"] == len(imgs)
    assert (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out.layerbeam-staging").exists()


def test_a_word_after_an_on_off_beam_flag_is_refused(tmp_path, png_dataset, capsys):
    import yaml

    from layerbeam.cli import main

    folder, _, _ = png_dataset
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"))))
    assert main(["run", str(cfg), "--save_main_session", "second.yaml", "-q"]) == 2
    assert "unexpected argument 'second.yaml'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_writable_probe_on_a_store_without_folders_leaves_nothing_and_passes():
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from layerbeam.plan import _check_writable
    from layerbeam.transforms.staging import OutputLayout

    class Folderless(MemoryFileSystem):
        protocol = ("folderless",)
        root_marker = "/"

        def makedirs(self, path, exist_ok=False):
            pass

        def mkdir(self, path, create_parents=True, **kwargs):
            pass

    fsspec.register_implementation("folderless", Folderless, clobber=True)
    layout = OutputLayout("folderless://bucket/out", "r1")
    _check_writable(layout)  # used to fail: it deleted the staging "folder" recursively
    assert layout.fs.find("/bucket") == []


def test_commit_refuses_a_file_rewritten_under_the_same_name(tmp_path, png_dataset):
    import shutil

    from layerbeam.plan import manifest_base, prepare
    from layerbeam.transforms.commit import commit_run, inputs_digest
    from layerbeam.transforms.readers import match_shards
    from layerbeam.transforms.errors import CommitError

    folder, _, _ = png_dataset
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    cfg = load_config(raw=base_config(f"{data}/*.tfrecord", str(tmp_path / "out")))
    plan = prepare(cfg)
    first = sorted(data.glob("*.tfrecord"))[0]
    first.write_bytes(first.read_bytes() + b"\0" * 16)  # same name, other content
    shards = match_shards(cfg.input.pattern, "tfrecord")
    with pytest.raises(CommitError, match="changed while the job ran"):
        commit_run([], shards, manifest_base(plan), plan.run_id, inputs_digest(plan.inputs))
