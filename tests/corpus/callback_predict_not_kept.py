"""Autoencoder whose callback predicts the validation set every epoch but keeps only the reconstruction error.

Report: https://github.com/keras-team/keras/issues/13118
Known answer: none

The training of callback_keeps_predictions.py, for 40 epochs: a dense autoencoder with a callback that calls
self.model.predict on the 2000 validation rows at every epoch end. Here the callback reduces the reconstructions to
one float (the mean squared error) and drops the array, so nothing accumulates. One predict per epoch is far from
the hundreds of small predicts that make Keras's per-call cost visible. Measured plainly (RssAnon per epoch, 80
epochs): +23 MiB over epochs 1-5 (the allocator warming up to predict's buffers), then +0.27 MiB per epoch, slowing.
Over 20 epochs that warm-up was most of what the doctor saw, and it read it as allocator growth (3 runs of 3, on
2 cores); 40 epochs show the warm-up end.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
basis = rng.standard_normal((16, 784)).astype("float32")
x_train = np.tanh(rng.standard_normal((512, 16)).astype("float32") @ basis / 4)
x_val = np.tanh(rng.standard_normal((2000, 16)).astype("float32") @ basis / 4)


class ValidationError(keras.callbacks.Callback):
    def __init__(self, x):
        super().__init__()
        self.x = x
        self.errors = []  # one float per epoch

    def on_epoch_end(self, epoch, logs=None):
        reconstruction = self.model.predict(self.x, batch_size=1000, verbose=0)
        self.errors.append(float(np.mean((reconstruction - self.x) ** 2)))


model = keras.Sequential(
    [
        keras.Input((784,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(16),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(784, activation="tanh"),
    ]
)
model.compile(optimizer="adam", loss="mse")
tracker = ValidationError(x_val)
model.fit(x_train, x_train, batch_size=256, epochs=40, verbose=0, callbacks=[tracker])

print(f"validation error {tracker.errors[0]:.4f} -> {tracker.errors[-1]:.4f} over {len(tracker.errors)} epochs")
