"""A stateful LSTM over long sequences cut into windows, with its state reset at each epoch by a policy."""

import keras
import numpy as np

from safetrain import ResetStates, SafeTrainer

BATCH, WINDOW = 8, 20
rng = np.random.default_rng(0)
# 8 long sine waves (one per batch row), cut into consecutive windows: row i of every batch continues row i.
t = np.arange(BATCH * 1001).reshape(BATCH, -1) * 0.05 + rng.uniform(0, 6, (BATCH, 1))
waves = np.sin(t).astype("float32")
windows = waves[:, :-1].reshape(BATCH, -1, WINDOW).transpose(1, 0, 2).reshape(-1, WINDOW, 1)
targets = waves[:, WINDOW::WINDOW].T.reshape(-1, 1)  # the value right after each window

model = keras.Sequential(
    [keras.Input((WINDOW, 1), batch_size=BATCH), keras.layers.LSTM(16, stateful=True), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse")

trainer = SafeTrainer(model, policies=[ResetStates("epoch")])  # state carries across batches, not epochs
history = trainer.fit(windows, targets, batch_size=BATCH, epochs=3, shuffle=False, verbose=2)
print(
    "final loss:", round(history.history["loss"][-1], 5), "| train step traced", trainer.trace_counts["train"], "time"
)
