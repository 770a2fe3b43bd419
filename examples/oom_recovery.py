"""Out-of-memory recovery: a step too big for the device is retried in microbatches, same update.

No GPU here, so `simulate_oom_above` makes steps on more than 64 samples raise TensorFlow's real
ResourceExhaustedError; on a GPU the real thing takes the same path.
"""

import warnings

import keras
import numpy as np

from safetrain import SafeTrainer, faults

rng = np.random.default_rng(0)
x = rng.standard_normal((2048, 32)).astype("float32")
y = x[:, :1] * 2.0

model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
trainer = SafeTrainer(model)
faults.simulate_oom_above(trainer, 64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = trainer.fit(x, y, batch_size=256, epochs=3, verbose=0)
print(
    f"loss {history.history['loss'][-1]:.4f}; microbatch size {trainer.microbatch_size}; "
    f"OOM events {len(trainer.oom_events)}; warnings: {[type(w.message).__name__ for w in caught][:1]}"
)
