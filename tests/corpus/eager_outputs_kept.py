"""Batched inference that calls the model directly and keeps every output tensor in a list.

Report: https://github.com/tensorflow/tensorflow/issues/34606
Known answer: python_accumulation
Expected lines: 26, 27

A classifier with 1000 classes scores a stream of 160 batches of 512 feature vectors by calling model(x) eagerly
(the usual advice instead of model.predict in a loop) and appends each batch's logits, an EagerTensor of about
2 MiB, to a list to concatenate at the end. The list keeps every tensor's buffer alive, so memory grows by that
much per batch, several hundred MiB over the run. Reducing each batch right away (argmax, top-k as NumPy) keeps
memory flat.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((128,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(1000)]  # 1000 class logits
)

all_logits = []
for _batch in range(160):
    features = rng.standard_normal((512, 128)).astype("float32")  # the next batch from the feature reader
    logits = model(features, training=False)
    all_logits.append(logits)  # an EagerTensor, kept alive by the list

predicted = np.concatenate([np.argmax(logits, axis=-1) for logits in all_logits])
print(f"scored {len(predicted)} rows in {len(all_logits)} batches, {np.bincount(predicted).argmax()} most frequent")
