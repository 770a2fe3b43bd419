"""Functions that tests run in isolated processes (they must be importable by module path)."""

import os


def train_fold(seed: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from safetrain import SafeTrainer
    from safetrain.memory import rss_mb

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 8)).astype("float32")
    y = x[:, :1] * 2
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    history = SafeTrainer(model).fit(x, y, epochs=2, verbose=0)
    return {"loss": history.history["loss"][-1], "pid": os.getpid(), "child_rss_mb": rss_mb()}


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def add(a, b):
    return a + b
