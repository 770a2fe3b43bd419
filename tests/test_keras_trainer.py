"""Keras's own trainer tests (`keras/src/trainers/trainer_test.py`), with `fit`, `evaluate` and `predict`
routed through SafeTrainer by `safetrain.install()`: what a user gets who swaps `model.fit` for
`SafeTrainer(model).fit` and changes nothing else.

Every test of that module that passes with plain Keras on this machine must pass routed. The exceptions
are in two lists below, each with its reason: tests that need a package not installed here (they fail with
plain Keras too) and `KNOWN_GAPS` (strict: a gap that closes fails the run until it is taken off the list).
"""

import importlib
import importlib.util
import sys
import types

import keras  # noqa: F401 (all of Keras is imported before the jax stand-in exists)
import pytest

import safetrain
from safetrain import routing


def _load_keras_trainer_tests():
    """Keras's test module imports `jax` at module level but uses it only on the JAX backend: a bare module
    stands in for it while that one module is imported, and is removed right after."""
    name = "keras.src.trainers.trainer_test"
    try:
        import jax  # noqa: F401

        return importlib.import_module(name)
    except ImportError:
        pass
    sys.modules["jax"] = types.ModuleType("jax")
    try:
        return importlib.import_module(name)
    finally:
        del sys.modules["jax"]


if importlib.util.find_spec("keras.src.trainers.trainer_test") is None:
    pytest.skip("this Keras was installed without its test modules", allow_module_level=True)
keras_trainer_test = _load_keras_trainer_tests()
TestTrainer = keras_trainer_test.TestTrainer

# Tests that fail with plain `model.fit` here too: they feed data from a package this machine lacks.
NEEDS_PACKAGE = {"sparse_scipy": "scipy", "sparse_jax": "jax", "grain": "grain", "torch_dataloader": "torch"}

# Tests that fail routed for a known, tracked reason; strict, so they are noticed the day they pass.
KNOWN_GAPS: dict[str, str] = {}

ROUTED = {"trainers": 0}


@pytest.fixture(autouse=True)
def routed_through_safetrain(request, monkeypatch):
    for marker, package in NEEDS_PACKAGE.items():
        if marker in request.node.name:
            pytest.importorskip(package, reason=f"needs {package} (fails with plain Keras without it)")
    make = routing._trainer_for

    def counted(model):
        if routing.trainer_of(model) is None:
            ROUTED["trainers"] += 1
        return make(model)

    monkeypatch.setattr(routing, "_trainer_for", counted)
    with safetrain.install():
        yield
    assert not safetrain.installed()


def test_zz_the_routed_calls_went_through_safetrain():
    # Runs after the suite, in its process (`--dist loadfile` keeps a module on one worker).
    if not any(n for n in ROUTED.values()):
        pytest.skip("no Keras trainer test ran in this process")
    assert ROUTED["trainers"] > 50
