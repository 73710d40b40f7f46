"""Every kind of model a user brings, traced and extracted, against an independent reference.

References never use layerbeam's tracer: they are Keras's own symbolic tensors from when
the model was built (`keras.Model(inputs, that_tensor)`), `predict` on prefix or sub-models,
eager layer calls, or numpy. Each model is built once per module; batch of 2.
"""

from __future__ import annotations

import numpy as np
import pytest

from layerbeam.transforms.errors import ModelError, SelectionError
from layerbeam.transforms.extractor import Extractor, extractor_model
from layerbeam.transforms.layers import ModelGraph

ATOL = RTOL = 1e-5  # small float32 models: same kernels, same weights, a few ulps apart


def _extract(graph: ModelGraph, select, x, **kw) -> dict[str, np.ndarray]:
    specs = graph.select(select, **kw)
    xs = x if isinstance(x, dict) else {graph.input_names[0]: x}
    return Extractor(extractor_model(graph, specs))(xs)


def _close(got, ref):
    np.testing.assert_allclose(got, np.asarray(ref), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- Sequential


@pytest.fixture(scope="module")
def seq_models():
    import keras

    keras.utils.set_random_seed(11)

    def layers():
        return [keras.layers.Dense(5, activation="relu", name="d1"), keras.layers.Dense(3, name="d2"), keras.layers.Softmax(name="sm")]

    with_input = keras.Sequential([keras.Input((4,), name="features"), *layers()], name="with_input")
    without = keras.Sequential(layers(), name="without_input")  # never built: no inputs, no weights yet
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    return with_input, without, x


def test_sequential_with_input_equals_prefix_models(seq_models):
    import keras

    model, _, x = seq_models
    graph = ModelGraph(model)
    assert graph.paths() == ["features", "d1", "d2", "sm"]
    got = _extract(graph, ["all"], x)
    assert list(got) == ["d1", "d2", "sm"]
    for i, layer in enumerate(model.layers):
        _close(got[layer.name], keras.Sequential(model.layers[: i + 1]).predict(x, verbose=0))


def test_sequential_without_input_needs_a_shape_then_equals_prefix_models(seq_models):
    import keras

    _, model, x = seq_models
    with pytest.raises(ModelError, match="has no defined input.*set model.input_shape"):
        ModelGraph(model)
    graph = ModelGraph(model, input_shapes=[(4,)])  # tracing builds it
    assert graph.paths() == ["input", "d1", "d2", "sm"]
    got = _extract(graph, ["all"], x)
    for i, layer in enumerate(model.layers):
        _close(got[layer.name], keras.Sequential(model.layers[: i + 1]).predict(x, verbose=0))


# --------------------------------------------------------------------------- shared layer


@pytest.fixture(scope="module")
def shared_layer_model():
    """`dense` is called first on `pre(x)`, then on `x`: both calls sit at the same depth,
    and Keras stores the second call's node first at that depth."""
    import keras

    keras.utils.set_random_seed(12)
    x = keras.Input((4,), name="x")
    dense = keras.layers.Dense(3, name="dense")
    first = dense(keras.layers.Dense(4, name="pre")(x))
    second = dense(x)
    third = dense(keras.layers.Dense(4, name="post")(keras.layers.Concatenate(name="cat")([first, second, x])[:, :4]))
    model = keras.Model(x, keras.layers.Add(name="add")([first, second, third]))
    # the reference: Keras's own symbolic tensors of each call, from when it was built
    ref = keras.Model(x, [first, second, third])
    data = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
    return model, ref, data


def test_shared_layer_calls_are_numbered_in_call_order(shared_layer_model):
    model, ref, x = shared_layer_model
    graph = ModelGraph(model)
    got = _extract(graph, ["dense"], x)
    assert list(got) == ["dense#0", "dense#1", "dense#2"]
    for name, r in zip(got, ref.predict(x, verbose=0)):
        _close(got[name], r)
    assert not np.allclose(got["dense#0"], got["dense#1"])  # the calls really differ
    # one call by index; every call by layer name; a renamed call
    assert list(_extract(graph, ["dense#1"], x)) == ["dense#1"]
    one = _extract(graph, [{"layer": "dense#2", "as": "third"}], x)
    _close(one["third"], ref.predict(x, verbose=0)[2])


def test_shared_layer_numbering_survives_save_and_load(shared_layer_model, tmp_path):
    import keras

    model, ref, x = shared_layer_model
    model.save(tmp_path / "shared.keras")
    loaded = keras.saving.load_model(tmp_path / "shared.keras")
    got = _extract(ModelGraph(loaded), ["dense"], x)
    for name, r in zip(["dense#0", "dense#1", "dense#2"], ref.predict(x, verbose=0)):
        _close(got[name], r)


# --------------------------------------------------------------------------- nested and shared sub-models


@pytest.fixture(scope="module")
def nested_models():
    """outer (Functional) → mid (Sequential) → inner (Functional); and a `tower` sub-model
    called on two inputs."""
    import keras

    keras.utils.set_random_seed(13)
    i = keras.Input((6,), name="inner_in")
    inner = keras.Model(i, keras.layers.Dense(5, activation="tanh", name="deep")(keras.layers.Dense(6, name="first")(i)), name="inner")
    mid = keras.Sequential([inner, keras.layers.Dense(4, name="after")], name="mid")
    t = keras.Input((6,), name="tower_in")
    tower = keras.Model(t, keras.layers.Dense(3, name="proj")(keras.layers.Dense(6, activation="relu", name="hidden")(t)), name="tower")
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    ta, tb = tower(a), tower(b)
    outer = keras.Model([a, b], keras.layers.Concatenate(name="cat")([mid(a), ta, tb]), name="outer")
    rng = np.random.default_rng(2)
    xa, xb = (rng.normal(size=(2, 6)).astype("float32") for _ in range(2))
    return outer, inner, mid, tower, xa, xb


def test_nested_paths_at_any_depth_equal_submodel_outputs(nested_models):
    import keras

    outer, inner, mid, tower, xa, xb = nested_models
    graph = ModelGraph(outer)
    got = _extract(graph, ["all"], {"a": xa, "b": xb})
    assert list(got) == [
        "mid/inner/first", "mid/inner/deep", "mid/after",
        "tower#0/hidden", "tower#0/proj", "tower#1/hidden", "tower#1/proj", "cat",
    ]  # fmt: skip
    _close(got["mid/inner/first"], keras.Model(inner.inputs, inner.get_layer("first").output).predict(xa, verbose=0))
    _close(got["mid/inner/deep"], inner.predict(xa, verbose=0))
    _close(got["mid/after"], mid.predict(xa, verbose=0))
    hidden = keras.Model(tower.inputs, tower.get_layer("hidden").output)
    for k, x in (("0", xa), ("1", xb)):
        _close(got[f"tower#{k}/hidden"], hidden.predict(x, verbose=0))
        _close(got[f"tower#{k}/proj"], tower.predict(x, verbose=0))
    _close(got["cat"], outer.predict([xa, xb], verbose=0))


def test_nested_model_own_output_and_call_selectors(nested_models):
    outer, inner, mid, tower, xa, xb = nested_models
    graph = ModelGraph(outer)
    # a sub-model's own output is addressable by exact path, but `all` skips it (it repeats
    # its last layer's output)
    assert "tower#1" in graph.paths() and "mid" in graph.paths()
    got = _extract(graph, ["tower#1", "mid/inner"], {"a": xa, "b": xb})
    _close(got["tower#1"], tower.predict(xb, verbose=0))
    _close(got["mid/inner"], inner.predict(xa, verbose=0))
    # `tower/proj` names both calls; `tower#0/*` one call's layers; `*/deep` crosses levels
    assert [s.name for s in graph.select(["tower/proj"])] == ["tower#0/proj", "tower#1/proj"]
    assert [s.name for s in graph.select(["tower#0/*"])] == ["tower#0/hidden", "tower#0/proj"]
    assert [s.name for s in graph.select(["*/deep"])] == ["mid/inner/deep"]


@pytest.fixture(scope="module")
def base_model_classifier():
    """The transfer-learning pattern: MobileNetV2 as `base` inside a classifier head."""
    import keras

    keras.utils.set_random_seed(14)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35, name="base")
    x = keras.Input((32, 32, 3), name="image")
    h = base(x, training=False)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    out = keras.layers.Dense(4, activation="softmax", name="head")(keras.layers.Dropout(0.2, name="drop")(h))
    model = keras.Model(x, out, name="classifier")
    data = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    return model, base, data


