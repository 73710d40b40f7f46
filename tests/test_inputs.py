"""Inputs of every kind from TFRecord features: numbers (float_list, int64_list, raw tensor
bytes), token ids and masks, variable-length sequences padded per batch, and strings into a
model with a TextVectorization layer inside. Each output equals Keras `predict` on
`keras.Model(inputs, tapped tensors)` for the same inputs. Plus the preflight: a config
that cannot feed the model is refused before any work (exit 2, one line, nothing written).
"""

from __future__ import annotations

import numpy as np

import layerbeam
import pytest
import yaml

from layerbeam.config import load_config
from tests.conftest import run_cli, write_tfrecords
from tests.seed_models import seed_example_1, seed_example_3
from tests.test_errors import _one_line_error


def _tf_example(features: dict) -> bytes:
    """A tf.train.Example: numpy float arrays → float_list, int arrays → int64_list,
    bytes/str (or lists of them) → bytes_list."""
    import tensorflow as tf

    feat = {}
    for k, v in features.items():
        if isinstance(v, (bytes, str)):
            v = [v]
        if isinstance(v, list) and v and isinstance(v[0], (bytes, str)):
            feat[k] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[x.encode() if isinstance(x, str) else x for x in v]))
        elif np.issubdtype(np.asarray(v).dtype, np.integer):
            feat[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(v).ravel().tolist()))
        else:
            feat[k] = tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(v, np.float32).ravel().tolist()))
    return tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString()


def _table(out) -> dict:
    t = layerbeam.read(str(out))
    return {"keys": t.column("key").to_pylist(), "table": t}


def _column(table, name, order):
    return table.column(name).combine_chunks().to_numpy_ndarray()[order]


# --------------------------------------------------------------------------- example 2 of the seed


def seed_example2_model():
    """Example 2 of the seed article: Input(shape=(10,)), Dense 64/32/10, a pass-through
    Lambda and the custom ConditionalOutput layer (tests/seed_layers.py)."""
    import keras

    from tests.seed_layers import ConditionalOutput

    keras.utils.set_random_seed(11)
    input_tensor = keras.layers.Input(shape=(10,))
    dense1 = keras.layers.Dense(64, activation="relu")(input_tensor)
    dense2 = keras.layers.Dense(32, activation="relu")(dense1)
    dense3 = keras.layers.Dense(10, activation="softmax")(dense2)
    output2 = keras.layers.Lambda(lambda x: x)(dense1)
    output3 = ConditionalOutput(0)([dense1, dense2])
    return keras.Model(inputs=input_tensor, outputs=[dense3, output2, output3])


@pytest.fixture(scope="module")
def example2(tmp_path_factory):
    """(root, model path, input name, x (7, 10) float32, keys) with TFRecords holding x as a
    float_list ('x'), int64_list ('xi', x rounded) and raw float32 bytes ('xraw')."""
    root = tmp_path_factory.mktemp("example2")
    model = seed_example2_model()
    path = root / "example2.keras"
    model.save(path)
    x = np.random.default_rng(3).normal(size=(7, 10)).astype("float32")
    keys = [f"row{i}" for i in range(7)]
    recs = [_tf_example({"x": v, "xi": np.round(v * 10).astype(np.int64), "xraw": v.tobytes(), "id": k}) for v, k in zip(x, keys)]
    write_tfrecords(root / "data", [recs[:4], recs[4:]])
    return root, path, model.layers[0].name, x, keys


def _example2_config(example2, out, tensor: dict, **model) -> dict:
    root, path, input_name, _, _ = example2
    return {
        "input": {"pattern": f"{root}/data/*.tfrecord", "key_feature": "id", "inputs": {input_name: tensor}},
        "model": {"source": str(path), "safe_mode": False, "custom_objects": ["tests.seed_layers"], **model},
        "layers": {"select": ["all"]},
        "batching": {"batch_size": 3},
        "output": {"path": str(out)},
    }


def example2_layer_names(path) -> list[str]:
    """[input, dense1, dense2, dense3, lambda, conditional_output] as saved: Keras numbers
    unnamed layers by how many were built before in the process."""
    import keras

    import tests.seed_layers  # noqa: F401  (registers ConditionalOutput)

    return [l.name for l in keras.saving.load_model(path, compile=False, safe_mode=False).layers]


