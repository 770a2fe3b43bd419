"""A classifier whose callback predicts the validation set at every epoch end, 40 epochs, and keeps every result.

Report: https://github.com/keras-team/keras/issues/13118
Known answer: python_accumulation
Expected lines: 32

The case issue 24 names: a callback calls self.model.predict on 2000 validation rows once per epoch for 40 epochs
and appends the scores (2000 x 100 float32, about 0.8 MiB) to a list, to plot how they evolve. What grows is the
list of arrays the callback keeps; predict is called once per epoch, far from the hundreds of small calls that make
Keras's per-call cost visible. The doctor used to name both Python-side accumulation (right) and predict in a loop
(wrong: a small residue per call "that no live object holds", while the kept arrays hold about 30 MiB), whose fix
(`model(x, training=False)`) would not help. Keeping a summary per epoch (an accuracy, a mean) keeps memory flat.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((512, 64)).astype("float32")
y_train = rng.integers(0, 100, 512)
x_val = rng.standard_normal((2000, 64)).astype("float32")


class KeepScores(keras.callbacks.Callback):
    def __init__(self, x):
        super().__init__()
        self.x = x
        self.scores = []  # one (2000, 100) array per epoch

    def on_epoch_end(self, epoch, logs=None):
        self.scores.append(self.model.predict(self.x, verbose=0))


model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(100)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
keeper = KeepScores(x_val)
model.fit(x_train, y_train, batch_size=128, epochs=40, verbose=0, callbacks=[keeper])
print(f"kept {len(keeper.scores)} score arrays of {keeper.scores[0].nbytes / 2**20:.2f} MiB")
