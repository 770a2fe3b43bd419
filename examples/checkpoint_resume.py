"""Checkpoint and resume: kill the run at any moment, run the same command again, it finishes the run.

Here the first run stops itself after 3 of 6 epochs (as if killed); the second, the same code, resumes
from the checkpoint and ends exactly where an uninterrupted run would.
"""

import sys
import tempfile

import keras
import numpy as np

from safetrain import Checkpoint, SafeTrainer

# The checkpoint folder: the one given, else a temporary one, removed at the end.
own_directory = tempfile.TemporaryDirectory(prefix="safetrain_ckpt_") if len(sys.argv) < 2 else None
directory = sys.argv[1] if own_directory is None else own_directory.name
rng = np.random.default_rng(0)
x = rng.standard_normal((2048, 16)).astype("float32")
y = x[:, :1] * 2.0


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


class StopAfter(keras.callbacks.Callback):  # stands in for a kill
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            self.model.stop_training = True


def run(callbacks=()):
    keras.utils.set_random_seed(0)
    policy = Checkpoint(directory, every_n_batches=20)
    history = SafeTrainer(build(), policies=[policy]).fit(
        x, y, batch_size=32, epochs=6, verbose=0, callbacks=list(callbacks)
    )
    return history, policy


first, _ = run([StopAfter()])
second, policy = run()
print(
    f"first run: {len(first.epoch)} epochs; second run resumed from {policy.resumed_from.split('/')[-1]} "
    f"and ended at epoch {second.epoch[-1] + 1} with loss {second.history['loss'][-1]:.4f}"
)
if own_directory is not None:
    own_directory.cleanup()