def _example2_reference(path, x):
    import keras

    import tests.seed_layers  # noqa: F401  (registers ConditionalOutput)

    model = keras.saving.load_model(path, compile=False, safe_mode=False)
    names = [l.name for l in model.layers[1:]]
    refs = keras.Model(model.inputs, [model.get_layer(n).output for n in names]).predict(x, verbose=0)
    return dict(zip(names, refs))


def test_seed_example2_through_the_cli_equals_keras(example2, tmp_path):
    root, path, input_name, x, keys = example2
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(_example2_config(example2, tmp_path / "out", {"feature": "x", "dtype": "float32", "shape": [10]})))
    r = run_cli(["run", str(cfg)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"input {input_name}: tensor from 'x': float32 [10] (float_list), no preprocessing" in r.stdout
    got = _table(tmp_path / "out")
    order = [got["keys"].index(k) for k in keys]
    refs = _example2_reference(path, x)
    assert set(refs) <= set(got["table"].column_names)
    for name, ref in refs.items():
        np.testing.assert_allclose(_column(got["table"], name, order), ref, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "tensor, scale",
    [
        ({"feature": "xraw", "dtype": "float32", "shape": [10], "encoding": "raw"}, None),
        ({"feature": "xi", "dtype": "int64"}, 10.0),  # int64_list into a float32 input: cast
    ],
    ids=["raw_bytes", "int64_list"],
)
def test_numeric_encodings_equal_keras(example2, tmp_path, tensor, scale):
    from layerbeam.run import run_job

    _, path, _, x, keys = example2
    run_job(load_config(raw=_example2_config(example2, tmp_path / "out", tensor)))
    got = _table(tmp_path / "out")
    order = [got["keys"].index(k) for k in keys]
    fed = x if scale is None else np.round(x * scale).astype("float32")
    dense3 = example2_layer_names(path)[3]
    ref = _example2_reference(path, fed)[dense3]
    np.testing.assert_allclose(_column(got["table"], dense3, order), ref, rtol=1e-5, atol=1e-6)


def test_unregistered_custom_class_is_one_line_naming_the_option(example2, tmp_path):
    cfg = _example2_config(example2, tmp_path / "out", {"feature": "x"})
    cfg["model"]["custom_objects"] = []
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    line = _one_line_error(run_cli(["run", str(p), "--plan-only"]))
    assert "uses the class" in line and "ConditionalOutput" in line and "model.custom_objects" in line, line


def test_custom_object_mapping_form(example2, tmp_path):
    from layerbeam.plan import prepare

    cfg = _example2_config(example2, tmp_path / "out", {"feature": "x"}, custom_objects={"ConditionalOutput": "tests.seed_layers:ConditionalOutput"})
    plan = prepare(load_config(raw=cfg))
    assert example2_layer_names(example2[1])[-1] in [o.name for o in plan.outputs]


# --------------------------------------------------------------------------- preflight errors


@pytest.mark.parametrize(
    "tensor, expected",
    [
        (None, "is read as an encoded image (float32 [height, width, channels]), but model input"),
        ({"feature": "x", "shape": [10, 1]}, "gives rank 2 (float32 [10, 1]), but model input"),
        ({"feature": "x", "shape": [12]}, "gives shape [12], but model input"),
        ({"feature": "x", "dtype": "string"}, "gives string values, but model input"),
    ],
    ids=["image_into_vector", "rank", "fixed_size", "dtype"],
)
def test_preflight_refuses_what_cannot_feed_the_model(example2, tmp_path, tensor, expected):
    root, _, input_name, _, _ = example2
    cfg = _example2_config(example2, tmp_path / "out", tensor)
    if tensor is None:
        del cfg["input"]["inputs"]
        cfg["input"]["image_feature"] = "x"
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    line = _one_line_error(run_cli(["run", str(p)]))
    assert expected in line and repr(input_name) in line and "wants float32 [10]" in line, line
    assert not (tmp_path / "out").exists()


def test_auto_preprocessing_on_a_non_applications_image_model_is_refused(tmp_path, png_dataset):
    from tests.tiny import save_tiny_model, tiny_config

    folder, _, _ = png_dataset
    model = save_tiny_model(tmp_path / "tiny.keras")
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(tiny_config(f"{folder}/*.tfrecord", str(tmp_path / "out"), model, **{"input.preprocess": "auto"})))
    line = _one_line_error(run_cli(["run", str(p)]))
    assert "input.preprocess 'auto'" in line and "none, scale, tf, caffe, torch or module:function" in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- strings and token ids


def text_model(vocabulary):
    """String input (shape (1,)) → TextVectorization (the vocabulary given, no download) →
    Embedding → mean over tokens → Dense."""
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input(shape=(1,), dtype="string", name="sentence")
    vec = keras.layers.TextVectorization(vocabulary=vocabulary, output_mode="int", output_sequence_length=6, name="vectorize")
    x = keras.layers.Embedding(len(vocabulary) + 2, 8, name="embed")(vec(inp))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(x), name="text")


