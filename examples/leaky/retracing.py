"""Leak: a hand-written @tf.function train step retraced for every new sequence length.

Each new input shape traces (and keeps) a new graph: about 8 MiB per length here. The doctor names the
function and the argument whose shape varied. Fix: SafeTrainer(model).fit(...) traces once.
"""

import keras
import numpy as np
import tensorflow as tf

rng = np.random.default_rng(0)
model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(16), keras.layers.Dense(1)])
optimizer = keras.optimizers.Adam()
loss_fn = keras.losses.MeanSquaredError()


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


for epoch in range(2):
    for length in range(10, 30):  # sequences of 20 different lengths
        x = rng.standard_normal((8, length, 4)).astype("float32")
        y = rng.standard_normal((8, 1)).astype("float32")
        loss = train_step(x, y)
    print(f"epoch {epoch}: loss {float(loss):.4f}")
