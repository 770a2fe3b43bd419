"""An autoencoder whose callback keeps the validation reconstructions of every epoch as tf tensors.

Report: https://github.com/tensorflow/tensorflow/issues/59218
Known answer: python_accumulation
Expected lines: 30

A callback meant for a later "how the reconstructions evolved" plot calls self.model(x_val) at the end of
each of 25 epochs and appends the result, an EagerTensor of 2000 x 512 floats (about 4 MiB), to a list. The
training itself is clean; the list keeps every epoch's tensor alive, so resident memory grows by roughly 4 MiB
per epoch. Keeping a summary number per epoch, or one NumPy copy at the end, would not.
"""

import keras
import numpy as np

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
basis = rng.standard_normal((16, 512)).astype("float32")
x_train = rng.standard_normal((2048, 16)).astype("float32") @ basis
x_val = rng.standard_normal((2000, 16)).astype("float32") @ basis


class KeepReconstructions(keras.callbacks.Callback):
    def __init__(self, x):
        super().__init__()
        self.x = x
        self.reconstructions = []

    def on_epoch_end(self, epoch, logs=None):
        self.reconstructions.append(self.model(self.x, training=False))


model = keras.Sequential(
    [
        keras.Input((512,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(16),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(512),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
keeper = KeepReconstructions(x_val)
model.fit(x_train, x_train, batch_size=128, epochs=25, verbose=0, callbacks=[keeper])
errors = [float(np.mean((r.numpy() - x_val) ** 2)) for r in keeper.reconstructions]
print(f"kept {len(keeper.reconstructions)} reconstructions, error {errors[0]:.3f} -> {errors[-1]:.3f}")
