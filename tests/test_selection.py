"""Selection semantics, the `layerbeam layers` command, the size plan and its cap, and the
seed article's two-input model end to end through the pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import yaml

from layerbeam.cli import main
from layerbeam.config import load_config
from layerbeam.transforms.errors import SelectionError
from tests.conftest import base_config, encode_png, example, photo_crops, write_tfrecords
from layerbeam.transforms.readback import to_arrow


@pytest.fixture(scope="module")
def small_cnn():
    """input → conv_a → bn_a → relu_a → conv_b → relu_b → pool → dense(head); keras
    layer types Conv2D ×2, ReLU ×2, BatchNormalization, GlobalAveragePooling2D, Dense."""
    import keras

    from layerbeam.transforms.layers import ModelGraph

    keras.utils.set_random_seed(21)
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(4, 3, name="conv_a")(x)
    h = keras.layers.BatchNormalization(name="bn_a")(h)
    h = keras.layers.ReLU(name="relu_a")(h)
    h = keras.layers.Conv2D(6, 3, name="conv_b")(h)
    h = keras.layers.ReLU(name="relu_b")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(x, keras.layers.Dense(2, name="head")(h), name="small_cnn")
    return ModelGraph(model)


def _names(graph, select, **kw) -> list[str]:
    return [s.name for s in graph.select(select, **kw)]


ORDER = ["conv_a", "bn_a", "relu_a", "conv_b", "relu_b", "pool", "head"]


@pytest.mark.parametrize(
    "select, expected",
    [
        (["all"], ORDER),
        (["conv_b"], ["conv_b"]),
        (["relu_*"], ["relu_a", "relu_b"]),
        (["conv_?"], ["conv_a", "conv_b"]),
        (["re:(conv|relu)_b"], ["conv_b", "relu_b"]),
        (["type:Conv2D"], ["conv_a", "conv_b"]),
        (["type:ReLU", "type:Dense"], ["relu_a", "relu_b", "head"]),
        (["type:Layer"], ORDER),  # a base class matches every subclass
        (["head", "conv_a", "pool"], ["conv_a", "pool", "head"]),  # execution order, not selector order
        (["conv_a", "conv_a", "type:Conv2D"], ["conv_a", "conv_b"]),  # each tensor once
    ],
)
def test_selector_kinds(small_cnn, select, expected):
    assert _names(small_cnn, select) == expected


def test_exclusions_rename_and_overrides(small_cnn):
    g = small_cnn
    assert _names(g, ["all"], exclude=["type:ReLU", "bn_*"]) == ["conv_a", "conv_b", "pool", "head"]
    # `as` renames (the tensor is not written twice), wherever the rename comes in the list
    assert _names(g, ["all", {"layer": "pool", "as": "embedding"}]) == ["conv_a", "bn_a", "relu_a", "conv_b", "relu_b", "embedding", "head"]
    assert _names(g, [{"layer": "pool", "as": "embedding"}, "all"]) == _names(g, ["all", {"layer": "pool", "as": "embedding"}])
    # several names for one tensor: several outputs (pooled and unpooled)
    specs = g.select([{"layer": "conv_b", "as": "map", "reduce": "none"}, {"layer": "conv_b", "as": "vec"}])
    assert [(s.name, s.reduce, s.shape) for s in specs] == [("map", "none", (4, 4, 6)), ("vec", "mean", (6,))]
    # a later selector's reduce/dtype win for the same name
    specs = {s.name: s for s in g.select(["all", {"layer": "conv_a", "reduce": "none", "dtype": "float16"}], reduce="max")}
    assert (specs["conv_a"].reduce, specs["conv_a"].dtype, specs["conv_a"].shape) == ("none", "float16", (6, 6, 4))
    assert (specs["conv_b"].reduce, specs["conv_b"].shape, specs["conv_b"].bytes_per_example) == ("max", (6,), 24)
    assert specs["conv_a"].bytes_per_example == 6 * 6 * 4 * 2
    # exclusions apply to renamed outputs too
    assert _names(g, [{"layer": "pool", "as": "embedding"}, "head"], exclude=["pool"]) == ["head"]


def test_model_inputs_only_with_include_inputs_or_by_name(small_cnn):
    g = small_cnn
    assert "image" not in _names(g, ["all"])
    assert _names(g, ["all"], include_inputs=True)[0] == "image"
    assert _names(g, ["image"]) == ["image"]


@pytest.mark.parametrize(
    "select, exclude, message",
    [
        (["conv_c"], (), "layer selector 'conv_c' matches no tensor of model 'small_cnn'; close paths: conv_b, conv_a"),
        (["conv_*", "dense_*"], (), "layer selector 'dense_*' matches no tensor"),
        (["re:block_\\d+"], (), "layer selector 're:block_\\\\d+' matches no tensor"),
        (["type:Conv2d"], (), "layer selector 'type:Conv2d' matches no tensor of model 'small_cnn'; close layer types: Conv2D"),
        (["all"], ("type:Dropout",), "exclude selector 'type:Dropout' matches no tensor"),
        (["re:conv_("], (), "is not a valid regular expression"),
        (["imag*"], (), "it matches only model inputs, which patterns skip unless layers.include_inputs is true"),
        ([{"layer": "relu_*", "as": "r"}], (), "layer selector 'relu_*' matches 2 tensors (relu_a, relu_b), so 'as: r' cannot name them all"),
        ([{"layer": "conv_a", "as": "conv_b"}, "conv_b"], (), "output name 'conv_b' is given to both 'conv_a' and 'conv_b'"),
        (["conv_a"], ("conv_*",), "the exclusions removed every selected output"),
    ],
)
def test_selection_errors_name_the_selector_and_the_fix(small_cnn, select, exclude, message):
    with pytest.raises(SelectionError) as e:
        small_cnn.select(select, exclude=exclude)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_every_unmatched_selector_is_reported_by_name(small_cnn):
    # the first selector is fine: the error names the one that matches nothing
    with pytest.raises(SelectionError, match="'type:Dropout'"):
        small_cnn.select(["all", "type:Dropout"])


# --------------------------------------------------------------------------- layerbeam layers


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def nested_model_file(tmp_path_factory):
    """A .keras file: a Functional `base` (conv, relu) called twice, inside a classifier."""
    import keras

    keras.utils.set_random_seed(22)
    i = keras.Input((8, 8, 3), name="base_in")
    base = keras.Model(i, keras.layers.ReLU(name="relu")(keras.layers.Conv2D(4, 3, name="conv")(i)), name="base")
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Concatenate(name="cat")([base(x), base(keras.layers.RandomFlip(name="flip")(x))])
    model = keras.Model(x, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D(name="pool")(h)))
    path = tmp_path_factory.mktemp("models") / "nested.keras"
    model.save(path)
    return str(path), model


def test_layers_json_lists_every_path_with_type_shape_bytes_params(nested_model_file):
    path, model = nested_model_file
    code, out, _ = _cli(["layers", path, "--json", "--reduce", "mean", "--dtype", "float16"])
    assert code == 0
    doc = json.loads(out)
    assert doc["inputs"] == {"image": [8, 8, 3]}
    rows = {r["path"]: r for r in doc["tensors"]}
    assert list(rows) == ["image", "flip", "base#0/conv", "base#0/relu", "base#0", "base#1/conv", "base#1/relu", "base#1", "cat", "pool", "head"]
    conv = rows["base#1/conv"]
    assert (conv["type"], conv["shape"], conv["dtype"], conv["stored_shape"]) == ("Conv2D", [6, 6, 4], "float32", [4])
    assert conv["bytes_per_example"] == 4 * 2  # mean over 6×6, float16
    assert conv["params"] == 3 * 3 * 3 * 4 + 4 == model.get_layer("base").get_layer("conv").count_params()
    assert conv["depth"] == 1 and rows["base#1"]["is_model"] and rows["base#1"]["type"] == "Functional"
    assert rows["head"]["params"] == 8 * 3 + 3 and rows["head"]["bytes_per_example"] == 3 * 2


def test_layers_match_previews_a_selector(nested_model_file):
    path, _ = nested_model_file
    code, out, _ = _cli(["layers", path, "--json", "--match", "base#1/*", "--match", "type:Dense"])
    assert code == 0
    assert [r["path"] for r in json.loads(out)["tensors"]] == ["base#1/conv", "base#1/relu", "head"]
    code, _, err = _cli(["layers", path, "--match", "base/rleu"])
    assert code == 2
    assert err.startswith("layerbeam: error: --match selector 'base/rleu' matches no tensor") and "Traceback" not in err
    assert f"run `layerbeam layers {path}`" in err


def test_layers_tree_output(nested_model_file):
    path, _ = nested_model_file
    code, out, _ = _cli(["layers", path])
    assert code == 0
    lines = out.splitlines()
    row = next(line for line in lines if "base#0/relu" in line)
    assert "  base#0/relu" in row and "ReLU" in row and "6×6×4" in row and "576 B" in row  # 6·6·4·4 bytes
    assert any("base#0" in line and "Functional (model)" in line for line in lines)
    assert "11 tensors in the model" in out


def test_layers_application_with_input_shape(capsys):
    code, out, _ = _cli(["layers", "keras.applications.MobileNetV2", "--input-shape", "32,32,3", "--json", "--match", "type:Conv2D"])
    assert code == 0
    doc = json.loads(out)
    assert doc["inputs"] == {"input_layer": [32, 32, 3]} or list(doc["inputs"].values()) == [[32, 32, 3]]
    assert doc["tensors"][0]["path"] == "Conv1" and doc["tensors"][0]["shape"] == [16, 16, 32]
    assert all(r["type"] == "Conv2D" for r in doc["tensors"]) and len(doc["tensors"]) == 35


# --------------------------------------------------------------------------- size plan and cap


def test_plan_is_printed_with_per_output_and_total_bytes(tmp_path, png_dataset):
    folder, imgs, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"layers.select": ["block_1_expand_relu", {"layer": "block_2_add", "reduce": "none"}]})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = _cli(["run", str(cfg), "--plan-only", "-q"])
    assert code == 0, err
    # MobileNetV2 alpha 0.35 at 64 px: block_1_expand_relu has 48 channels (mean → 48
    # floats), block_2_add is 16×16×8 (unreduced)
    per_output = {"block_1_expand_relu": 48 * 4, "block_2_add": 16 * 16 * 8 * 4}
    for name, nbytes in per_output.items():
        row = next(line for line in out.splitlines() if name in line)
        assert _human(nbytes) in row
    total = sum(per_output.values())
    text = " ".join(out.split())  # the console wraps long lines
    assert f"total: 2 outputs · {_human(total)} per example" in text
    assert f"~{len(imgs)} examples → ~{_human(total * len(imgs))} out" in text
    assert not (tmp_path / "out").exists()


def test_run_over_the_cap_is_refused_after_the_plan(tmp_path, png_dataset):
    folder, _, _ = png_dataset
    overrides = {"layers.select": ["all"], "layers.reduce": "none", "layers.max_bytes_per_example": 100_000}
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **overrides)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = _cli(["run", str(cfg), "-q"])
    assert code == 2
    assert "over the cap layers.max_bytes_per_example = 97.7 KB" in err and "--set layers.max_bytes_per_example=" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    import keras

    app = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), alpha=0.35)
    assert f"total: {len(app.layers) - 1} outputs" in " ".join(out.split())  # the plan came first, showing why
    needed = int(err.split("--set layers.max_bytes_per_example=")[1].split()[0])
    assert _human(needed) in out
    assert not (tmp_path / "out").exists()
    # raising the cap knowingly lets the plan pass
    code, _, err = _cli(["run", str(cfg), "-q", "--plan-only", "--set", f"layers.max_bytes_per_example={needed}"])
    assert code == 0, err


def _human(n: float) -> str:
    from layerbeam.plan import human as h

    return h(n)


# --------------------------------------------------------------------------- the seed's two-input model


def seed_two_branch_model():
    """Example 3 of the seed article: two 28×28×1 inputs, a conv branch each, merged."""
    import keras
    from keras.layers import Conv2D, Dense, Flatten, Input, MaxPooling2D, concatenate

    keras.utils.set_random_seed(23)
    input_a = Input(shape=(28, 28, 1), name="input_a")
    input_b = Input(shape=(28, 28, 1), name="input_b")
    branch_a = MaxPooling2D((2, 2), name="pool_a")(Conv2D(32, (3, 3), activation="relu", name="conv_a")(input_a))
    branch_b = MaxPooling2D((2, 2), name="pool_b")(Conv2D(32, (3, 3), activation="relu", name="conv_b")(input_b))
    merged = concatenate([branch_a, branch_b], name="merged")
    dense1 = Dense(128, activation="relu", name="dense1")(Flatten(name="flatten")(merged))
    output = Dense(10, activation="softmax", name="output")(dense1)
    return keras.Model(inputs=[input_a, input_b], outputs=[output, branch_a, branch_b])


def test_seed_two_input_model_through_the_pipeline(tmp_path):
    import keras

    from layerbeam.run import run_job

    model = seed_two_branch_model()
    path = tmp_path / "seed.keras"
    model.save(path)
    rng = np.random.default_rng(7)
    gray = [(rng.uniform(0, 255, (28, 28)).astype("uint8"), np.asarray(im).mean(axis=2).astype("uint8")) for im in photo_crops(5, 28, seed=3)]
    keys = [f"pair{i}" for i in range(5)]
    recs = [example({"left": encode_png(a), "right": encode_png(b), "image/key": k}) for (a, b), k in zip(gray, keys)]
    write_tfrecords(tmp_path / "data", [recs[:3], recs[3:]])
    raw = {
        "input": {"pattern": f"{tmp_path}/data/*.tfrecord", "key_feature": "image/key", "inputs": {"input_a": "left", "input_b": "right"}, "preprocess": "scale"},
        "model": {"source": str(path)},
        "layers": {"select": ["all", {"layer": "merged", "reduce": "none"}]},
        "batching": {"batch_size": 2},
        "output": {"path": str(tmp_path / "out")},
    }
    manifest = run_job(load_config(raw=raw))
    names = ["conv_a", "conv_b", "pool_a", "pool_b", "merged", "flatten", "dense1", "output"]
    assert [o["name"] for o in manifest["outputs"]] == names
    assert manifest["counts"]["rows_written"] == 5
    table = to_arrow(str(tmp_path / "out"))
    order = [table.column("key").to_pylist().index(k) for k in keys]
    xa = np.stack([a for a, _ in gray])[..., None].astype("float32") / 255.0
    xb = np.stack([b for _, b in gray])[..., None].astype("float32") / 255.0
    refs = keras.Model(model.inputs, [model.get_layer(n).output for n in names]).predict([xa, xb], verbose=0)
    for n, r in zip(names, refs):
        got = table.column(n).combine_chunks().to_numpy_ndarray()[order]
        if n != "merged" and r.ndim == 4:
            r = r.mean(axis=(1, 2))
        np.testing.assert_allclose(got, r, rtol=1e-5, atol=1e-5, err_msg=n)
    assert math.prod(manifest["outputs"][4]["shape"]) == 13 * 13 * 64


def test_output_name_clashing_with_a_row_column_is_refused(tmp_path, png_dataset):
    folder, _, _ = png_dataset
    raw = base_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), **{"layers.select": [{"layer": "out_relu", "as": "label"}]})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code, _, err = _cli(["run", str(cfg), "-q", "--plan-only"])
    assert code == 2
    assert "output name 'label' (from 'out_relu') is also the name of the 'label' column" in err
