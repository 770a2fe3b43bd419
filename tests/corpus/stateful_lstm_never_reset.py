"""A stateful LSTM forecaster trained for several epochs with model.fit, its state never reset.

Report: https://github.com/keras-team/keras/issues/2849
Known answer: none
Warnings: stateful_not_reset

A sine-plus-noise series is cut into 32 parallel streams of consecutive windows, so that row i of every batch
continues row i of the previous batch; the LSTM is stateful with a fixed batch_shape and fit runs with
shuffle=False for 12 epochs. model.fit never resets RNN state and the script never calls reset_state(), so each
epoch starts from the state left by the end of the previous one. That is a training-correctness problem, not a
memory leak: memory is flat after the first epoch.
"""

import tensorflow as tf

# isort: split
import numpy as np

tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
BATCH, STEPS, WINDOWS = 32, 16, 24
t = np.arange(BATCH * WINDOWS * STEPS + 1, dtype="float32")
series = np.sin(t / 20.0) + 0.1 * rng.standard_normal(t.shape).astype("float32")
streams = series[:-1].reshape(BATCH, WINDOWS, STEPS)
targets = series[1:].reshape(BATCH, WINDOWS, STEPS)[:, :, -1:]
# Batch w holds window w of every stream: rows line up from one batch to the next.
x = streams.transpose(1, 0, 2).reshape(-1, STEPS, 1)
y = targets.transpose(1, 0, 2).reshape(-1, 1)

model = tf.keras.Sequential(
    [tf.keras.Input(batch_shape=(BATCH, STEPS, 1)), tf.keras.layers.LSTM(32, stateful=True), tf.keras.layers.Dense(1)]
)
model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
losses = model.fit(x, y, batch_size=BATCH, epochs=12, shuffle=False, verbose=0).history["loss"]
print(f"{len(losses)} epochs, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