def test_base_model_inner_layers_equal_base_submodels(base_model_classifier):
    import keras

    model, base, x = base_model_classifier
    graph = ModelGraph(model)
    inner = ["block_1_expand_relu", "block_6_project_BN", "out_relu"]
    got = _extract(graph, [f"base/{n}" for n in inner] + ["head", {"layer": "base/block_3_depthwise", "as": "dw3", "reduce": "none"}], x)
    assert list(got) == ["base/block_1_expand_relu", "dw3", "base/block_6_project_BN", "base/out_relu", "head"]
    refs = keras.Model(base.inputs, [base.get_layer(n).output for n in [*inner, "block_3_depthwise"]]).predict(x, verbose=0)
    for n, r in zip(inner, refs[:3]):
        _close(got[f"base/{n}"], r.mean(axis=(1, 2)))
    _close(got["dw3"], refs[3])
    _close(got["head"], model.predict(x, verbose=0))
    # a glob inside the base model: every expand_relu, in the base model's layer order
    names = [s.name for s in graph.select(["base/block_*_expand_relu"])]
    expected = [f"base/{l.name}" for l in base.layers if l.name.startswith("block_") and l.name.endswith("_expand_relu")]
    assert names == expected and len(names) == 16


# --------------------------------------------------------------------------- multi-output layer


