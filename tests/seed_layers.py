"""The seed article's custom layer (example 2), made serializable, registered with Keras
on import: what a user's own module passed in `model.custom_objects` looks like."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="seed")
class ConditionalOutput(keras.layers.Layer):
    """Returns the `index`-th of its inputs (the article's layer, plus get_config)."""

    def __init__(self, index, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, inputs):
        return inputs[self.index]

    def get_config(self):
        return {**super().get_config(), "index": self.index}
