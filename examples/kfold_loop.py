"""Train a fresh model per fold in a loop: memory stays flat (model.fit grows about 6 MiB per model)."""

import keras
import numpy as np

from safetrain import SafeTrainer
from safetrain.memory import rss_mb, slope

rng = np.random.default_rng(0)
x = rng.standard_normal((3000, 16)).astype("float32")
y = (x[:, :2].sum(axis=1, keepdims=True) > 0).astype("float32")


def build_model():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(
        optimizer="adam",
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    return model


folds = np.array_split(rng.permutation(len(x)), 10)
scores, rss = [], []
for i, val_idx in enumerate(folds):
    train_idx = np.setdiff1d(np.arange(len(x)), val_idx)
    trainer = SafeTrainer(build_model)  # a factory: the trainer owns the model it builds
    trainer.fit(x[train_idx], y[train_idx], batch_size=64, epochs=2, verbose=0)
    scores.append(trainer.evaluate(x[val_idx], y[val_idx], verbose=0, return_dict=True)["binary_accuracy"])
    rss.append(rss_mb())
    print(f"fold {i}: accuracy {scores[-1]:.3f}, rss {rss[-1]:.1f} MiB")
print(f"mean accuracy {np.mean(scores):.3f}; RSS slope {slope(rss[2:]):+.2f} MiB per fold")
