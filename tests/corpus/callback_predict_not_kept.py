"""Autoencoder whose callback predicts the validation set every epoch but keeps only the reconstruction error.

Report: https://github.com/keras-team/keras/issues/13118
Known answer: none

The same training as callback_keeps_predictions.py: a dense autoencoder fit for 20 epochs, with a callback that
calls self.model.predict on the 2000 validation rows at every epoch end. Here the callback reduces the
reconstructions to one float (the mean squared error) and drops the array, so nothing accumulates. One predict per
epoch is far from the hundreds of small predicts that make Keras's per-call cost visible, and memory stays flat
after the first epoch.
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
model.fit(x_train, x_train, batch_size=256, epochs=20, verbose=0, callbacks=[tracker])

print(f"validation error {tracker.errors[0]:.4f} -> {tracker.errors[-1]:.4f} over {len(tracker.errors)} epochs")
