"""Gradient accumulation whose tf.function step takes Python flags: a few traces in the first epoch, then none.

Report: https://github.com/tensorflow/tensorflow/issues/32157
Known answer: none

The step is called with a Python bool (training) and a Python int (micro_step = step % 4, for accumulating
gradients over four micro-batches), the pattern behind "non-tensor argument to tf.function". Each distinct value
is a new trace, but there are only five combinations (four training micro-steps and one evaluation call), all
seen in the first epoch; from then on every call reuses a cached graph, so memory stays flat for the remaining
epochs. Retracing that stops is not a leak.
"""

import keras
import numpy as np
import tensorflow as tf

ACCUMULATE = 4
rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((1024, 24)).astype("float32")
y_train = (x_train[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")
x_val = rng.standard_normal((256, 24)).astype("float32")
y_val = (x_val[:, :3].sum(axis=1, keepdims=True) > 0).astype("float32")

model = keras.Sequential(
    [keras.Input((24,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.1), keras.layers.Dense(1)]
)
optimizer = keras.optimizers.Adam(1e-3)
optimizer.build(model.trainable_variables)
loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
accumulated = [tf.Variable(tf.zeros_like(v), trainable=False) for v in model.trainable_variables]


@tf.function
def run_step(x, y, training, micro_step):
    if not training:  # Python bool: decided at trace time
        return loss_fn(y, model(x, training=False))
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for total, grad in zip(accumulated, grads):
        if micro_step == 0:  # Python int: each value is its own trace
            total.assign(grad / ACCUMULATE)
        else:
            total.assign_add(grad / ACCUMULATE)
    if micro_step == ACCUMULATE - 1:
        optimizer.apply_gradients(zip(accumulated, model.trainable_variables))
    return loss


batch_size = 32
history = []
for _epoch in range(30):
    order = rng.permutation(len(x_train))
    for step in range(len(x_train) // batch_size):
        index = order[step * batch_size : (step + 1) * batch_size]
        run_step(x_train[index], y_train[index], training=True, micro_step=step % ACCUMULATE)
    history.append(float(run_step(x_val, y_val, training=False, micro_step=0)))

print(f"val loss {history[-1]:.4f} after {len(history)} epochs, {run_step.experimental_get_tracing_count()} traces")
