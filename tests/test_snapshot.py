"""Re-hydration: a run with ClearSession(every_n_epochs=1) is bit-identical to the same run without it."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import regression_data

from safetrain import ClearSession, ConfigurationError, SafeTrainer, Snapshot, SnapshotMismatch

x, y = regression_data(n=150, seed=7)


def sequential():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def functional():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.Dropout(0.2)(h)
    skip = keras.layers.Dense(16)(inp)
    out = keras.layers.Dense(1)(keras.layers.Add()([h, skip]))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse", metrics=["mae"])
    return model


@keras.saving.register_keras_serializable(package="tests")
class Residual(keras.Model):
    """A subclassed model with get_config (registered, so it rebuilds from its config)."""

    def __init__(self, units=16, rate=0.25, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rate = units, rate
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.drop = keras.layers.Dropout(rate)
        self.out = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        return self.out(self.drop(self.hidden(inputs), training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units, "rate": self.rate}


def subclassed():
    keras.utils.set_random_seed(0)
    model = Residual()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


class NoConfig(keras.Model):
    """A subclassed model whose config cannot round-trip (an object argument): needs a factory."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.drop = keras.layers.Dropout(0.3)
        self.head = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        return self.head(self.drop(self.layer(inputs), training=training))


def factory_built():
    keras.utils.set_random_seed(0)
    model = NoConfig(keras.layers.Dense(16, activation="tanh"))
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def run(build, policies, use_factory=False, epochs=4, **fit_kwargs):
    trainer = SafeTrainer(build if use_factory else build(), policies=policies)
    history = trainer.fit(x, y, batch_size=16, epochs=epochs, validation_split=0.2, verbose=0, **fit_kwargs)
    return trainer, history.history


def assert_bit_identical(plain, rehydrated):
    (t1, h1), (t2, h2) = plain, rehydrated
    assert t2.rehydrations == 3 and t1.rehydrations == 0
    for key in h1:
        if key != "rss_mb":
            assert h1[key] == h2[key], key
    for a, b in zip(t1.model.get_weights(), t2.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(t1.model.optimizer.iterations) == int(t2.model.optimizer.iterations) == 32


@pytest.mark.parametrize(
    "build, use_factory",
    [(sequential, False), (functional, False), (subclassed, False), (factory_built, True)],
    ids=["sequential", "functional", "subclassed_with_get_config", "factory"],
)
def test_clear_session_every_epoch_resumes_bit_exact(build, use_factory):
    plain = run(build, [], use_factory)
    rehydrated = run(build, [ClearSession(every_n_epochs=1)], use_factory)
    assert_bit_identical(plain, rehydrated)
    assert rehydrated[0].trace_counts["train"] == 1  # the new functions were traced once each


def test_model_whose_config_cannot_round_trip_needs_a_factory_and_says_so_before_training():
    model = factory_built()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ConfigurationError, match=r"cannot rebuild NoConfig from its config.*factory"):
        SafeTrainer(model, policies=[ClearSession(1)]).fit(x, y, epochs=2, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unregistered_custom_layers_rebuild_without_extra_code():
    class Scale(keras.layers.Layer):
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, inputs):
            return inputs * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), Scale(0.5), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    plain = run(build, [])
    rehydrated = run(build, [ClearSession(1)])
    assert_bit_identical(plain, rehydrated)
    assert isinstance(rehydrated[0].model.layers[0], Scale)


def test_callbacks_keep_their_state_and_act_on_the_live_model(tmp_path):
    def callbacks():
        return [
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(
                str(tmp_path / "best.weights.h5"), save_best_only=True, save_weights_only=True
            ),
        ]

    cbs_plain, cbs_rehydrated = callbacks(), callbacks()
    plain = run(sequential, [], callbacks=cbs_plain)
    rehydrated = run(sequential, [ClearSession(1)], callbacks=cbs_rehydrated)
    assert_bit_identical(plain, rehydrated)
    trainer = rehydrated[0]
    assert all(cb.model is trainer.model for cb in cbs_rehydrated)
    lr = float(trainer.model.optimizer.learning_rate)
    assert lr == float(plain[0].model.optimizer.learning_rate) and lr < 0.001  # reduced on the live optimizer
    assert cbs_rehydrated[1].best == cbs_plain[1].best
    assert trainer.model.history.history["loss"] == rehydrated[1]["loss"]


