"""Text classifier trained with a tf.function step on batches padded to their own length: one trace per length.

Report: https://github.com/tensorflow/tensorflow/issues/38002
Known answer: retracing
Expected lines: 60, 43

Documents are bucketed by length and each batch is padded only to its longest document, to save padding, so the
time dimension of the batches takes 32 different values, in the order the buckets come. The train step is a plain
@tf.function without an input_signature, so every new length traces and keeps a new concrete function, each with
its own graph and its own copy of the sinusoidal position table it captures. Memory grows by a few MiB per new
length all through the run; an input_signature with a None time dimension (or reduce_retracing=True) traces once.
"""

import tensorflow as tf  # TensorFlow first: the tf.keras path

# isort: split
import numpy as np

VOCAB, DIM, MAX_LENGTH = 5000, 64, 2048
rng = np.random.default_rng(0)
tf.keras.utils.set_random_seed(0)

# Sinusoidal position encodings, as in the Transformer tutorial, kept as a NumPy array.
positions = np.arange(MAX_LENGTH)[:, None] / np.power(10000.0, np.arange(0, DIM, 2)[None, :] / DIM)
position_table = np.concatenate([np.sin(positions), np.cos(positions)], axis=1).astype("float32")

embedding = tf.keras.layers.Embedding(VOCAB, DIM)
classifier = tf.keras.Sequential(
    [
        tf.keras.Input((None, DIM)),
        tf.keras.layers.Dense(64, activation="relu"),  # per token
        tf.keras.layers.GlobalMaxPooling1D(),
        tf.keras.layers.Dense(1),
    ]
)
embedding.build((None, None))
variables = embedding.trainable_variables + classifier.trainable_variables
optimizer = tf.keras.optimizers.SGD(0.05)
optimizer.build(variables)


@tf.function
def train_step(token_ids, labels):
    length = tf.shape(token_ids)[1]
    with tf.GradientTape() as tape:
        hidden = embedding(token_ids) + tf.constant(position_table)[:length]
        logits = classifier(hidden, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss


# One pass over a corpus bucketed by length: each batch is padded to its own longest document.
bucket_lengths = rng.permutation(np.arange(12, 76, 2))  # 32 distinct padded lengths
losses = []
for length in bucket_lengths:
    token_ids = rng.integers(1, VOCAB, size=(32, length)).astype("int32")
    labels = (token_ids[:, :5].mean(axis=1, keepdims=True) > VOCAB / 2).astype("float32")
    losses.append(float(train_step(token_ids, labels)))

print(f"{len(losses)} batches, {train_step.experimental_get_tracing_count()} traces, last loss {losses[-1]:.4f}")
