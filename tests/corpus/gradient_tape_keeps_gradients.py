"""Eager GradientTape training loop that keeps every step's gradients "for later analysis".

Report: https://e-learn.cn/topic/4021299
Known answer: python_accumulation
Expected lines: 46, 44

A hand-written eager loop (no fit, no tf.function) trains a small MLP and appends the list of gradient tensors of
every step to a Python list, meaning to plot gradient norms after training. Each step's gradients are as big as
the model's weights (about 2.5 MiB here), and the list keeps all of them alive, so resident memory climbs by that
much per step for the whole run. Keeping float(tf.linalg.global_norm(grads)) instead keeps memory flat.
"""

import tensorflow as tf  # TensorFlow first: the tf.keras path

# isort: split
import numpy as np

rng = np.random.default_rng(0)
tf.keras.utils.set_random_seed(0)
x_train = rng.standard_normal((2048, 128)).astype("float32")
y_train = (x_train[:, :4].sum(axis=1) > 0).astype("int32")

model = tf.keras.Sequential(
    [
        tf.keras.Input((128,)),
        tf.keras.layers.Dense(1024, activation="relu"),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(2),
    ]
)
optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9)
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

gradient_history = []  # every step's gradients, kept to plot their norms after training
batch_size = 64
steps_per_epoch = len(x_train) // batch_size
for _epoch in range(3):
    order = rng.permutation(len(x_train))
    for step in range(steps_per_epoch):
        index = order[step * batch_size : (step + 1) * batch_size]
        with tf.GradientTape() as tape:
            logits = model(x_train[index], training=True)
            loss = loss_fn(y_train[index], logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        gradient_history.append(grads)

norms = [float(tf.linalg.global_norm(g)) for g in gradient_history[-steps_per_epoch:]]
print(f"{len(gradient_history)} steps, last epoch mean gradient norm {np.mean(norms):.3f}")
