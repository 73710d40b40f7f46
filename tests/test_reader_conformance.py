"""Reader conformance (issue 14): the output of the real CLI, opened by the real clients
users have — pyarrow, pandas, polars, DuckDB, Spark, Hugging Face `datasets`, Ray Data,
chdb — each with its most natural one line on the output folder.

Each client must give back the row count, the keys, the `label` partition column and one
tensor column that, reshaped to the manifest's shape, is bit-exact to what
`transforms.readback.to_arrow` returns. A client that is not installed is skipped (install
the `readers` extra); Spark also needs Java 17+.

Cells known to fail on today's encodings are strict xfails carrying the client's own
error: when a writer change makes one pass, the XPASS fails the run, so this table is
updated with the fix (issue 14 wants every default cell to read).

Run: `python -m pytest -m readers tests/test_reader_conformance.py` (about a minute: two
CLI runs, a Spark and a Ray start).
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

VARIANTS = {"default": {}, "compat": {"output.parquet_compat": True}}
TENSOR = "map16"  # conv1 unreduced, float16: the column that breaks readers today

# (variant, client) → the error each client gives today; strict xfails.
KNOWN = {
    ("default", "polars"): "directory contained paths with different file extensions",  # _manifest.json in the root
    ("compat", "polars"): "directory contained paths with different file extensions",
    ("default", "duckdb"): "BYTE_STREAM_SPLIT encoding is only supported for FLOAT, DOUBLE",  # float16 + BSS
    ("default", "spark"): "PARQUET_TYPE_ILLEGAL",  # any float16 column
    ("default", "hf_datasets"): "does not have a datasets dtype equivalent",  # fixed_shape_tensor
    ("compat", "hf_datasets"): "Parquet file size is 0 bytes",  # data_dir= trips on _SUCCESS; past that, label (folder names only) is lost
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The tiny .keras model over 10 photo crops in 2 TFRecord shards, run by the real CLI
    once per variant, partitioned by label. Returns {variant: output path}."""
    import yaml

    root = tmp_path_factory.mktemp("conformance")
    model = save_tiny_model(root / "tiny.keras")
    imgs = photo_crops(10, SIZE, seed=3)
    recs = [example({"image/encoded": encode_png(im), "image/key": f"k{i:03d}", "image/class/label": i % 3}) for i, im in enumerate(imgs)]
    write_tfrecords(root / "in", [recs[:5], recs[5:]])
    select = [{"layer": "conv1", "as": "pooled"}, {"layer": "conv1", "as": TENSOR, "reduce": "none", "dtype": "float16"}]
    out = {}
    for name, extra in VARIANTS.items():
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
    from transforms.readback import to_arrow

    t = to_arrow(str(out))
    keys = np.array(t["key"].to_pylist())
    order = np.argsort(keys)
    tensor, dims, _ = rc.arrow_to_numpy(t[TENSOR])
    return keys[order], np.array(t["label"].to_pylist())[order], tensor[order], dims


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("client", list(rc.CLIENTS))
def test_client_reads_output(outputs, variant, client, request):
    if not rc.available(client):
        pytest.skip(f"{client} is not installed (pip install '.[readers]')")
    if client == "spark" and shutil.which("java") is None:
        pytest.skip("Spark needs a Java 17+ runtime (apt-get install -y openjdk-17-jre-headless)")
    known = KNOWN.get((variant, client))
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"today: {known}"))
    out = outputs[variant]
    manifest = read_manifest(out)
    keys, labels, ref, dims = _reference(out)
    shape = next(c["shape"] for c in manifest["storage"]["columns"] if c["name"] == TENSOR)
    assert list(dims) == list(shape)

    read = rc.CLIENTS[client][1](str(out), TENSOR, True)

    assert read.rows == len(keys)
    order = np.argsort(np.array(read.keys))
    assert list(np.array(read.keys)[order]) == list(keys)
    assert read.labels is not None, f"{client} did not return the label partition column"
    assert list(np.array(read.labels)[order]) == list(labels)
    got = read.tensor[order].reshape(len(keys), *shape).astype(np.float32)
    want = ref.astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{client}: {TENSOR} differs from to_arrow"
