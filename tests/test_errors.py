"""Config and environment errors are caught before any work, through the real CLI: one
line naming the value and the fix, exit code 2, no traceback. Lambda layers need the opt-in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.tiny import save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, png_dataset):
    root = tmp_path_factory.mktemp("errors")
    model = save_tiny_model(root / "tiny.keras")
    folder, _, _ = png_dataset
    return root, model, folder


def _lambda_model(root: Path, ext: str) -> Path:
    import keras

    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv1")(inp)
    x = keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="double")(x)
    path = root / f"lambda.{ext}"
    keras.Model(inp, x).save(path)
    return path


def _one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("layerbeam: error:")]
    assert len(lines) == 1 and r.stderr.strip().splitlines()[-1] == lines[0]
    # TensorFlow's C++ start-up lines (absl format: I0000 …, E0000 …) do not stand before it.
    native = [l for l in r.stderr.splitlines() if re.match(r"[IWEF]\d{4} |WARNING: All log messages before absl", l)]
    assert not native, native
    return lines[0]


def _cfg(setup, tmp_path, **overrides) -> Path:
    root, model, folder = setup
    cfg = tiny_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), model, **overrides)
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_bad_yaml(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("input:\n  pattern: [unclosed\n")
    assert "not valid YAML at line" in _one_line_error(run_cli(["run", str(p)]))


def test_unknown_key(setup, tmp_path):
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"batching.batchsize": 4}))]))
    assert "unknown key 'batching.batchsize'" in line and "did you mean 'batch_size'" in line


def test_bad_type(setup, tmp_path):
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"batching.batch_size": "many"}))]))
    assert "batching.batch_size = 'many' is invalid" in line


def test_input_matching_nothing(setup, tmp_path):
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"input.pattern": str(tmp_path / "nothing/*.tfrecord")}))]))
    assert "matches no file" in line and "nothing/*.tfrecord" in line


def test_unwritable_output(setup, tmp_path):
    (tmp_path / "a_file").write_text("x")
    # refused before any work (--plan-only would print it as what a run would refuse)
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"output.path": str(tmp_path / "a_file/out")}))]))
    assert "is not writable" in line and "a_file/out" in line


def test_model_file_missing(setup, tmp_path):
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"model.source": str(tmp_path / "gone.keras")}))]))
    assert "gone.keras' does not exist" in line


def test_model_file_not_a_model(setup, tmp_path):
    bogus = tmp_path / "notes.keras"
    bogus.write_text("not a model")
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"model.source": str(bogus)}))]))
    assert "notes.keras' is not a .keras file" in line and "model.save" in line


def test_selector_matching_nothing(setup, tmp_path):
    line = _one_line_error(run_cli(["run", str(_cfg(setup, tmp_path, **{"layers.select": ["conv9"]}))]))
    assert "'conv9' matches no tensor" in line and "layerbeam layers" in line


@pytest.mark.parametrize("ext", ["keras", "h5"])
def test_lambda_layer_is_refused_by_default_and_loads_with_the_opt_in(setup, tmp_path, ext):
    from layerbeam.config import ModelConfig
    from layerbeam.transforms.errors import ModelError
    from layerbeam.transforms.models import load_model

    model = _lambda_model(tmp_path, ext)
    with pytest.raises(ModelError, match="Lambda layer.*model.safe_mode=false.*--unsafe-model"):
        load_model(ModelConfig(source=str(model)))
    loaded = load_model(ModelConfig(source=str(model), safe_mode=False))
    assert loaded.get_layer("double").__class__.__name__ == "Lambda"
    if ext == "keras":  # and through the CLI, which names the flag
        cfg = _cfg(setup, tmp_path, **{"model.source": str(model), "layers.select": ["double"]})
        assert "--unsafe-model" in _one_line_error(run_cli(["run", str(cfg), "--plan-only"]))


def test_a_closed_stderr_still_gets_the_one_line_error():
    """With descriptor 2 closed there is nothing to capture TensorFlow's start-up lines from;
    the CLI must still run and fail cleanly (Python prints to stdout then)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = "import sys; from layerbeam.cli import main; sys.exit(main())"
    r = subprocess.run(
        ["sh", "-c", f'exec 2>&-; exec "{sys.executable}" -c "{code}" layers keras.applications.MobileNetV9'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:])
    assert "keras.applications has no 'MobileNetV9'" in r.stdout


def test_image_files_need_a_single_input_model():
    from layerbeam.transforms.readers.images import single_image_input

    assert single_image_input({"image": (8, 8, 3)}) == ("image", (8, 8, 3))
    with pytest.raises(ValueError, match=r"feeds one image per example, but the model has inputs \['left', 'right'\].*input\.inputs"):
        single_image_input({"left": (8, 8, 3), "right": (8, 8, 3)})
