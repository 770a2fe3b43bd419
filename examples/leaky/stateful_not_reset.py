"""Problem: a stateful LSTM trained for several epochs without ever resetting its state.

model.fit never resets RNN states, so every epoch starts from the last batch of the previous one (and a
predict afterwards starts from the end of training). Fix: SafeTrainer(model, policies=[ResetStates()]).
"""

import keras
import numpy as np

rng = np.random.default_rng(0)
x = rng.standard_normal((256, 10, 4)).astype("float32")
y = x[:, -1, :1]

model = keras.Sequential(
    [keras.Input((10, 4), batch_size=32), keras.layers.LSTM(16, stateful=True), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse")
history = model.fit(x, y, batch_size=32, epochs=4, shuffle=False, verbose=0)
print("losses", [round(v, 4) for v in history.history["loss"]])
