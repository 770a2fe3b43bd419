"""Custom training loop that keeps every step's loss as a scalar tensor: suspicious-looking, but tiny.

Report: https://github.com/tensorflow/tensorflow/issues/21584
Known answer: none

A tf.function train step returns the batch loss, and the loop appends that scalar EagerTensor (not a float) to a
list for a loss curve: a few thousand tensors by the end. It looks like the classic "keeping tensors alive" leak,
but each one holds a single float and no tape or graph (the tape is released when gradient() is called), so the
list costs about a kilobyte per step (2 MiB over the 2560 steps) and memory stays flat after the first epoch.
"""

import keras
import numpy as np
import tensorflow as tf

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((4096, 16)).astype("float32")
y_train = (x_train[:, :2].sum(axis=1, keepdims=True) > 0).astype("float32")

model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
optimizer = keras.optimizers.SGD(0.05)
optimizer.build(model.trainable_variables)
loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)


@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


batch_size = 32
loss_history = []  # scalar tensors, one per step
for _epoch in range(20):
    order = rng.permutation(len(x_train))
    for step in range(len(x_train) // batch_size):
        index = order[step * batch_size : (step + 1) * batch_size]
        loss_history.append(train_step(x_train[index], y_train[index]))

curve = np.array([float(loss) for loss in loss_history])
print(f"{len(curve)} steps, mean loss first epoch {curve[:128].mean():.4f}, last epoch {curve[-128:].mean():.4f}")
