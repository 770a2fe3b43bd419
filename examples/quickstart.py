"""Drop-in replacement for model.fit: the same arguments, callbacks and History; memory in `trainer.memory`."""

import keras
import numpy as np

from safetrain import SafeTrainer

rng = np.random.default_rng(0)
x = rng.standard_normal((4000, 20)).astype("float32")
y = (x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * rng.standard_normal((4000, 1))).astype("float32")

model = keras.Sequential(
    [keras.Input((20,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.1), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse", metrics=["mae"])

trainer = SafeTrainer(model)  # was: history = model.fit(...)
history = trainer.fit(
    x,
    y,
    batch_size=64,
    epochs=5,
    validation_split=0.2,
    verbose=2,
    callbacks=[keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)],
)

print("val_loss per epoch:", [round(v, 4) for v in history.history["val_loss"]])
print("rss_mb per epoch:  ", [round(v, 1) for v in trainer.memory.series("rss_mb")])
print("trace counts:", trainer.trace_counts)  # {'train': 1, 'test': 1, 'predict': 0}
print("test loss, mae:", trainer.evaluate(x[:500], y[:500], verbose=0))
print("predictions:", trainer.predict(x[:3], verbose=0).ravel())
