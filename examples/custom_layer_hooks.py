"""A custom layer with a cache, and the hooks that keep it from growing and survive re-hydration."""

import keras
import numpy as np

from safetrain import ClearSession, SafeTrainer


@keras.saving.register_keras_serializable(package="example")
class PositionalEncoding(keras.layers.Layer):
    """Adds sinusoidal position codes; caches one table per sequence length it has seen."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._tables = {}

    def _table(self, length, depth):
        if length not in self._tables:  # grows with every new length: a cache to release
            pos = np.arange(length)[:, None] / np.power(10000.0, np.arange(depth)[None, :] / depth)
            self._tables[length] = np.where(np.arange(depth) % 2 == 0, np.sin(pos), np.cos(pos)).astype("float32")
        return self._tables[length]

    def call(self, inputs):
        return inputs + self._table(inputs.shape[1], inputs.shape[2])

    def release_memory(self):  # called before the session is cleared, and by trainer.release_memory()
        print(f"  release_memory: dropping {len(self._tables)} cached table(s)")
        self._tables.clear()

    def after_rehydrate(self, snapshot):  # called on the rebuilt layer, its weights already restored
        print(f"  after_rehydrate: rebuilt from a {snapshot.nbytes / 1024:.0f} KiB snapshot")


rng = np.random.default_rng(0)
x = rng.standard_normal((512, 16, 8)).astype("float32")
y = x.mean(axis=(1, 2))[:, None]

model = keras.Sequential(
    [
        keras.Input((16, 8)),
        PositionalEncoding(),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer="adam", loss="mse")

trainer = SafeTrainer(model, policies=[ClearSession(every_n_epochs=2)])
history = trainer.fit(x, y, batch_size=32, epochs=5, verbose=0)
print("re-hydrations:", trainer.rehydrations, "| final loss:", round(history.history["loss"][-1], 5))
print("layer in the live model:", type(trainer.model.layers[0]).__name__)
