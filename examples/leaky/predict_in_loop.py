"""Leak: model.predict called in a loop, one short sequence at a time.

Each call builds a new input pipeline, iterator and callback list for one small input: about 0.05 MiB that
is never returned, and some 50 ms, per call here. The doctor counts the calls and the growth. Fix: call the
model directly for small inputs (model(x, training=False)), or collect the inputs and predict once.
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(16), keras.layers.Dense(1)])

scores = []
for i in range(100):
    sequence = rng.standard_normal((8, 5 + i % 60, 4)).astype("float32")  # sequences of varying length
    scores.append(float(model.predict(sequence, verbose=0).mean()))
print(f"{len(scores)} predictions, last mean {scores[-1]:.4f}")
