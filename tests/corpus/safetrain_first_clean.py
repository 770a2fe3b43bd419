"""A plain regression run through SafeTrainer: fit for 15 epochs with a validation split, then one predict.

Report: https://github.com/keras-team/keras/issues/13195
Known answer: none

The model is compiled once and trained with SafeTrainer(model).fit(x, y, epochs=15, validation_split=0.2)
with ReduceLROnPlateau, TerminateOnNaN and a LambdaCallback that keeps the validation loss as a Python float;
a single trainer.predict call follows. One train, one test and one predict trace, no arrays or tensors kept per epoch:
memory is flat after the first epoch.
"""

from safetrain import SafeTrainer

# isort: split
import keras
import numpy as np

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((4000, 20)).astype("float32")
y = (x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * rng.standard_normal((4000, 1))).astype("float32")

model = keras.Sequential(
    [keras.Input((20,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.1), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse", metrics=["mae"])

val_losses = []
callbacks = [
    keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3),
    keras.callbacks.TerminateOnNaN(),
    keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: val_losses.append(float(logs["val_loss"]))),
]
trainer = SafeTrainer(model)
history = trainer.fit(x, y, batch_size=64, epochs=15, validation_split=0.2, verbose=0, callbacks=callbacks)
predictions = trainer.predict(x[:256], verbose=0)
epochs = len(history.history["loss"])
print(f"{epochs} epochs, val_loss {val_losses[0]:.4f} -> {val_losses[-1]:.4f}, {len(predictions)} predictions")
