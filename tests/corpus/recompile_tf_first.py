"""Learning-rate sweep that re-compiles the same model with a new optimizer at every step.

Report: https://github.com/keras-team/keras/issues/16320
Known answer: recompiling
Expected lines: 28

A crude learning-rate range test: one network, and for each of 12 learning rates (1e-4 to 1) the script calls
model.compile() with a new momentum SGD optimizer and fits one epoch, recording the loss. Each compile drops
the traced train function, the next fit traces a new one, and the old traces stay registered with TensorFlow
along with the optimizer slots they captured, so resident memory climbs with every sweep step.
"""

import tensorflow as tf

# isort: split
import keras
import numpy as np

tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((512, 512)).astype("float32")
y = x[:, :4].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((512, 1)).astype("float32")

model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2048, activation="relu"), keras.layers.Dense(1)])

sweep = []
for learning_rate in np.geomspace(1e-4, 1.0, 12):
    model.compile(optimizer=keras.optimizers.SGD(float(learning_rate), momentum=0.9), loss="mse")
    history = model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    sweep.append((float(learning_rate), history.history["loss"][-1]))

finite = [(lr, loss) for lr, loss in sweep if np.isfinite(loss)]
print(f"{len(sweep)} learning rates, lowest loss {min(loss for _, loss in finite):.3f}")
