"""`all` layers of ten keras.applications architectures, mean-reduced, equal an independent
reference computed with Keras's own API, layer by layer.

The reference does not use layerbeam's tracer: it is `keras.Model(model.inputs,
[op.output for op in model.operations])` on the ORIGINAL model (valid for these models,
where every layer and op is called once at the top level), then a numpy mean over the
spatial axes. ConvNeXt nests Sequential sub-models (stem, downsampling blocks): their
inner layers are referenced by calling each inner layer eagerly, in order, on the
reference value of the Sequential's input.

Random weights, batch of 2, the smallest input each architecture accepts (InceptionV3
needs 75 px, Xception 71 px; the others run at 32 px), include_top=True so the heads
(pooling, dense, softmax) are covered too.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from layerbeam.transforms.extractor import Extractor, extractor_model
from layerbeam.transforms.layers import ModelGraph

ARCHITECTURES = {
    "ResNet50": 32,
    "MobileNetV2": 32,
    "MobileNetV3Small": 32,
    "EfficientNetB0": 32,
    "DenseNet121": 32,
    "InceptionV3": 75,
    "Xception": 71,
    "ConvNeXtTiny": 32,
    "NASNetMobile": 32,
    "VGG16": 32,
}

# float32 on CPU: the extractor and the reference run the same kernels on the same
# weights, so per-layer outputs agree to a few ulps; differences come from the mean
# (layerbeam reduces in-graph, the reference in numpy, in another summation order) and
# from oneDNN picking other kernels for a graph of another shape. Random-weight deep nets
# reach activations in the thousands, so the tolerance is relative to each layer's own
# scale: |got - ref| <= 1e-4 * (|ref| + max|ref of that layer|). A wrong tensor (another
# layer, another call, training-mode BN) is off by O(1) of that scale.
RTOL = 1e-4  # measured worst case: 2e-6 (EfficientNetB0, MobileNetV3Small)


def _reference(model, x):
    """{expected output name: mean-reduced reference array}, in the documented order."""
    import keras

    ops = [op for op in model.operations if not isinstance(op, keras.layers.InputLayer)]
    nested = [op for op in ops if isinstance(op, keras.Sequential)]
    tensors = [op.output for op in ops] + [op.input for op in nested]
    values = keras.Model(model.inputs, tensors)(x, training=False)
    values = [np.asarray(v) for v in values]
    by_op = dict(zip([op.name for op in ops], values[: len(ops)]))
    nested_in = dict(zip([op.name for op in nested], values[len(ops) :]))
    out = {}
    for op in ops:
        if isinstance(op, keras.Sequential):  # `all` lists the inner layers, not the sub-model
            h = nested_in[op.name]
            for layer in op.layers:
                h = np.asarray(layer(h, training=False))
                out[f"{op.name}/{layer.name}"] = h
        else:
            out[op.name] = by_op[op.name]
    return {k: v.mean(axis=tuple(range(1, v.ndim - 1))) if v.ndim > 2 else v for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_all_layers_mean_equal_keras_reference(name):
    import keras

    size = ARCHITECTURES[name]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    ref = _reference(model, x)

    graph = ModelGraph(model)
    specs = graph.select(["all"], reduce="mean")
    got = Extractor(extractor_model(graph, specs))({graph.input_names[0]: x})

    # every layer call, once, in model.layers order (nested Sequentials expanded in place)
    assert list(got) == list(ref)
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape and g.dtype == np.float32, k
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        err = np.abs(g - r) / (np.abs(r) + scale + 1e-30)
        worst = max(worst, float(err.max()) if err.size else 0.0)
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=RTOL * scale, err_msg=f"{name}: {k}")
    print(f"{name}: {len(ref)} outputs, worst relative error {worst:.1e}")
    del model, graph, got, ref
    gc.collect()
