"""Custom training loop whose tf.function step has an input_signature, so a short last batch does not retrace.

Report: https://github.com/tensorflow/tensorflow/issues/49151
Known answer: none

The dataset (1000 rows, batches of 64) ends every epoch with a smaller batch of 40 rows, the usual cause of
"N out of the last N calls triggered tf.function retracing". Here the train step is declared with an
input_signature whose batch dimension is None, so it is traced once and serves both batch sizes for all 25 epochs.
Losses are kept as Python floats, so nothing accumulates and memory stays flat after the first epoch.
"""

import keras
import numpy as np
import tensorflow as tf

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((1000, 32)).astype("float32")
y_train = (x_train @ rng.standard_normal((32, 1)).astype("float32")).ravel()

model = keras.Sequential(
    [
        keras.Input((32,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1),
    ]
)
optimizer = keras.optimizers.Adam(1e-3)
loss_fn = keras.losses.MeanSquaredError()
optimizer.build(model.trainable_variables)  # its slots exist before the first trace


@tf.function(input_signature=[tf.TensorSpec([None, 32], tf.float32), tf.TensorSpec([None], tf.float32)])
def train_step(x, y):
    with tf.GradientTape() as tape:
        prediction = tf.squeeze(model(x, training=True), axis=-1)
        loss = loss_fn(y, prediction)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


batch_size = 64
epoch_losses = []
for _epoch in range(25):
    order = rng.permutation(len(x_train))
    batch_losses = []
    for start in range(0, len(x_train), batch_size):  # the last batch has 1000 % 64 = 40 rows
        index = order[start : start + batch_size]
        batch_losses.append(float(train_step(x_train[index], y_train[index])))
    epoch_losses.append(float(np.mean(batch_losses)))

print(
    f"{len(epoch_losses)} epochs, {train_step.experimental_get_tracing_count()} trace(s), loss {epoch_losses[-1]:.4f}"
)
