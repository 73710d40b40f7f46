"""The Python API (`layerbeam.extract`, `list_layers`, `run`, `read`) and the Beam API
(`ExtractLayers`, `WriteLayers`), against Keras `predict` on per-layer sub-models; the
namespace rules (a light `import layerbeam`, the library never imports the app, users'
own `pipeline.py`/`transforms.py`); the wheel; the README's API examples."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, run_cli
from tests.seed_models import seed_example_1, seed_example_3
from tests.tiny import SIZE, save_tiny_model, tiny_config

ATOL = 1e-5


# --------------------------------------------------------------------------- models


def sub_model_outputs(model, layers, x) -> list[np.ndarray]:
    """The independent reference: Keras `predict` of a sub-model ending at `layers`."""
    import keras

    return keras.Model(model.inputs, [layer.output for layer in layers]).predict(x, verbose=0)


def tensor(table, name) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy_ndarray()


def assert_tables_close(got, want) -> None:
    """Same columns and keys; tensors equal up to float rounding (batch sizes differ)."""
    assert got.schema.equals(want.schema), (got.schema, want.schema)
    assert got.column("key").to_pylist() == want.column("key").to_pylist()
    for f in want.schema:
        if f.name != "key":
            np.testing.assert_allclose(tensor(got, f.name), tensor(want, f.name), atol=ATOL)


def input_names(model) -> list[str]:
    import layerbeam

    return [r["path"] for r in layerbeam.list_layers(model) if r["is_input"]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("api-model") / "tiny.keras")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((9, SIZE, SIZE, 3)).astype(np.float32) * 255


# --------------------------------------------------------------------------- namespace


def test_import_layerbeam_loads_neither_tensorflow_nor_beam():
    code = (
        "import sys, layerbeam\n"
        "names = [n for n in layerbeam.__all__]\n"
        "print([m for m in ('tensorflow', 'keras', 'apache_beam') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_run_and_extract_stay_functions_after_their_modules_are_imported():
    """`layerbeam.run`/`extract` are functions and the names of their modules; importing
    the module first (as the CLI and the tests do) must not hide the function."""
    code = (
        "from layerbeam.run import run_job\n"
        "from layerbeam.extract import _keys\n"
        "import layerbeam\n"
        "layerbeam.list_layers\n"
        "print(layerbeam.run.__module__, layerbeam.extract.__module__, layerbeam.list_layers.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["layerbeam.run", "layerbeam.extract", "layerbeam.extract"], out.stderr


def _imports(path: Path, package: str) -> list[str]:
    """Absolute module names `path` imports; relative imports resolved against `package`."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def test_the_library_never_imports_the_app():
    """No module under transforms/ imports `pipeline`, `layerbeam` (the app) or, through
    `..`, anything outside `layerbeam.transforms`."""
    root = ROOT / "transforms"
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        package = ".".join(["layerbeam", "transforms", *rel.parts[:-1]])
        for name in _imports(path, package):
            top = name.split(".")[0]
            if top in ("pipeline", "transforms") or (top == "layerbeam" and not (name + ".").startswith("layerbeam.transforms.")):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_the_import_check_sees_relative_imports_that_leave_the_library(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("from .. import config\nfrom ..run import run_job\nfrom .schema import x\n")
    assert _imports(mod, "layerbeam.transforms") == ["layerbeam", "layerbeam.run", "layerbeam.transforms.schema"]


@pytest.mark.slow
def test_a_users_pipeline_py_and_transforms_py_do_not_shadow_layerbeam(png_dataset, tiny_model, tmp_path):
    """A user's folder with its own pipeline.py and transforms.py runs a job in
    multi_processing mode (the worker is a fresh process started in that folder, where
    `import pipeline` would find the user's module)."""
    folder, _, _ = png_dataset
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pipeline", "transforms"):
        (project / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    out = tmp_path / "out"
    (project / "job.yaml").write_text(yaml.safe_dump(tiny_config(f"{folder}/*.tfrecord", str(out), tiny_model)))
    (project / "script.py").write_text(
        "import layerbeam\n"
        "m = layerbeam.run('job.yaml', beam_args=['--direct_running_mode=multi_processing', '--direct_num_workers=1'])\n"
        "print('rows', m['counts']['rows_written'])\n"
    )
    proc = subprocess.run([sys.executable, "script.py"], cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows 10" in proc.stdout
    assert len(layerbeam_read(out)) == 10


def layerbeam_read(path):
    import layerbeam

    return layerbeam.read(str(path))


# --------------------------------------------------------------------------- Python API


def test_extract_seed_example_1_equals_keras():
    import layerbeam

    model, conv1, pool2 = seed_example_1()
    x = np.random.default_rng(1).random((5, 28, 28, 1)).astype(np.float32)
    table = layerbeam.extract(model, x, select=[conv1.name, {"layer": pool2.name, "as": "pool2"}], reduce="none", batch_size=2)
    want = sub_model_outputs(model, [conv1, pool2], x)
    assert table.column_names == ["key", conv1.name, "pool2"]
    assert table.column("key").to_pylist() == [str(i) for i in range(5)]
    np.testing.assert_allclose(tensor(table, conv1.name), want[0], atol=ATOL)
    np.testing.assert_allclose(tensor(table, "pool2"), want[1], atol=ATOL)
    pooled = layerbeam.extract(model, x, select=[conv1.name], keys=list("abcde"))
    assert pooled.column("key").to_pylist() == list("abcde")
    np.testing.assert_allclose(tensor(pooled, conv1.name), want[0].mean(axis=(1, 2)), atol=ATOL)


def test_extract_seed_example_3_two_inputs_equals_keras_from_arrays_and_datasets():
    import tensorflow as tf

    import layerbeam

    model, branch_a, branch_b = seed_example_3()
    a_name, b_name = input_names(model)
    rng = np.random.default_rng(3)
    xa, xb = rng.random((6, 28, 28, 1)).astype(np.float32), rng.random((6, 28, 28, 1)).astype(np.float32)
    select = [{"layer": branch_a.name, "as": "a"}, {"layer": branch_b.name, "as": "b"}]
    table = layerbeam.extract(model, {a_name: xa, b_name: xb}, select=select, reduce="none", batch_size=4)
    want = sub_model_outputs(model, [branch_a, branch_b], [xa, xb])
    np.testing.assert_allclose(tensor(table, "a"), want[0], atol=ATOL)
    np.testing.assert_allclose(tensor(table, "b"), want[1], atol=ATOL)
    examples = tf.data.Dataset.from_tensor_slices({a_name: xa, b_name: xb})  # one example at a time
    assert_tables_close(layerbeam.extract(model, examples, select=select, reduce="none", batch_size=4), table)
    labelled = tf.data.Dataset.from_tensor_slices(({a_name: xa, b_name: xb}, np.arange(6))).batch(5)  # (x, y), batched
    assert_tables_close(layerbeam.extract(model, labelled, select=select, reduce="none"), table)


def test_extract_refuses_inputs_that_do_not_fit_in_one_line(tiny_model):
    import layerbeam
    from layerbeam import ConfigError

    with pytest.raises(ConfigError, match=r"input 'image' has batches of shape \(2, 8, 8, 3\), but the model takes \(N, 32, 32, 3\)"):
        layerbeam.extract(str(tiny_model), np.zeros((2, 8, 8, 3)), select="conv1")
    with pytest.raises(ConfigError, match="key '1' is given twice"):
        layerbeam.extract(str(tiny_model), np.zeros((2, SIZE, SIZE, 3)), select="conv1", keys=["1", "1"])


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_extract_to_an_output_reads_back_as_the_same_table(tiny_model, images, tmp_path, fmt):
    import layerbeam

    select = ["conv1", {"layer": "conv2", "as": "conv2_f16", "reduce": "none", "dtype": "float16"}]
    labels = np.arange(len(images)) % 2
    keys = [f"img{i}" for i in range(len(images))]
    table = layerbeam.extract(str(tiny_model), images, select=select, keys=keys, columns={"label": labels})
    out = tmp_path / fmt
    manifest = layerbeam.extract(str(tiny_model), images, select=select, keys=keys, columns={"label": labels}, output=str(out), format=fmt)
    assert manifest["counts"] == {"records_read": 9, "rows_written": 9, "dead_letters": 0, "dead_letter_reasons": {}}
    assert (out / "_SUCCESS").exists() and not (tmp_path / f"{fmt}.layerbeam-staging").exists()
    back = layerbeam.read(str(out))
    assert back.equals(table), (back.schema, table.schema)
    with pytest.raises(layerbeam.ConfigError, match="already holds a complete output"):
        layerbeam.extract(str(tiny_model), images, select=select, output=str(out), format=fmt)


def test_extract_partitions_an_output_by_a_column(tiny_model, images, tmp_path):
    import layerbeam

    labels = np.array(["cat", "dog", "cat", "cat", "dog", "dog", "cat", "dog", "cat"])
    layerbeam.extract(str(tiny_model), images, select="conv1", columns={"label": labels}, output=str(tmp_path / "out"), partition_by=["label"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["label=cat", "label=dog"]
    back = layerbeam.read(str(tmp_path / "out")).sort_by("key")
    table = layerbeam.extract(str(tiny_model), images, select="conv1", columns={"label": labels}).sort_by("key")
    assert back.equals(table)


def test_list_layers_equals_the_cli_json(tiny_model):
    import layerbeam

    proc = run_cli(["layers", str(tiny_model), "--json", "--reduce", "mean"])
    assert proc.returncode == 0, proc.stderr
    assert layerbeam.list_layers(str(tiny_model), reduce="mean") == json.loads(proc.stdout)["tensors"]
    import keras

    in_memory = keras.saving.load_model(tiny_model)
    assert layerbeam.list_layers(in_memory, reduce="mean") == json.loads(proc.stdout)["tensors"]


def test_run_takes_a_dict_and_overrides(png_dataset, tiny_model, tmp_path):
    import layerbeam

    folder, _, _ = png_dataset
    raw = tiny_config(f"{folder}/*.tfrecord", str(tmp_path / "unused"), tiny_model)
    manifest = layerbeam.run(raw, overrides=[f"output.path={tmp_path / 'out'}"])
    assert manifest["counts"]["rows_written"] == 10
    assert len(layerbeam.read(str(tmp_path / "out"))) == 10


# --------------------------------------------------------------------------- Beam API


class _CloseTo:
    """A matcher (module level, so it pickles): (key, {name: array}) elements equal `want`."""

    def __init__(self, want: dict):
        self.want = want

    def __call__(self, actual):
        got = dict(actual)
        assert sorted(got) == sorted(self.want), (sorted(got), sorted(self.want))
        for key, outputs in self.want.items():
            assert sorted(got[key]) == sorted(outputs), (key, sorted(got[key]))
            for name, value in outputs.items():
                np.testing.assert_allclose(got[key][name], value, atol=ATOL, err_msg=f"{key}/{name}")


class _DeadLetters:
    def __init__(self, want: dict):
        self.want = want  # key → (reason, text in detail)

    def __call__(self, actual):
        got = dict(actual)
        assert sorted(got, key=str) == sorted(self.want, key=str), got
        for key, (reason, text) in self.want.items():
            assert got[key]["reason"] == reason and text in got[key]["detail"], got[key]


def test_extract_layers_equals_keras_and_routes_bad_elements_to_dead_letters(tiny_model, images):
    import apache_beam as beam
    import keras
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    model = keras.saving.load_model(tiny_model)
    conv1, conv2 = model.get_layer("conv1"), model.get_layer("conv2")
    good = [(f"k{i}", images[i].astype(np.uint8) if i % 2 else images[i]) for i in range(len(images))]  # any numeric dtype
    ref = sub_model_outputs(model, [conv1, conv2], np.stack([v.astype(np.float32) for _, v in good]))
    want = {k: {"conv1": ref[0][i], "pooled": ref[1][i].max(axis=(0, 1))} for i, (k, _) in enumerate(good)}
    bad = [
        ("small", np.zeros((8, 8, 3))),
        ("words", np.array([["a"]])),
        ("pair", {"nope": np.zeros((SIZE, SIZE, 3))}),
    ]
    select = ["conv1", {"layer": "conv2", "as": "pooled", "reduce": "max"}]
    with TestPipeline() as p:
        outputs, dead = (
            p
            | beam.Create(good[:5] + bad + good[5:])
            | layerbeam.ExtractLayers(str(tiny_model), select=select, reduce="none", batch_size=3).with_exception_handling()
        )
        assert_that(outputs, _CloseTo(want), label="Outputs")
        assert_that(dead, _DeadLetters({
            "small": ("bad_input", "has shape (8, 8, 3), but the model takes (32, 32, 3)"),
            "words": ("bad_input", "not numbers"),
            "pair": ("bad_input", "the model's inputs are ['image']"),
        }), label="DeadLetters")


def test_extract_layers_on_an_in_memory_two_input_model_and_its_one_line_failure():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    model, branch_a, branch_b = seed_example_3()
    a_name, b_name = input_names(model)
    rng = np.random.default_rng(5)
    xa, xb = rng.random((4, 28, 28, 1)).astype(np.float32), rng.random((4, 28, 28, 1)).astype(np.float32)
    ref = sub_model_outputs(model, [branch_a, branch_b], [xa, xb])
    want = {i: {"a": ref[0][i].mean(axis=(0, 1)), "b": ref[1][i].mean(axis=(0, 1))} for i in range(4)}
    transform = layerbeam.ExtractLayers(model, select=[{"layer": branch_a.name, "as": "a"}, {"layer": branch_b.name, "as": "b"}])
    assert [s.name for s in transform.outputs] == ["a", "b"] and transform.input_shapes == {a_name: (28, 28, 1), b_name: (28, 28, 1)}
    p = TestPipeline()
    got = p | beam.Create([(i, {a_name: xa[i], b_name: xb[i]}) for i in range(4)]) | transform
    assert_that(got, _CloseTo(want))
    result = p.run()
    result.wait_until_finish()
    # RunInference's own metrics, under layerbeam's namespace
    from apache_beam.metrics.metric import MetricsFilter

    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter().with_namespace("layerbeam"))["counters"]}
    assert counters.get("num_inferences") == 4, counters
    with pytest.raises(Exception, match=r"element 7: input .* has shape \(3,\), but the model takes \(28, 28, 1\).*with_exception_handling"):
        with TestPipeline() as p:
            _ = p | beam.Create([(7, {a_name: np.zeros(3), b_name: xb[0]})]) | layerbeam.ExtractLayers(model, select=branch_a.name)


def _check_finite_layer():
    import keras

    @keras.saving.register_keras_serializable(package="layerbeam_tests")
    class CheckFinite(keras.layers.Layer):
        """Raises at inference on a non-finite value (a model failing on some batches)."""

        def call(self, x):
            import tensorflow as tf

            return tf.debugging.check_numerics(x, "activation is not finite")

    return CheckFinite


def test_extract_layers_turns_a_failed_batch_into_dead_letters(tmp_path):
    import apache_beam as beam
    import keras
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    keras.utils.set_random_seed(2)
    inp = keras.Input((4,), name="x")
    dense = keras.layers.Dense(3, name="dense")(inp)
    model = keras.Model(inp, _check_finite_layer()(name="check")(dense))
    model.save(tmp_path / "m.keras")
    xs = np.random.default_rng(2).random((4, 4)).astype(np.float32)
    elements = [(f"k{i}", xs[i]) for i in range(4)] + [("nan", np.full(4, np.nan, np.float32))]
    ref = keras.Model(model.inputs, model.get_layer("dense").output).predict(xs, verbose=0)
    want = {f"k{i}": {"dense": ref[i]} for i in range(4)}
    with TestPipeline() as p:
        outputs, dead = (
            p
            | beam.Create(elements)
            | layerbeam.ExtractLayers(str(tmp_path / "m.keras"), select="check", batch_size=1).with_exception_handling()
        )
        assert_that(outputs | beam.MapTuple(lambda k, v: (k, {"dense": v["check"]})), _CloseTo(want), label="Outputs")
        assert_that(dead, _DeadLetters({"nan": ("inference_failed", "activation is not finite")}), label="DeadLetters")


def test_extract_layers_refuses_a_selector_that_matches_nothing_when_built(tiny_model):
    import layerbeam

    with pytest.raises(layerbeam.SelectionError, match="'conv9' matches no tensor"):
        layerbeam.ExtractLayers(str(tiny_model), select="conv9")


def test_write_layers_commits_an_output_that_reads_back_equal(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    import layerbeam

    rng = np.random.default_rng(7)
    feats = rng.random((12, 4, 3)).astype(np.float32)
    small = rng.random((12, 2)).astype(np.float16)
    elements = [(f"k{i:02d}", {"feat": feats[i], "small": small[i], "label": int(i % 3)}) for i in range(12)]
    extra = [("k03", {"feat": feats[0], "small": small[0], "label": 0}), ("odd", {"feat": np.zeros(5, np.float32), "small": small[0], "label": 1})]
    out = tmp_path / "out"
    with TestPipeline() as p:
        _ = p | beam.Create(elements + extra) | layerbeam.WriteLayers(str(out), partition_by=["label"], num_shards=3)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (out / "_SUCCESS").exists() and not (tmp_path / "out.layerbeam-staging").exists()
    assert manifest["counts"] == {"records_read": 14, "rows_written": 12, "dead_letters": 2, "dead_letter_reasons": {"duplicate_key": 1, "output_mismatch": 1}}
    back = layerbeam.read(str(out)).sort_by("key")
    assert back.column_names == ["key", "label", "feat", "small"]
    assert back.column("key").to_pylist() == [k for k, _ in elements]
    assert back.column("label").to_pylist() == [v["label"] for _, v in elements]
    np.testing.assert_array_equal(tensor(back, "feat"), feats)
    assert tensor(back, "small").dtype == np.float16
    np.testing.assert_array_equal(tensor(back, "small"), small)
    with pytest.raises(layerbeam.ConfigError, match="already holds a complete output"):
        layerbeam.WriteLayers(str(out))


def test_write_layers_of_nothing_commits_an_empty_output(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    import layerbeam

    with TestPipeline() as p:
        _ = p | beam.Create([]) | layerbeam.WriteLayers(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["counts"]["records_read"] == 0
    back = layerbeam.read(str(tmp_path / "out"))
    assert back.num_rows == 0 and back.column_names == ["key"]


def test_write_layers_refuses_a_windowed_input_instead_of_publishing_nothing(tmp_path):
    """Its commit runs once in the global window: a windowed input is refused when the graph
    is built (one line, the fix named), and nothing is written."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    import layerbeam

    with pytest.raises(layerbeam.ConfigError, match=r"windowed by FixedWindows.*GlobalWindows\(\)\) before WriteLayers"):
        with TestPipeline() as p:
            _ = (
                p
                | beam.Create([("a", {"x": np.zeros(2, np.float32)})])
                | beam.WindowInto(beam.window.FixedWindows(10))
                | layerbeam.WriteLayers(str(tmp_path / "out"))
            )
    assert not (tmp_path / "out").exists()

def test_extract_layers_then_write_layers_equals_extract(tiny_model, images, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    import layerbeam

    keys = [f"img{i}" for i in range(len(images))]
    with TestPipeline() as p:
        _ = (
            p
            | beam.Create(list(zip(keys, images)))
            | layerbeam.ExtractLayers(str(tiny_model), select=["conv1", "pool"])
            | layerbeam.WriteLayers(str(tmp_path / "out"), format="tfrecord", num_shards=2)
        )
    back = layerbeam.read(str(tmp_path / "out")).sort_by("key")
    table = layerbeam.extract(str(tiny_model), images, select=["conv1", "pool"], keys=keys).sort_by("key")
    assert back.column_names == table.column_names
    for name in ("conv1", "pool"):
        np.testing.assert_allclose(tensor(back, name), tensor(table, name), atol=ATOL)


def test_extract_layers_runs_the_model_on_full_batches(tiny_model, images):
    """RunInference's BatchElements, left to grow batches from 1, kept MobileNetV2's at
    1–12 on CPU; ExtractLayers asks for fixed batches of `batch_size` (a bundle's last one
    may be smaller). RunInference's own metric says which sizes the model saw."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter

    import layerbeam

    data = [(f"k{i}", images[i % len(images)]) for i in range(24)]
    p = beam.Pipeline()
    _ = p | beam.Create(data, reshuffle=False) | layerbeam.ExtractLayers(str(tiny_model), select=["conv1"], batch_size=8)
    result = p.run()
    result.wait_until_finish()
    sizes = [d.committed for d in result.metrics().query(MetricsFilter().with_name("inference_request_batch_size"))["distributions"]]
    assert sizes and sum(d.count for d in sizes) == 3 and min(d.min for d in sizes) == max(d.max for d in sizes) == 8, sizes


# --------------------------------------------------------------------------- packaging and README


def test_the_wheel_holds_only_layerbeam(tmp_path):
    """`python -m build --wheel` (from a copy of the tracked files, so the checkout stays clean)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"layerbeam"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("layerbeam/extract.py", "layerbeam/transforms/inference.py", "layerbeam/transforms/rows.py"):
        assert module in names


def readme_python_blocks(*headings: str) -> list[str]:
    """The ```python blocks under the README's `## <heading>` sections."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for heading in headings:
        m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, re.S | re.M)
        assert m, f"README has no '## {heading}' section"
        blocks += re.findall(r"```python\n(.*?)```", m.group(1), re.S)
    return blocks


def test_readme_api_examples_run(tmp_path, monkeypatch):
    """Every python block of 'Python API' and 'Beam API', in order, in one namespace, in an
    empty folder: the examples are complete as written."""
    blocks = readme_python_blocks("Python API", "Beam API")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_imports_only_layerbeam():
    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"^\s*(from|import) (transforms|pipeline)\b", text, re.M)
    assert "from transforms" not in text and "import pipeline" not in text


def test_extract_layers_in_the_launchers_process_takes_its_model_and_trace(tiny_model, images, monkeypatch):
    """An in-process worker takes the model and trace the launcher made for its checks (no
    second load or trace), and its outputs equal Keras; where the workers run elsewhere the
    launcher's copy is let go when the pipeline is built."""
    import apache_beam as beam
    import keras
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.portable_runner import PortableRunner
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam
    import layerbeam.transforms.inference as inference
    import layerbeam.transforms.models as models

    model = keras.saving.load_model(tiny_model)
    ref = sub_model_outputs(model, [model.get_layer("conv1"), model.get_layer("conv2")], np.stack(images))
    want = {f"k{i}": {"conv2": ref[1][i].mean(axis=(0, 1))} for i in range(len(images))}
    loads, graphs = [], []
    real_load = inference.load_model
    monkeypatch.setattr(inference, "load_model", lambda spec: loads.append(spec) or real_load(spec))
    real_graph = inference.ModelGraph
    monkeypatch.setattr(inference, "ModelGraph", lambda *a, **k: graphs.append(a) or real_graph(*a, **k))
    extract = layerbeam.ExtractLayers(str(tiny_model), select=["conv2"], batch_size=4)
    with TestPipeline() as p:
        out = p | beam.Create([(f"k{i}", v) for i, v in enumerate(images)]) | extract
        assert_that(out, _CloseTo(want))
    assert (loads, graphs) == ([], [])  # the worker loaded and traced nothing of its own
    assert extract._launcher_key in models._LAUNCHER_MODELS  # offered while the transform lives

    remote = layerbeam.ExtractLayers(str(tiny_model), select=["conv2"], batch_size=4)
    key = remote._launcher_key
    assert key in models._LAUNCHER_MODELS
    elsewhere = beam.Pipeline(runner=PortableRunner(), options=PipelineOptions(["--environment_type=DOCKER"]))
    _ = elsewhere | beam.Create([("k", images[0])]) | remote  # built, not run
    assert key not in models._LAUNCHER_MODELS


def test_extract_layers_feeds_a_worker_copy_whose_input_keras_named_otherwise(images, monkeypatch):
    """The launcher and a worker that loads its own copy (here: the launcher's copy not
    offered, as in a worker process of its own) each build a `module:function` model whose
    input Keras names itself (`input_layer`, then `input_layer_1`): elements still reach the
    worker's input by position, and the outputs equal Keras."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam
    import layerbeam.transforms.inference as inference
    from tests.tiny import unnamed_input_model

    monkeypatch.setattr(inference, "launcher_model", lambda key: None)

    model = unnamed_input_model()
    ref = sub_model_outputs(model, [model.get_layer("conv1"), model.get_layer("pool")], np.stack([v.astype(np.float32) for v in images]))
    want = {f"k{i}": {"conv1": ref[0][i].mean(axis=(0, 1))} for i in range(len(images))}
    with TestPipeline() as p:
        out = p | beam.Create([(f"k{i}", v) for i, v in enumerate(images)]) | layerbeam.ExtractLayers("tests.tiny:unnamed_input_model", select=["conv1"], batch_size=4)
        assert_that(out, _CloseTo(want))


# --------------------------------------------------------------------------- DecodeImages


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoded() -> dict[str, tuple[bytes, np.ndarray]]:
    """key → (PNG bytes, the pixels PIL reads back): lossless, so an independent decoder
    gives the exact pixels; sizes other than the model's, so every image is resized."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    out = {}
    for i, (h, w) in enumerate([(40, 50), (32, 32), (64, 20), (33, 47), (50, 40)]):
        data = _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out[f"img{i}"] = (data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def _pil_reference(pixels: np.ndarray, scale) -> np.ndarray:
    """PIL's pixels, resized by tf.image.resize (bilinear, as input.resize_method's default)."""
    import tensorflow as tf

    return scale(tf.image.resize(pixels, (SIZE, SIZE)).numpy().astype(np.float32))


def test_decode_images_gives_pils_pixels_resized_and_preprocessed(encoded):
    """DecodeImages' arrays equal PIL's decode of the same PNGs, resized and scaled: the
    decode is TensorFlow's, the reference PIL's (`scale` and `tf` preprocessing)."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    for preprocess, scale in (("scale", lambda x: x / 255.0), ("tf", lambda x: x / 127.5 - 1.0)):
        want = {k: {"x": _pil_reference(pixels, scale)} for k, (_, pixels) in encoded.items()}
        with TestPipeline() as p:
            out = (
                p
                | beam.Create([(k, data) for k, (data, _) in encoded.items()])
                | layerbeam.DecodeImages((SIZE, SIZE), preprocess, batch_size=2)
                | beam.Map(lambda kv: (kv[0], {"x": kv[1]}))
            )
            assert_that(out, _CloseTo(want))


def test_decode_images_then_extract_layers_equals_keras(tiny_model, encoded):
    """Encoded images → DecodeImages → ExtractLayers equals Keras `predict` on a sub-model
    fed PIL's pixels, resized: the RunInference path from bytes, end to end."""
    import apache_beam as beam
    import keras
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    keys = sorted(encoded)
    x = np.stack([_pil_reference(encoded[k][1], lambda v: v) for k in keys])
    model = keras.saving.load_model(tiny_model)
    ref = sub_model_outputs(model, [model.get_layer("conv1"), model.get_layer("pool")], x)
    want = {k: {"conv1": ref[0][i].mean(axis=(0, 1)), "pool": ref[1][i].reshape(-1)} for i, k in enumerate(keys)}
    with TestPipeline() as p:
        out = (
            p
            | beam.Create([(k, encoded[k][0]) for k in keys])
            | layerbeam.DecodeImages((SIZE, SIZE), "none", batch_size=3)
            | layerbeam.ExtractLayers(str(tiny_model), select=["conv1", "pool"], batch_size=3)
        )
        assert_that(out, _CloseTo(want))


def test_decode_images_routes_bad_images_to_dead_letters_and_keeps_their_batch(encoded):
    """An image that does not decode fails alone (its batch is decoded again one by one):
    with exception handling it is a dead letter with the file path's reason, and the good
    images of its batch still arrive; without, the pipeline fails naming the element."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    import layerbeam

    good = {k: {"x": _pil_reference(pixels, lambda v: v)} for k, (_, pixels) in encoded.items()}
    first = next(iter(encoded.values()))[0]
    bad = [("junk", b"no image here"), ("cut", first[: len(first) // 2]), ("text", "a string"), ("empty", b"")]
    with TestPipeline() as p:
        ok, dead = (
            p
            | beam.Create([(k, data) for k, (data, _) in encoded.items()] + bad, reshuffle=False)
            | layerbeam.DecodeImages((SIZE, SIZE), "none", batch_size=len(encoded) + len(bad)).with_exception_handling()
        )
        assert_that(ok | beam.Map(lambda kv: (kv[0], {"x": kv[1]})), _CloseTo(good), label="good")
        assert_that(dead, _DeadLetters({
            "junk": ("not_an_image", "no image signature"),
            "cut": ("truncated_image", "ends before the image does"),
            "text": ("bad_input", "holds a str"),
            "empty": ("empty_image", "0 bytes"),
        }), label="dead")
    with pytest.raises(Exception, match="no image signature.*with_exception_handling"):
        with TestPipeline() as p:
            _ = p | beam.Create([("junk", b"no image here")]) | layerbeam.DecodeImages((SIZE, SIZE))


def test_decode_images_refuses_bad_arguments_on_the_launcher():
    import layerbeam
    from layerbeam import ConfigError

    with pytest.raises(ConfigError, match=r"size \(224,\) is not \(height, width\)"):
        layerbeam.DecodeImages((224,))
    with pytest.raises(ConfigError, match=r"size 224 is not \(height, width\)"):
        layerbeam.DecodeImages(224)
    with pytest.raises(ConfigError, match="preprocess 'auto' needs a model"):
        layerbeam.DecodeImages((224, 224), "auto")
    with pytest.raises(ConfigError, match="DecodeImages preprocess 'nope' is unknown"):
        layerbeam.DecodeImages((224, 224), "nope")
    with pytest.raises(ConfigError, match="keras.applications has no 'NoSuchNet'"):
        layerbeam.DecodeImages((224, 224), "keras.applications.NoSuchNet")
    with pytest.raises(ConfigError, match="resize_method 'cubic' is unknown"):
        layerbeam.DecodeImages((224, 224), resize_method="cubic")


def test_decode_images_keeps_each_elements_window(encoded):
    """DecodeImages emits a batch while the next one decodes (and the last from
    finish_bundle): every array still arrives in its own element's window."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import FixedWindows, TimestampedValue

    import layerbeam

    keys = sorted(encoded)
    at = dict(zip(keys, [0, 1, 15, 16, 30]))
    with TestPipeline() as p:
        out = (
            p
            | beam.Create([(k, encoded[k][0]) for k in keys])
            | "Stamp" >> beam.Map(lambda kv: TimestampedValue(kv, at[kv[0]]))
            | beam.WindowInto(FixedWindows(10))
            | layerbeam.DecodeImages((SIZE, SIZE), "none", batch_size=2)
            | beam.Map(lambda kv, w=beam.DoFn.WindowParam: (kv[0], int(w.start), kv[1].shape))
        )
        assert_that(out, equal_to([(k, at[k] // 10 * 10, (SIZE, SIZE, 3)) for k in keys]))