def test_string_input_through_text_vectorization_equals_keras(tmp_path):
    from layerbeam.run import run_job

    vocab = ["the", "cat", "sat", "on", "mat", "dog", "ran"]
    model = text_model(vocab)
    path = tmp_path / "text.keras"
    model.save(path)
    sentences = ["the cat sat on the mat", "the dog ran", "a dog", "", "cat cat cat cat cat cat cat cat", "mat on dog"]
    recs = [_tf_example({"sentence": s.encode(), "id": f"s{i}"}) for i, s in enumerate(sentences)]
    write_tfrecords(tmp_path / "data", [recs])
    cfg = {
        "input": {"pattern": f"{tmp_path}/data/*.tfrecord", "key_feature": "id", "inputs": {"sentence": {"feature": "sentence", "dtype": "string"}}},
        "model": {"source": str(path)},
        "layers": {"select": ["embed", "pool", "head"], "reduce": "none"},
        "batching": {"batch_size": 4},
        "output": {"path": str(tmp_path / "out")},
    }
    run_job(load_config(raw=cfg))
    got = _table(tmp_path / "out")
    order = [got["keys"].index(f"s{i}") for i in range(len(sentences))]
    import keras

    loaded = keras.saving.load_model(path, compile=False)
    names = ["embed", "pool", "head"]
    import tensorflow as tf

    refs = keras.Model(loaded.inputs, [loaded.get_layer(n).output for n in names])(tf.constant([[s] for s in sentences]))
    refs = [np.asarray(r) for r in refs]
    for n, ref in zip(names, refs):
        np.testing.assert_allclose(_column(got["table"], n, order), ref, rtol=1e-5, atol=1e-6, err_msg=n)


def encoder_model(vocab: int = 50, length: int = 8):
    """Token ids + attention mask (int32, fixed length) → Embedding + position → two
    pre-norm transformer encoder blocks of Keras layers (MultiHeadAttention, Dense)."""
    import keras

    keras.utils.set_random_seed(9)
    ids = keras.Input(shape=(length,), dtype="int32", name="ids")
    mask = keras.Input(shape=(length,), dtype="int32", name="mask")
    x = keras.layers.Embedding(vocab, 16, name="tokens")(ids)
    for b in range(2):
        h = keras.layers.LayerNormalization(name=f"ln{b}a")(x)
        h = keras.layers.MultiHeadAttention(2, 8, name=f"mha{b}")(h, h, attention_mask=_pairwise(mask, b))
        x = keras.layers.Add(name=f"res{b}a")([x, h])
        h = keras.layers.LayerNormalization(name=f"ln{b}b")(x)
        h = keras.layers.Dense(32, activation="gelu", name=f"ff{b}a")(h)
        h = keras.layers.Dense(16, name=f"ff{b}b")(h)
        x = keras.layers.Add(name=f"res{b}b")([x, h])
    return keras.Model([ids, mask], x, name="encoder")


def _pairwise(mask, b):
    """(B, T) 0/1 mask → (B, 1, T): every query attends to the real tokens only."""
    import keras

    return keras.layers.Reshape((1, -1), name=f"mask{b}")(mask)


