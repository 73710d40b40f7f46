"""The seed article's examples 1 and 3, built as written there (layers unnamed, its seeds),
shared by the API tests (`layerbeam.extract`) and the CLI tests (`layerbeam run`)."""

from __future__ import annotations


def seed_example_1():
    """The seed article's example 1: a CNN on 28×28×1 with outputs [softmax, conv1, pool2]
    (its layers unnamed, as written there). Returns (model, conv1 layer, pool2 layer)."""
    import keras
    from keras.layers import Conv2D, Dense, Flatten, MaxPooling2D

    keras.utils.set_random_seed(1)
    input_layer = keras.Input(shape=(28, 28, 1))
    conv1 = Conv2D(32, (3, 3), activation="relu")(input_layer)
    pool1 = MaxPooling2D((2, 2))(conv1)
    conv2 = Conv2D(64, (3, 3), activation="relu")(pool1)
    pool2 = MaxPooling2D((2, 2))(conv2)
    flatten = Flatten()(pool2)
    dense1 = Dense(128, activation="relu")(flatten)
    output_layer = Dense(10, activation="softmax")(dense1)
    model = keras.Model(inputs=input_layer, outputs=[output_layer, conv1, pool2])
    return model, conv1._keras_history.operation, pool2._keras_history.operation


def seed_example_3():
    """The seed article's example 3: two 28×28×1 inputs, a conv branch each, merged.
    Returns (model, branch_a's pooling layer, branch_b's pooling layer)."""
    import keras
    from keras.layers import Conv2D, Dense, Flatten, Input, MaxPooling2D, concatenate

    keras.utils.set_random_seed(3)
    input_a = Input(shape=(28, 28, 1))
    input_b = Input(shape=(28, 28, 1))
    branch_a = MaxPooling2D((2, 2))(Conv2D(32, (3, 3), activation="relu")(input_a))
    branch_b = MaxPooling2D((2, 2))(Conv2D(32, (3, 3), activation="relu")(input_b))
    merged = concatenate([branch_a, branch_b])
    dense1 = Dense(128, activation="relu")(Flatten()(merged))
    output = Dense(10, activation="softmax")(dense1)
    model = keras.Model(inputs=[input_a, input_b], outputs=[output, branch_a, branch_b])
    return model, branch_a._keras_history.operation, branch_b._keras_history.operation
