"""Autoencoder whose callback predicts the validation set every epoch and keeps every reconstruction.

Report: https://github.com/microsoft/InnerEye-DeepLearning/pull/209
Known answer: python_accumulation
Expected lines: 30

A dense autoencoder is trained with model.fit for 20 epochs; a callback calls self.model.predict on the 2000
validation rows at every epoch end and appends the reconstructions (a 2000 x 784 float32 array, about 6 MiB) to a
list, to animate training progress afterwards. predict is called only once per epoch; what grows is the list of
arrays it keeps, by about 6 MiB per epoch for the whole run. Keeping a summary (an error, a few rows) keeps memory flat.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
basis = rng.standard_normal((16, 784)).astype("float32")
x_train = np.tanh(rng.standard_normal((512, 16)).astype("float32") @ basis / 4)
x_val = np.tanh(rng.standard_normal((2000, 16)).astype("float32") @ basis / 4)


class KeepReconstructions(keras.callbacks.Callback):
    def __init__(self, x):
        super().__init__()
        self.x = x
        self.reconstructions = []  # one full validation reconstruction per epoch

    def on_epoch_end(self, epoch, logs=None):
        self.reconstructions.append(self.model.predict(self.x, batch_size=1000, verbose=0))


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
keeper = KeepReconstructions(x_val)
model.fit(x_train, x_train, batch_size=256, epochs=20, verbose=0, callbacks=[keeper])

errors = [float(np.mean((r - x_val) ** 2)) for r in keeper.reconstructions]
print(f"validation error {errors[0]:.4f} -> {errors[-1]:.4f} over {len(errors)} epochs")
