"""KerasTuner builds and fits a model per trial, inside code you do not own: `safetrain.install()` routes
those `model.fit` calls through SafeTrainer, and memory stays flat from trial to trial.

    python examples/keras_tuner_search.py            # 25 trials under safetrain.install()
    python examples/keras_tuner_search.py --plain    # the same search with Keras's own fit, for comparison
    python examples/keras_tuner_search.py --trials 40

Needs `pip install keras-tuner` (in the test extras).
"""

import argparse
import contextlib
import tempfile

import keras
import keras_tuner
import numpy as np

import safetrain
from safetrain.memory import anon_mb, slope

parser = argparse.ArgumentParser()
parser.add_argument("--plain", action="store_true", help="Keras's own fit (no safetrain.install())")
parser.add_argument("--trials", type=int, default=25)
args = parser.parse_args()

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 16)).astype("float32")
y = (x[:, :3].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((512, 1))).astype("float32")


def build_model(hp):
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(hp.Int("units", 8, 256, step=8), activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(hp.Choice("learning_rate", [1e-2, 3e-3, 1e-3])), loss="mse")
    return model


MEMORY: list[float] = []


class MemoryPerTrial(keras.callbacks.Callback):
    """Anonymous memory (not page cache) at the end of each trial's fit (KerasTuner copies callbacks per
    trial, so the numbers go to a module-level list)."""

    def on_train_end(self, logs=None):
        MEMORY.append(anon_mb())


with tempfile.TemporaryDirectory() as workdir:  # KerasTuner's trial files, removed afterwards
    tuner = keras_tuner.RandomSearch(
        build_model, objective="val_loss", max_trials=args.trials, seed=0, directory=workdir, project_name="search"
    )
    with contextlib.nullcontext() if args.plain else safetrain.install():
        tuner.search(x, y, epochs=2, batch_size=64, validation_split=0.25, verbose=0, callbacks=[MemoryPerTrial()])
    best = tuner.get_best_hyperparameters(1)[0].values

mode = "model.fit (plain Keras)" if args.plain else "safetrain.install()"
print(f"{mode}: {len(MEMORY)} trials; best {best}")
print("memory after each trial (MiB):", [round(v, 1) for v in MEMORY])
print(f"memory slope {slope(MEMORY[5:]):+.2f} MiB per trial (trials 6-{len(MEMORY)})")
