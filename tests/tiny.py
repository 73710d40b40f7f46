"""A tiny functional CNN saved as a .keras file, and config helpers, for the bad-data and
resume tests (fast to load in every subprocess)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import with_overrides

SIZE = 32


def save_tiny_model(path: Path) -> Path:
    """Input 32×32×3 → conv1 (4, 3×3, relu) → conv2 (6, 3×3, stride 2) → pool; seeded."""
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, name="conv2")(x)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inp, out, name="tiny")
    model.save(path)
    return path


def tiny_config(pattern: str, out: str, model: Path, **overrides) -> dict:
    cfg = {
        "input": {"pattern": pattern, "key_feature": "image/key", "label_feature": "image/class/label", "preprocess": "none"},
        "model": {"source": str(model)},
        "layers": {"select": ["conv1"], "reduce": "mean"},
        "batching": {"batch_size": 4},
        "output": {"path": out},
    }
    return with_overrides(cfg, **overrides)


def reference(model_path: Path, layer: str, images: np.ndarray) -> np.ndarray:
    """Keras's own predict on a sub-model up to `layer`, spatial mean: the reference."""
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    return sub.predict(np.asarray(images, np.float32), verbose=0).mean(axis=(1, 2))


def unnamed_input_model():
    """A seeded `module:function` model whose input Keras names itself: built twice in one
    process, the copies' inputs get different names (`input_layer`, `input_layer_1`)."""
    import keras

    keras.utils.set_random_seed(11)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="pool")(x))


def branchy_preprocess(x):
    """A user's `input.preprocess` that branches on a tensor in Python (needs AutoGraph)."""
    import tensorflow as tf

    if tf.reduce_max(x) > 1.0:
        return x / 255.0
    return x
