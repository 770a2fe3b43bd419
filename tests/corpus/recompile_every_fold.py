"""Rolling cross-validation that re-compiles one model before every fold.

Report: https://github.com/keras-team/keras/issues/9151
Known answer: recompiling
Expected lines: 29

One network is built once; before each of 12 folds the script calls model.compile() again (a fresh SGD
optimizer with a decayed learning rate) and fits one epoch on that fold's window of the data. Each compile
throws away the traced train function, so every fit traces a new one, and the old traces stay registered with
TensorFlow together with the optimizer slots they captured: resident memory grows by several MiB per fold.
"""

import keras
import numpy as np

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((4096, 512)).astype("float32")
y = (x[:, :4].sum(axis=1, keepdims=True) > 0).astype("float32")

model = keras.Sequential(
    [keras.Input((512,)), keras.layers.Dense(2048, activation="relu"), keras.layers.Dense(1, activation="sigmoid")]
)

folds, window = 12, 192
losses = []
for fold in range(folds):
    start = fold * (len(x) - window) // (folds - 1)
    model.compile(optimizer=keras.optimizers.SGD(0.05 * 0.95**fold, momentum=0.9), loss="binary_crossentropy")
    history = model.fit(x[start : start + window], y[start : start + window], batch_size=64, epochs=1, verbose=0)
    losses.append(history.history["loss"][-1])

print(f"{folds} folds, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
