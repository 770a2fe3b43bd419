"""Hyper-parameter search that clears the Keras session and drops the model after every trial.

Report: https://github.com/maxpumperla/hyperas/issues/259
Known answer: none

Each trial calls tf.keras.backend.clear_session(), builds a fresh network with its own width, learning rate and
momentum, fits it for one epoch and deletes it. The models are compiled with run_eagerly=True (kept from debugging
the search), so no train function is traced: once the model is dropped, nothing of it stays reachable and resident
memory is flat after the first trials. (With traced train functions, clear_session alone does not stop the growth:
each trace stays registered with TensorFlow's gradient registry.)
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
    tf.keras.backend.clear_session()
    units = int(rng.choice([128, 256]))
    learning_rate = float(10 ** rng.uniform(-3, -1))
    momentum = float(rng.uniform(0.5, 0.95))
    model = tf.keras.Sequential(
        [
            tf.keras.Input((512,)),
            tf.keras.layers.Dense(units, activation="relu"),
            tf.keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.SGD(learning_rate, momentum=momentum),
        loss="binary_crossentropy",
        run_eagerly=True,
    )
    history = model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    results.append((history.history["loss"][-1], trial, units, learning_rate, momentum))
    del model

loss, trial, units, learning_rate, momentum = min(results)
print(f"best loss {loss:.3f} (trial {trial}: units {units}, learning rate {learning_rate:.1e}, momentum {momentum:.2})")