def test_rehydrate_on_demand_between_fits_is_exact():
    t1 = SafeTrainer(sequential())
    t1.fit(x, y, batch_size=16, epochs=4, verbose=0)
    t2 = SafeTrainer(sequential())
    t2.fit(x, y, batch_size=16, epochs=2, verbose=0)
    old = t2.model
    t2.rehydrate()
    assert t2.model is not old
    t2.fit(x, y, batch_size=16, epochs=4, initial_epoch=2, verbose=0)
    for a, b in zip(t1.model.get_weights(), t2.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_the_old_model_is_freed_by_rehydration():
    trainer = SafeTrainer(sequential())
    trainer.fit(x, y, epochs=1, verbose=0)
    old = weakref.ref(trainer.model)
    trainer.rehydrate()
    gc.collect()
    assert old() is None


def test_snapshot_of_another_model_is_refused():
    trainer = SafeTrainer(sequential())
    trainer.fit(x, y, epochs=1, verbose=0)
    snap = Snapshot.take(trainer)
    snap.model_values = snap.model_values[:-1]
    with pytest.raises(SnapshotMismatch, match=r"model.variables: the rebuilt model has 5 variables, the snapshot 4"):
        snap.restore(trainer)


def test_trained_steps_leave_nothing_in_tensorflow_s_gradient_registry():
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry._registry
    before = set(registry)
    trainer = SafeTrainer(sequential())
    trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.steps.released_gradient_entries >= 1
    assert set(registry) == before


def test_tensorflow_still_registers_a_gradient_per_traced_optimizer_step():
    # The mechanism safetrain undoes: if a TensorFlow upgrade stops registering a custom gradient per
    # trace (or moves the registry), this fails and the cleanup in safetrain/steps.py must be revisited.
    from safetrain._compat import gradient_registry

    registry = gradient_registry()
    assert registry is not None, "tensorflow.python.framework.ops._gradient_registry moved"
    model = sequential()
    model.optimizer.build(model.trainable_variables)
    before = set(registry)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(y=yb, y_pred=model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))

    step(x[:4], y[:4])
    new = [k for k in set(registry) - before if str(k).startswith("CustomGradient-")]
    assert len(new) >= 1
    for k in new:
        registry.pop(k)


def test_models_trained_in_a_loop_leave_no_graphs_behind():
    def graphs():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ in ("FuncGraph", "AtomicFunction"))

    def one_fold():
        trainer = SafeTrainer(sequential)
        trainer.fit(x, y, epochs=1, verbose=0)
        trainer.evaluate(x, y, verbose=0)
        trainer.predict(x, verbose=0)

    one_fold()
    baseline = graphs()
    for _ in range(3):
        one_fold()
    assert graphs() <= baseline


def test_rehydrating_mid_epoch_keeps_metric_state_and_data_position():
    from safetrain import MemoryBudget

    plain = run(sequential, [], epochs=2)
    # A budget of 1 MiB is always exceeded: re-hydrate every 3 steps, in the middle of epochs.
    budget = MemoryBudget(1.0, action="rehydrate", check_every=3)
    trainer, history = run(sequential, [budget], epochs=2)
    assert trainer.rehydrations > 4 and any(e[0] == "step" for e in budget.events)
    for key in plain[1]:
        if key != "rss_mb":
            assert plain[1][key] == history[key], key
    for a, b in zip(plain[0].model.get_weights(), trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_failed_rehydration_keeps_the_old_model_usable():
    calls = []

    def flaky_factory():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the factory failed this time")
        return sequential()

    x, y = regression_data(n=64)
    trainer = SafeTrainer(flaky_factory)
    trainer.fit(x, y, epochs=1, verbose=0)
    old = trainer.model
    with pytest.raises(RuntimeError, match="failed this time"):
        trainer.rehydrate()
    assert trainer.model is old
    history = trainer.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and int(trainer.model.optimizer.iterations) == 2 * 2


class UnrebuildableAdam(keras.optimizers.Adam):
    """An optimizer that cannot be re-created from its config (and is not registered)."""

    @classmethod
    def from_config(cls, config, custom_objects=None):
        raise ValueError("this optimizer cannot be rebuilt")


def test_a_compile_argument_that_cannot_be_recreated_is_refused_before_training():
    model = sequential()
    model.compile(optimizer=UnrebuildableAdam(), loss="mse")
    x, y = regression_data(n=64)
    trainer = SafeTrainer(model, policies=[ClearSession()])
    with pytest.raises(ConfigurationError, match=r"compile argument `optimizer` \(UnrebuildableAdam\)"):
        trainer.fit(x, y, epochs=2, verbose=0)
    assert trainer.model.optimizer.iterations.numpy() == 0  # refused before any step


@tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32)])
def _soft_clip(t):
    # A function that outlives any one trainer (module level), with a custom gradient inside: its gradient
    # entry must survive the cleanup of the step trace that first calls it.
    @tf.custom_gradient
    def clip(v):
        return tf.clip_by_value(v, -3.0, 3.0), lambda dy: dy

    return clip(t)


class SoftClip(keras.layers.Layer):
    calls_function = False  # off while models are built, so that a step's trace is the first to call it

    def call(self, inputs):
        return _soft_clip(inputs) if SoftClip.calls_function else tf.clip_by_value(inputs, -3.0, 3.0)


def test_gradient_cleanup_keeps_the_entries_of_functions_that_outlive_the_step():
    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), SoftClip(), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    first, second = SafeTrainer(build()), SafeTrainer(build())
    SoftClip.calls_function = True
    try:
        first.predict(x, verbose=0)  # _soft_clip is traced inside the predict step's trace
        history = second.fit(x, y, epochs=1, verbose=0)  # differentiates through that same traced function
    finally:
        SoftClip.calls_function = False
    assert np.isfinite(history.history["loss"][0])