@pytest.fixture(scope="module")
def two_output_model():
    import keras

    class Split(keras.layers.Layer):
        """Returns (first two features, the rest)."""

        def call(self, x):
            return x[:, :2], x[:, 2:] * 2.0

        def compute_output_shape(self, s):
            return (s[0], 2), (s[0], s[1] - 2)

    keras.utils.set_random_seed(15)
    x = keras.Input((5,), name="x")
    lo, hi = Split(name="split")(keras.layers.Dense(5, name="d")(x))
    model = keras.Model(x, [keras.layers.Dense(2, name="h_lo")(lo), keras.layers.Dense(2, name="h_hi")(hi)])
    data = np.random.default_rng(4).normal(size=(2, 5)).astype("float32")
    return model, data


def test_layer_with_two_outputs_exposes_each(two_output_model):
    import keras

    model, x = two_output_model
    graph = ModelGraph(model)
    assert graph.paths() == ["x", "d", "split:0", "split:1", "h_lo", "h_hi"]
    got = _extract(graph, ["split", "h_hi"], x)
    d = keras.Model(model.inputs, model.get_layer("d").output).predict(x, verbose=0)
    _close(got["split:0"], d[:, :2])
    _close(got["split:1"], d[:, 2:] * 2.0)
    assert [s.name for s in graph.select(["split:1"])] == ["split:1"]


# --------------------------------------------------------------------------- Dropout and BatchNormalization


def test_dropout_and_batchnorm_run_in_inference_mode():
    import keras

    keras.utils.set_random_seed(16)
    x = keras.Input((8, 8, 3), name="x")
    h = keras.layers.Conv2D(4, 3, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.Flatten(name="flat")(h)))
    bn = model.get_layer("bn")
    rng = np.random.default_rng(5)
    bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
    data = rng.normal(size=(2, 8, 8, 3)).astype("float32")

    got = _extract(ModelGraph(model), ["bn", "drop", "out"], data, reduce="none")
    conv = keras.Model(model.inputs, model.get_layer("conv").output).predict(data, verbose=0)
    # inference-mode BN from its moving statistics, in numpy
    ref_bn = (conv - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    _close(got["bn"], ref_bn)
    _close(got["drop"], ref_bn)  # Dropout is the identity at inference
    _close(got["out"], model(data, training=False))
    training = keras.Model(model.inputs, model.get_layer("bn").output)(data, training=True)
    assert not np.allclose(got["bn"], training, atol=1e-2)  # training mode would differ


# --------------------------------------------------------------------------- subclassed models


class _Sub:
    """Holder so the subclassed model class is defined once, lazily (Keras import)."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import keras

            class TwoDense(keras.Model):
                def __init__(self, **kw):
                    super().__init__(**kw)
                    self.a = keras.layers.Dense(4, name="a")
                    self.b = keras.layers.Dense(2, name="b")

                def call(self, x):
                    return self.b(keras.ops.relu(self.a(x)))

            cls.cls = TwoDense
        return cls.cls


def test_subclassed_model_is_refused_with_the_reason_and_the_fix():
    model = _Sub.get()(name="mine")
    model.build((None, 3))
    with pytest.raises(ModelError) as e:
        ModelGraph(model, input_shapes=[(3,)])
    msg = str(e.value)
    assert "'mine' is a subclassed keras.Model" in msg and "no graph to follow" in msg
    assert "functional API" in msg and "keras.Model(x, model(x))" in msg and "\n" not in msg


def test_subclassed_model_inside_a_functional_model_is_tapped_whole():
    import keras

    keras.utils.set_random_seed(17)
    sub = _Sub.get()(name="mine")
    x = keras.Input((3,), name="x")
    model = keras.Model(x, keras.layers.Dense(1, name="top")(sub(x)))
    data = np.random.default_rng(6).normal(size=(2, 3)).astype("float32")
    graph = ModelGraph(model)
    assert graph.paths() == ["x", "mine", "top"]
    got = _extract(graph, ["all"], data)
    _close(got["mine"], sub(data))
    with pytest.raises(SelectionError, match="'mine' is a subclassed model, tapped only as a whole"):
        graph.select(["mine/a"])


def test_functional_subclass_with_its_own_call_is_not_trusted():
    import keras

    class Doubled(keras.Model):
        def call(self, x):  # overrides the graph: the layers' outputs are not what it returns
            return super().call(x) * 2.0

    x = keras.Input((3,), name="x")
    model = Doubled(x, keras.layers.Dense(2, name="d")(x), name="doubled")
    with pytest.raises(ModelError, match="subclassed keras.Model"):
        ModelGraph(model)