def test_token_ids_and_mask_into_an_encoder_equal_keras(tmp_path):
    from layerbeam.run import run_job

    model = encoder_model()
    path = tmp_path / "encoder.keras"
    model.save(path)
    rng = np.random.default_rng(2)
    lengths = [8, 3, 5, 1, 6]
    ids = np.zeros((5, 8), np.int64)
    mask = np.zeros((5, 8), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 50, n)
        mask[i, :n] = 1
    recs = [_tf_example({"input_ids": a, "attention_mask": m, "id": f"t{i}"}) for i, (a, m) in enumerate(zip(ids, mask))]
    write_tfrecords(tmp_path / "data", [recs])
    cfg = {
        "input": {
            "pattern": f"{tmp_path}/data/*.tfrecord", "key_feature": "id",
            "inputs": {"ids": {"feature": "input_ids", "dtype": "int64"}, "mask": {"feature": "attention_mask", "dtype": "int64", "shape": [8]}},
        },
        "model": {"source": str(path)},
        "layers": {"select": ["tokens", "mha0", "res1b"], "reduce": "none"},
        "batching": {"batch_size": 2},
        "output": {"path": str(tmp_path / "out")},
    }
    run_job(load_config(raw=cfg))
    got = _table(tmp_path / "out")
    order = [got["keys"].index(f"t{i}") for i in range(5)]
    import keras

    loaded = keras.saving.load_model(path, compile=False)
    names = ["tokens", "mha0", "res1b"]
    refs = keras.Model(loaded.inputs, [loaded.get_layer(n).output for n in names]).predict([ids.astype("int32"), mask.astype("int32")], verbose=0)
    for n, ref in zip(names, refs):
        np.testing.assert_allclose(_column(got["table"], n, order), ref, rtol=1e-4, atol=1e-5, err_msg=n)


def test_variable_length_ids_are_padded_per_batch(tmp_path):
    """`shape: [null]`: each batch is padded to its longest sequence with pad_value 0; the
    model masks padding (Embedding mask_zero → masked mean), so every row equals Keras on
    that sequence alone, unpadded."""
    import keras

    from layerbeam.run import run_job

    keras.utils.set_random_seed(1)
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(30, 8, mask_zero=True, name="embed")(ids)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(ids, keras.layers.Dense(4, name="head")(x))
    path = tmp_path / "bag.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 30, n) for n in (5, 2, 7, 1, 3)]
    recs = [_tf_example({"ids": s.astype(np.int64), "id": f"v{i}"}) for i, s in enumerate(seqs)]
    write_tfrecords(tmp_path / "data", [recs])
    cfg = {
        "input": {"pattern": f"{tmp_path}/data/*.tfrecord", "key_feature": "id", "inputs": {"ids": {"feature": "ids", "dtype": "int64", "shape": [None], "pad_value": 0}}},
        "model": {"source": str(path)},
        "layers": {"select": ["head", "pool"]},
        "batching": {"batch_size": 2},
        "output": {"path": str(tmp_path / "out")},
    }
    run_job(load_config(raw=cfg))
    got = _table(tmp_path / "out")
    for i, s in enumerate(seqs):
        row = got["keys"].index(f"v{i}")
        ref = model.predict(s[None].astype("int32"), verbose=0)
        np.testing.assert_allclose(_column(got["table"], "head", [row])[0], ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [seed_example_1, seed_example_3], ids=["example1", "example3"])
def test_seed_examples_1_and_3_through_the_cli_from_tfrecord_tensors_equal_keras(build, tmp_path):
    """The article's other two models (np.random.rand inputs, as it feeds them) from
    float_list features through `layerbeam run`: the outputs the article taps, each equal to
    Keras `predict` of the model itself."""
    import keras

    from layerbeam.transforms.layers import ModelGraph

    model, *_ = build()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    names = ModelGraph(loaded).input_names
    rng = np.random.default_rng(0)
    x = {n: rng.random((6, 28, 28, 1)).astype("float32") for n in names}
    keys = [f"r{i}" for i in range(6)]
    recs = [_tf_example({**{f"x{j}": x[n][i].ravel() for j, n in enumerate(names)}, "id": k}) for i, k in enumerate(keys)]
    write_tfrecords(tmp_path / "data", [recs[:4], recs[4:]])
    tapped = [t._keras_history.operation.name for t in loaded.outputs]  # the layers the article taps
    cfg = {
        "input": {"pattern": f"{tmp_path}/data/*.tfrecord", "key_feature": "id",
                  "inputs": {n: {"feature": f"x{j}", "dtype": "float32", "shape": [28, 28, 1]} for j, n in enumerate(names)}},
        "model": {"source": str(path)},
        "layers": {"select": tapped, "reduce": "none"},
        "batching": {"batch_size": 4},
        "output": {"path": str(tmp_path / "out")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(["run", str(tmp_path / "job.yaml")])
    assert r.returncode == 0, r.stderr[-3000:]
    got = _table(tmp_path / "out")
    order = [got["keys"].index(k) for k in keys]
    refs = loaded.predict([x[n] for n in names] if len(names) > 1 else x[names[0]], verbose=0)
    for name, ref in zip(tapped, refs):
        np.testing.assert_allclose(_column(got["table"], name, order), ref, rtol=1e-5, atol=1e-6, err_msg=name)
