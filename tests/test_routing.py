"""`safetrain.install()`: Keras's `fit`/`evaluate`/`predict` routed through SafeTrainer, process-wide."""

import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest
from conftest import make_mlp, regression_data

import safetrain
from safetrain import _compat, routing

ORIGINAL_FIT = _compat.TensorFlowTrainer.fit


@pytest.fixture(autouse=True)
def _always_uninstalled():
    yield
    safetrain.uninstall()
    assert _compat.TensorFlowTrainer.fit is ORIGINAL_FIT


def test_install_routes_fit_evaluate_predict_and_uninstall_gives_them_back():
    x, y = regression_data(n=64)
    plain = make_mlp()
    expected = plain.fit(x, y, batch_size=16, epochs=2, verbose=0)
    model = make_mlp()
    with safetrain.install() as installation:
        assert safetrain.installed() and isinstance(installation, routing.Installation)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        trainer = safetrain.trainer_of(model)
        assert trainer is not None and trainer.trace_counts["train"] == 1
        assert history is model.history and history.history.keys() == expected.history.keys()
        np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-6)
        assert model.evaluate(x, y, verbose=0) == pytest.approx(plain.evaluate(x, y, verbose=0), rel=1e-6)
        np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-6)
        assert trainer.trace_counts == {"train": 1, "test": 1, "predict": 1}
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # the same trainer again: no new trace
        assert safetrain.trainer_of(model) is trainer and trainer.trace_counts["train"] == 1
    assert not safetrain.installed()
    assert keras.Model.fit is ORIGINAL_FIT


def test_recompiling_gives_the_model_a_new_trainer():
    x, y = regression_data(n=32)
    model = make_mlp()
    safetrain.install()
    model.fit(x, y, epochs=1, verbose=0)
    first = safetrain.trainer_of(model)
    model.compile(optimizer="sgd", loss="mae")
    assert safetrain.trainer_of(model) is None
    history = model.fit(x, y, epochs=1, verbose=0)
    assert safetrain.trainer_of(model) is not first and "loss" in history.history
    assert isinstance(safetrain.trainer_of(model).model.optimizer, keras.optimizers.SGD)


def test_evaluate_and_predict_inside_a_routed_fit_leave_the_fit_intact():
    x, y = regression_data(n=64)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((self.model.evaluate(x, y, verbose=0), self.model.predict(x[:4], verbose=0).shape))

    model = make_mlp()
    with safetrain.install():
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[Probe()])
    assert len(history.history["loss"]) == 3 and len(seen) == 3
    assert all(shape == (4, 1) and np.all(np.isfinite(loss)) for loss, shape in seen)


def test_install_options_reach_every_trainer_and_policies_can_be_made_per_model():
    made = []

    def policies():
        made.append(safetrain.GarbageCollect())
        return [made[-1]]

    x, y = regression_data(n=32)
    with safetrain.install(memory_logs=True, policies=policies):
        a, b = make_mlp(), make_mlp(seed=1)
        history = a.fit(x, y, epochs=1, verbose=0)
        b.fit(x, y, epochs=1, verbose=0)
    assert "rss_mb" in history.history
    assert len(made) == 2 and list(safetrain.trainer_of(a).policies) == [made[0]]
    with pytest.raises(TypeError, match=r"unknown SafeTrainer argument\(s\) \['epochs'\]"):
        safetrain.install(epochs=3)
    assert not safetrain.installed()


def test_a_keras_layer_that_is_a_keras_trainer_is_accepted():
    class DenseModel(_compat.TensorFlowTrainer, keras.layers.Dense):  # as Keras's own trainer tests write them
        def __init__(self, units):
            keras.layers.Dense.__init__(self, units=units, kernel_initializer="ones", use_bias=False)
            _compat.TensorFlowTrainer.__init__(self)

    model = DenseModel(1)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 1), "float32")
    trainer = safetrain.SafeTrainer(model)
    history = trainer.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and history.history["loss"][1] < history.history["loss"][0]


# -- the case that matters: KerasTuner, a model per trial --------------------------------------------------

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "keras_tuner_search.py"


def test_keras_tuner_search_memory_is_flat_per_trial_under_install_and_grows_without():
    pytest.importorskip("keras_tuner")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def run(extra):
        out = subprocess.run(
            [sys.executable, str(EXAMPLE), "--trials", "20", *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("memory after each trial"))
        return json.loads(line.split(":", 1)[1])

    with ThreadPoolExecutor(2) as pool:  # each mode in a fresh process of its own
        routed, plain = pool.map(run, ([], ["--plain"]))
    assert len(routed) == len(plain) == 20
    from safetrain.memory import slope

    routed_slope, plain_slope = slope(routed[5:]), slope(plain[5:])
    assert plain_slope > 1.5, plain  # Keras: about +3.7 MiB per trial here
    assert routed_slope < 0.4, routed  # installed: about +0.1
