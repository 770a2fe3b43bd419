"""Custom-layer hooks: reset_state, release_memory, after_rehydrate, and registration for foreign classes."""

import keras
import numpy as np
import pytest
from conftest import regression_data

from safetrain import ClearSession, ResetStates, SafeTrainer, Snapshot, hooks

x, y = regression_data(n=48)
EVENTS = []


class CachedScale(keras.layers.Layer):
    """Keeps a Python-side cache (as layers with lookup tables do) and implements all three hooks."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor
        self.cache = {}

    def call(self, inputs):
        self.cache[len(self.cache)] = np.zeros(1000)  # filled at trace time
        return inputs * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}

    def reset_state(self):
        EVENTS.append(("reset", id(self)))

    def release_memory(self):
        EVENTS.append(("release", id(self), len(self.cache)))
        self.cache.clear()

    def after_rehydrate(self, snapshot):
        EVENTS.append(("after_rehydrate", id(self), isinstance(snapshot, Snapshot)))


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), CachedScale(0.5, name="scale"), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_rehydration_releases_old_layers_and_notifies_the_new_ones():
    EVENTS.clear()
    trainer = SafeTrainer(build(), policies=[ClearSession(every_n_epochs=1)])
    first = id(trainer.model.get_layer("scale"))
    trainer.fit(x, y, epochs=2, verbose=0)
    second = id(trainer.model.get_layer("scale"))
    assert second != first
    release, after = EVENTS[0], EVENTS[1]
    assert release[0] == "release" and release[1] == first and release[2] >= 1
    assert after == ("after_rehydrate", second, True)


def test_trainer_release_memory_and_reset_states_reach_the_layer():
    EVENTS.clear()
    trainer = SafeTrainer(build())
    trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.release_memory() == 1 and trainer.model.get_layer("scale").cache == {}
    SafeTrainer(trainer.model, policies=[ResetStates("epoch")]).fit(x, y, epochs=2, verbose=0)
    assert [e[0] for e in EVENTS].count("reset") == 2


class ThirdParty(keras.layers.Layer):
    """Stands for a layer class the user does not own: no hook methods."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.buffer = [1, 2, 3]

    def call(self, inputs):
        return inputs


def test_registered_hooks_serve_classes_you_do_not_own():
    calls = []
    hooks.register(ThirdParty, reset=lambda layer: calls.append("reset"), release=lambda layer: layer.buffer.clear())
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), ThirdParty(), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        trainer = SafeTrainer(model, policies=[ResetStates(every=2)])
        trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert calls == ["reset"] * 3
        trainer.release_memory()
        assert model.layers[0].buffer == []
    finally:
        hooks.unregister(ThirdParty)
    assert hooks.reset_states(model) == 0


def test_register_validates_its_arguments():
    with pytest.raises(TypeError, match=r"`layer_class` must be a keras.layers.Layer subclass"):
        hooks.register(dict, reset=print)
    with pytest.raises(ValueError, match=r"at least one of"):
        hooks.register(ThirdParty)
    with pytest.raises(TypeError, match=r"`release` must be callable"):
        hooks.register(ThirdParty, release="clear")


def test_keras_own_non_stateful_layers_are_not_reset():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(4), keras.layers.Dense(1)])
    assert hooks.reset_states(model) == 0
