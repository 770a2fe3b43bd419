"""No leak: one model, trained with model.fit for several epochs, then one predict call.

python examples/leaky/clean.py [EPOCHS]     (default 10)
"""

import sys

import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((4096, 32)).astype("float32")
y = x[:, :1] * 2.0

model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
history = model.fit(
    x, y, batch_size=32, epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 10, validation_split=0.1, verbose=0
)
predictions = model.predict(x, batch_size=256, verbose=0)
print(f"final loss {history.history['loss'][-1]:.4f}, {len(predictions)} predictions")
