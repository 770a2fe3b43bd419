"""A long model.fit with the usual callbacks, then evaluate and predict: nothing in it grows.

Report: https://github.com/tensorflow/tensorflow/issues/33030
Known answer: none

A small regression model is fit for 40 epochs with validation data and the callbacks users suspect when memory
climbs during fit: EarlyStopping (patience larger than the run), ReduceLROnPlateau, ModelCheckpoint saving the
best model and CSVLogger writing every epoch (both into a temporary directory), plus a custom callback that keeps
float(logs["loss"]). Each callback keeps numbers or writes files, model.fit traces its functions once, and memory
stays flat after the first epochs (each checkpoint save leaves a few tens of KiB behind, a few MiB in all, which
stops when val_loss stops improving); the final evaluate and single predict add nothing that grows.
"""

import os
import tempfile

import keras
import numpy as np

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
weights = rng.standard_normal((20, 1)).astype("float32")
x_train = rng.standard_normal((512, 20)).astype("float32")
y_train = x_train @ weights + 0.5 * rng.standard_normal((512, 1)).astype("float32")
x_val = rng.standard_normal((128, 20)).astype("float32")
y_val = x_val @ weights + 0.5 * rng.standard_normal((128, 1)).astype("float32")


class LossLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(float(logs["loss"]))


model = keras.Sequential(
    [
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])

with tempfile.TemporaryDirectory() as workdir:
    loss_log = LossLog()
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=100, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5, min_lr=1e-5),
        keras.callbacks.ModelCheckpoint(os.path.join(workdir, "best.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(os.path.join(workdir, "training.csv")),
        loss_log,
    ]
    model.fit(
        x_train, y_train, batch_size=128, epochs=40, validation_data=(x_val, y_val), verbose=0, callbacks=callbacks
    )
    val_loss, val_mae = model.evaluate(x_val, y_val, verbose=0)
    prediction = model.predict(x_val[:8], verbose=0)

print(
    f"{len(loss_log.losses)} epochs, val_loss {val_loss:.4f}, val_mae {val_mae:.4f}, predicted {prediction[0, 0]:.3f}"
)
