"""Custom tf.function train step that takes the decayed learning rate as a Python float: a new graph every epoch.

Report: https://github.com/yerkojahve/Meta-Pseudo-label/issues/1
Known answer: retracing
Expected lines: 49, 32

A bag-of-embeddings text classifier (frozen pretrained vectors held as a NumPy array, looked up inside the step)
is trained with a hand-written SGD step, and the learning rate is decayed every epoch and passed in as a Python
float. A Python value is part of the trace key, so each of the 40 epochs traces and keeps a new concrete function,
each with its own copy of the graph and of the constants it captured (the 0.5 MiB embedding table). Memory grows
by a few MiB per epoch for the whole run; passing tf.constant(lr) or using a tf.Variable traces once.
"""

import tensorflow as tf  # TensorFlow first: the tf.keras path

# isort: split
import numpy as np

VOCAB, DIM, LENGTH = 2048, 64, 24
rng = np.random.default_rng(0)
tf.keras.utils.set_random_seed(0)
pretrained = rng.standard_normal((VOCAB, DIM)).astype("float32")  # frozen word vectors
token_ids = rng.integers(0, VOCAB, size=(512, LENGTH)).astype("int32")
labels = (pretrained[token_ids].mean(axis=1)[:, :4].sum(axis=1, keepdims=True) > 0).astype("float32")

model = tf.keras.Sequential(
    [tf.keras.Input((DIM,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(1)]
)


@tf.function
def train_step(ids, y, learning_rate):
    features = tf.reduce_mean(tf.nn.embedding_lookup(pretrained, ids), axis=1)
    with tf.GradientTape() as tape:
        logits = model(features, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads):
        variable.assign_sub(learning_rate * grad)
    return loss


batch_size = 128
initial_lr, decay = 0.5, 0.96
losses = []
for epoch in range(40):
    learning_rate = initial_lr * decay**epoch  # a new Python float every epoch
    for start in range(0, len(token_ids), batch_size):
        loss = train_step(token_ids[start : start + batch_size], labels[start : start + batch_size], learning_rate)
    losses.append(float(loss))

print(f"final loss {losses[-1]:.4f}, {train_step.experimental_get_tracing_count()} traces")
