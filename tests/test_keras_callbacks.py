"""Keras's own callback test-suites, with `fit`, `evaluate` and `predict` routed through SafeTrainer by
`safetrain.install()`, default arguments (what a user switching over gets).

The yardstick the issue names: every callback behaves as it does under `model.fit`. The fixture counts
the routed calls, so a test class that silently stopped going through safetrain would fail.
"""

import pytest

import safetrain
from safetrain import routing

keras_tests = pytest.importorskip(
    "keras.src.callbacks.early_stopping_test", reason="Keras's test modules are not installed with this Keras"
)

ROUTED = {"calls": 0}

# Tests that fail for a known, tracked reason; strict, so they are noticed the day they pass.
KNOWN_GAPS: dict[str, str] = {}


@pytest.fixture(autouse=True)
def routed_through_safetrainer(monkeypatch):
    make = routing._trainer_for

    def counted(model):
        ROUTED["calls"] += 1
        return make(model)

    monkeypatch.setattr(routing, "_trainer_for", counted)
    with safetrain.install():
        yield


import importlib  # noqa: E402
import unittest  # noqa: E402

SUITES = [
    "backup_and_restore_test",
    "callback_test",
    "csv_logger_test",
    "early_stopping_test",
    "lambda_callback_test",
    "learning_rate_scheduler_test",
    "model_checkpoint_test",
    "monitor_callback_test",
    "reduce_lr_on_plateau_test",
    "swap_ema_weights_test",
    "tensorboard_test",
    "terminate_on_nan_test",
]
for _name in SUITES:
    _module = importlib.import_module(f"keras.src.callbacks.{_name}")
    for _attr, _value in vars(_module).items():
        if isinstance(_value, type) and issubclass(_value, unittest.TestCase) and _value.__module__ == _module.__name__:
            globals()[f"Keras_{_attr}"] = _value
del _name, _module, _attr, _value


def test_zz_the_keras_suites_went_through_safetrainer():
    # Runs after the imported suites in this module (pytest keeps definition order per module).
    assert ROUTED["calls"] > 20
