"""Leak: a fresh model per fold, trained with model.fit in a loop.

Every fit leaves its traced train step and optimizer functions alive: about 6 MiB per model here, even
with keras.backend.clear_session(). Fix: SafeTrainer(build_model) per fold, or safetrain.run_isolated.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 16)).astype("float32")
y = x[:, :1] * 2.0

for fold in range(8):
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    print(f"fold {fold}: loss {model.evaluate(x, y, verbose=0):.4f}")
