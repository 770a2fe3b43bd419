"""Hyper-parameter search that builds, compiles and fits a new tf.keras model per trial.

Report: https://github.com/keras-team/keras/issues/9345
Known answer: models_in_loop
Expected lines: 29

Each trial builds a fresh network with its own width, learning rate and momentum, compiles it and fits it for
one epoch; nothing is released between trials (no clear_session). Every fit traces a new train function, and
TensorFlow keeps each traced graph registered (the optimizer's gradient all-reduce is a tf.custom_gradient),
so the old graphs and the weights and momentum slots they captured are never freed even though the old model
objects are: resident memory climbs by about 10 MiB per trial.
"""

import tensorflow as tf

# isort: split
import numpy as np

tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((768, 512)).astype("float32")
y = (x[:, :4].sum(axis=1, keepdims=True) > 0).astype("float32")

results = []
for trial in range(9):
    units = int(rng.choice([1536, 2048]))
    learning_rate = float(10 ** rng.uniform(-3, -1))
    momentum = float(rng.uniform(0.5, 0.95))
    model = tf.keras.Sequential(
        [
            tf.keras.Input((512,)),
            tf.keras.layers.Dense(units, activation="relu"),
            tf.keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate, momentum=momentum), loss="binary_crossentropy")
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    results.append((history.history["loss"][-1], trial, units, learning_rate, momentum))

loss, trial, units, learning_rate, momentum = min(results)
print(f"best loss {loss:.3f} (trial {trial}: units {units}, learning rate {learning_rate:.1e}, momentum {momentum:.2})")
