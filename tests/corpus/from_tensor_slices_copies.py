"""A ~280 MiB feature matrix kept in memory several times over on its way into tf.data.

Report: https://github.com/tensorflow/tensorflow/issues/38693
Known answer: data_copies
Expected lines: 25

The script makes a float32 feature matrix of about 280 MiB, clips its outliers into a second array (keeping the
raw one for later), and hands the clipped copy to tf.data.Dataset.from_tensor_slices, which converts it into a
TensorFlow tensor and embeds it in the dataset: more copies of the same data. By the end of the first
epoch anonymous memory is several times the size of the arrays, although the model itself is tiny.
"""

import keras
import numpy as np
import tensorflow as tf

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
ROWS, FEATURES = 36000, 2048
raw = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
labels = (raw[:, :4].sum(axis=1, keepdims=True) > 0).astype("float32")

features = np.clip(raw, -3.0, 3.0)  # outliers clipped into a second full copy; raw stays referenced below

dataset = tf.data.Dataset.from_tensor_slices((features, labels)).shuffle(4096, seed=0).batch(512)
model = keras.Sequential(
    [keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")]
)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
history = model.fit(dataset, epochs=2, verbose=0)
print(f"{raw.nbytes / 2**20:.0f} MiB of raw features, accuracy {history.history['accuracy'][-1]:.3f}")
