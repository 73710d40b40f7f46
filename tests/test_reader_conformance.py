"""Reader conformance (issue 14): the output of the real CLI, opened by the real clients
users have (pyarrow, pandas, polars, DuckDB, Spark, Hugging Face `datasets`, Ray Data,
chdb; TensorFlow Datasets and plain numpy for TFRecord), each through the README's
one-liner for it, which this test executes (and checks the README holds verbatim).

Each client must give back the row count, the keys, the `label` partition column and the
float16 tensor column `map16` that, reshaped to the manifest's shape, is bit-exact to what
`layerbeam.read` returns (float16 widened to float32 is exact, so float32 bits compare).
On the default encoding the snippet's array must already have the tensor's shape.

The opt-in encodings lose readers on purpose (the size plan says so): those cells are
strict xfails carrying the client's own error, so a client that starts reading them fails
the run until the table (`KNOWN`, `schema.unreadable_by`, README) is updated.

A client that is not installed is skipped (install the `readers` extra); Spark also needs
Java 17+. Run: `make test-readers` (about three minutes on 2 busy cores, with tests/test_tfds.py's loader test).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import reader_clients as rc
from tests.conftest import encode_png, example, photo_crops, read_manifest, run_cli, write_tfrecords
from tests.tiny import SIZE, save_tiny_model, tiny_config

pytestmark = pytest.mark.readers

README = Path(__file__).resolve().parents[1] / "README.md"
TENSOR = "map16"  # conv1 unreduced, float16: the column that broke readers
VARIANTS = {
    "portable": {},
    "arrow_tensor": {"output.parquet_encoding": "arrow_tensor"},
    "nested_float16": {"output.parquet_encoding": "nested_float16"},
    "list": {"output.parquet_encoding": "list"},
}

# (variant, client) → the error each client gives; strict xfails (see schema.unreadable_by).
KNOWN = {
    ("arrow_tensor", "spark"): "PARQUET_TYPE_ILLEGAL",  # Parquet FLOAT16
    ("arrow_tensor", "duckdb"): "BYTE_STREAM_SPLIT encoding is only supported for FLOAT, DOUBLE",
    ("arrow_tensor", "hf_datasets"): "does not have a datasets dtype equivalent",  # fixed_shape_tensor
    ("nested_float16", "spark"): "PARQUET_TYPE_ILLEGAL",
}

TFDS_SNIPPET = ("import tensorflow_datasets as tfds", 'ds = tfds.builder_from_directory(out).as_dataset(split="all")', 'x = np.stack([e["map16"] for e in tfds.as_numpy(ds)])')
NUMPY_SNIPPET = (
    "import numpy as np, tensorflow as tf",
    'recs = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(tf.io.gfile.glob(f"{out}/**/part-*.tfrecord*"))]',
    'x = np.stack([np.frombuffer(e.features.feature["map16"].bytes_list.value[0], "<f2").reshape(30, 30, 4) for e in recs])',
)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The tiny .keras model over 10 photo crops in 2 TFRecord shards, run by the real CLI
    once per Parquet encoding and once as TFRecord, partitioned by label.
    Returns {variant: output path}."""
    import yaml

    root = tmp_path_factory.mktemp("conformance")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(10, SIZE, seed=3)
    recs = [example({"image/encoded": encode_png(im), "image/key": f"k{i:03d}", "image/class/label": i % 3}) for i, im in enumerate(imgs)]
    write_tfrecords(root / "in", [recs[:5], recs[5:]])
    select = [{"layer": "conv1", "as": "pooled"}, {"layer": "conv1", "as": TENSOR, "reduce": "none", "dtype": "float16"}]
    out = {}
    for name, extra in {**VARIANTS, "tfrecord": {"output.format": "tfrecord"}}.items():
        cfg = tiny_config(f"{root}/in/*.tfrecord", str(root / name), model, **{"layers.select": select, "output.partition_by": ["label"], **extra})
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = run_cli(["run", str(path), "-q"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = root / name
    yield out
    rc.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def _reference(out: Path):
    """What `layerbeam.read` returns, sorted by key: keys, labels, tensor (float32), shape."""
    import layerbeam

    t = layerbeam.read(str(out))
    keys = np.array(t["key"].to_pylist())
    order = np.argsort(keys)
    tensor = t[TENSOR].combine_chunks().to_numpy_ndarray()
    shape = next(c["shape"] for c in read_manifest(out)["storage"]["columns"] if c["name"] == TENSOR)
    assert list(tensor.shape[1:]) == shape
    return keys[order], np.array(t["label"].to_pylist())[order], tensor[order].astype(np.float32), shape


def _check(keys, labels, values, out: Path, who: str):
    want_keys, want_labels, ref, shape = _reference(out)
    assert len(keys) == len(want_keys), f"{who}: {len(keys)} rows"
    order = np.argsort(np.array(keys))
    assert list(np.array(keys)[order]) == list(want_keys)
    assert labels is not None, f"{who} did not return the label partition column"
    assert [int(v) for v in np.array(labels)[order]] == [int(v) for v in want_labels]
    got = np.asarray(values, np.float32).reshape(len(keys), *shape)[order]
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), f"{who}: {TENSOR} differs from layerbeam.read"


def test_readme_shows_every_snippet_this_test_runs():
    text = README.read_text()
    for client, lines in {**rc.SNIPPETS, "tfds": TFDS_SNIPPET, "numpy": NUMPY_SNIPPET}.items():
        for line in lines:
            assert line in text, f"README lacks the {client} line {line!r}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("client", list(rc.SNIPPETS))
def test_client_reads_parquet_output(outputs, variant, client, request):
    if not rc.available(client):
        pytest.skip(f"{client} is not installed (pip install '.[readers]')")
    if client == "spark" and shutil.which("java") is None:
        pytest.skip("Spark needs a Java 17+ runtime (apt-get install -y openjdk-17-jre-headless)")
    known = KNOWN.get((variant, client))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, raises=Exception, reason=f"{variant} is unreadable by {client}: {known}"))
    out = outputs[variant]
    try:
        read = rc.read(client, str(out), TENSOR)
        if known:
            _check(read.keys, read.labels, rc.native_values(read.native), out, client)  # a whole read, not only the schema
    except Exception as e:
        if known:
            assert known in str(e), f"{client} on {variant} failed otherwise than known: {rc.first_line(e)}"
        raise
    if variant == "portable":
        # the README line gives the tensor back with its shape, from the file alone
        assert read.x is not None, f"{client}: the README's tensor line failed: {read.x_error}"
        _, _, _, shape = _reference(out)
        assert read.x.shape == (read.rows, *shape), f"{client}: {read.x.shape}"
        values = read.x
    else:
        values = read.x if read.x is not None and read.x.dtype != object and read.x.size else rc.native_values(read.native)
    _check(read.keys, read.labels, values, out, client)


def test_tfds_loads_the_tfrecord_output(outputs):
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install '.[readers]')")
    out = outputs["tfrecord"]
    ns = {"np": np, "out": str(out)}
    for line in TFDS_SNIPPET:
        exec(line, ns)  # noqa: S102 — the README's code
    import tensorflow_datasets as tfds

    rows = list(tfds.as_numpy(ns["ds"]))
    assert ns["x"].dtype == np.float16 and ns["x"].shape[1:] == (30, 30, 4)
    _check([r["key"].decode() for r in rows], [r["label"] for r in rows], ns["x"], out, "tfds")


def test_numpy_decodes_the_tfrecord_output_without_layerbeam(outputs):
    out = outputs["tfrecord"]
    ns = {"np": np, "out": str(out)}
    for line in NUMPY_SNIPPET:
        exec(line, ns)  # noqa: S102 — the README's code
    recs = ns["recs"]
    keys = [e.features.feature["key"].bytes_list.value[0].decode() for e in recs]
    labels = [e.features.feature["label"].int64_list.value[0] for e in recs]
    _check(keys, labels, ns["x"], out, "numpy")
