"""One model compiled once, trained by calling model.fit(epochs=1) thirty times in a Python loop.

Report: https://github.com/tensorflow/tensorflow/issues/37505
Known answer: none

A hand-made schedule: before each call the script sets the optimizer's learning rate (a variable, so nothing
is re-traced) and then runs one epoch with model.fit. The model is compiled once, so every fit call reuses
the same traced train function; after the first call resident memory stays flat.
"""

import keras
import numpy as np

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((1024, 64)).astype("float32")
y = x[:, :4].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((1024, 1)).astype("float32")

model = keras.Sequential(
    [
        keras.Input((64,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])

losses = []
for epoch in range(30):
    model.optimizer.learning_rate = 1e-3 * 0.5 ** (epoch // 10)
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    losses.append(history.history["loss"][-1])

print(f"{len(losses)} fit calls, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
