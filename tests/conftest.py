"""Shared fixtures: small models and data, built per test with a fixed seed (TensorFlow is imported once)."""

import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Everything this test process and the processes it starts write to the temporary directory (pytest's own
# folders, TensorFlow's autograph files, the files of scripts killed on purpose) goes into one folder of its
# own, removed when the process ends: a test run leaves nothing behind in the temporary directory.
_SESSION_TMP = tempfile.mkdtemp(prefix="safetrain-tests-")
os.environ["TMPDIR"] = tempfile.tempdir = _SESSION_TMP
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two test processes share 2 cores (pytest-xdist), beside the processes some tests start: one thread per
# operation each, so that TensorFlow's thread pools do not fight over the cores (a 1.5 s test took 60 s
# beside a busy neighbour). The models here are small; numbers are compared within one process.
tf.config.threading.set_intra_op_parallelism_threads(1)

from safetrain import SafeTrainer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # A test module may list known gaps: {test name: reason}; those tests must fail (strict xfail).
    for item in items:
        gaps = getattr(item.module, "KNOWN_GAPS", {})
        if item.name in gaps:
            item.add_marker(pytest.mark.xfail(reason=gaps[item.name], strict=True))


@pytest.fixture(autouse=True)
def _fresh_session():
    # Without the full gc.collect() clear_session would run (0.13 s a test): SafeTrainer collects when a
    # new trainer starts and a collection is due (safetrain/reclaim.py), and tests that count objects collect
    # themselves.
    keras.backend.clear_session(free_memory=False)
    yield


def regression_data(n=320, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    w = rng.standard_normal((d, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def classification_images(n=192, seed=0, classes=4):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 12, 12, 1), dtype=np.float32)
    y = rng.integers(0, classes, size=(n,)).astype("int32")
    return x, y


def make_mlp(d=8, dropout=0.0, compile=True, seed=0, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((d,)), keras.layers.Dense(16, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    if compile:
        kwargs = dict(optimizer="adam", loss="mse", metrics=["mae"])
        kwargs.update(compile_kwargs)
        model.compile(**kwargs)
    return model


def make_cnn(classes=4, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(classes),
        ]
    )
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    return model


def run_both(build, fit_kwargs, trainer_kwargs=None):
    """Fit a fresh model with `model.fit`, then an identical one with SafeTrainer; return both results."""
    keras_model = build()
    keras_history = keras_model.fit(verbose=0, **fit_kwargs()).history
    safe_model = build()
    trainer = SafeTrainer(safe_model, **(trainer_kwargs or {}))
    safe_history = trainer.fit(verbose=0, **fit_kwargs()).history
    return keras_model, keras_history, safe_model, safe_history, trainer


def assert_same_training(keras_model, keras_history, safe_model, safe_history):
    assert set(safe_history) == set(keras_history)
    for key, values in keras_history.items():
        np.testing.assert_allclose(safe_history[key], values, rtol=1e-6, err_msg=key)
    for a, b in zip(keras_model.get_weights(), safe_model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert int(safe_model.optimizer.iterations) == int(keras_model.optimizer.iterations)


# -- real processes: tests/scripts/checkpointed_run.py, killed and restarted ----------------------------

from scripts.killer import run_script  # noqa: E402 (shared with benchmarks/soak.py)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted run of checkpointed_run.py that killed and restarted runs must match."""
    tmp = tmp_path_factory.mktemp("reference")
    assert run_script(tmp / "out.json", tmp / "ckpt", {"NO_CHECKPOINT": "1"}) == 0
    return json.loads((tmp / "out.json").read_text())
