"""Leak: a callback that keeps a copy of the weights after every batch.

Nothing in TensorFlow grows; a Python list of NumPy arrays does (about 0.07 MiB per batch, 26 MiB in all
here). The doctor names the object types that grew, who holds them (KeepWeights.snapshots) and the line that
appends to it. Fix: keep numbers (float(logs["loss"])), not arrays or tensors.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((2048, 32)).astype("float32")
y = x[:, :1] * 2.0


class KeepWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = []

    def on_train_batch_end(self, batch, logs=None):
        self.snapshots.append([w.numpy().copy() for w in self.model.trainable_weights])


model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(512, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
keeper = KeepWeights()
model.fit(x, y, batch_size=32, epochs=6, verbose=0, callbacks=[keeper])
print(f"kept {len(keeper.snapshots)} weight snapshots")
