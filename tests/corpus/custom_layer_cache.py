"""Custom layer that records its inputs and outputs on every call "for debugging", in a model run eagerly.

Report: https://github.com/tensorflow/tensorflow/pull/33441
Known answer: python_accumulation
Expected lines: 27, 26

A Dense subclass keeps (inputs, outputs) of each call in a Python list attribute so that activations can be
inspected after training, and the model is compiled with run_eagerly=True to make that debugging possible. Every
training step therefore appends two real tensors (about 1.25 MiB per step here) that the layer keeps alive, so
memory grows step after step for the whole fit; the same happened inside Keras when TimeDistributed kept a map
entry per input. Recording a summary (a float mean, a histogram) or clearing the list each epoch keeps memory flat.
"""

import keras
import numpy as np


class RecordingDense(keras.layers.Dense):
    """A Dense layer that remembers what went in and out of it."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.recorded = []

    def call(self, inputs):
        outputs = super().call(inputs)
        self.recorded.append((inputs, outputs))
        return outputs


rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((2048, 256)).astype("float32")
y_train = (x_train[:, :8].sum(axis=1) > 0).astype("float32")

recorder = RecordingDense(1024, activation="relu")
model = keras.Sequential([keras.Input((256,)), recorder, keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
history = model.fit(x_train, y_train, batch_size=256, epochs=10, verbose=0)

print(f"loss {history.history['loss'][-1]:.4f}, {len(recorder.recorded)} recorded calls")
