"""SafeTrainer's configuration, extension points and its own loop (it never calls Model.fit & co.)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, regression_data

from safetrain import ConfigurationError, SafeTrainer


def test_model_must_be_a_keras_model_or_factory():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model .* or a zero-argument callable"):
        SafeTrainer("my_model.keras")
    with pytest.raises(TypeError, match=r"`model` must be"):
        SafeTrainer(keras.layers.Dense(3))


def test_factory_must_return_a_model():
    def build():
        return keras.layers.Dense(1)

    with pytest.raises(TypeError, match=r"factory 'build' must return a keras.Model, but returned Dense"):
        SafeTrainer(build)


def test_factory_builds_the_live_model():
    trainer = SafeTrainer(make_mlp)
    assert isinstance(trainer.model, keras.Model)
    x, y = regression_data(n=32)
    trainer.fit(x, y, epochs=1, verbose=0)
    assert int(trainer.model.optimizer.iterations) == 1


def test_uncompiled_model_without_optimizer_and_loss_is_a_clear_error():
    model = make_mlp(compile=False)
    x, y = regression_data(n=16)
    with pytest.raises(ConfigurationError, match=r"You must call `compile\(\)` before using the model"):
        SafeTrainer(model).fit(x, y, verbose=0)
    with pytest.raises(ConfigurationError, match=r"You must call `compile\(\)`"):
        SafeTrainer(model).evaluate(x, y, verbose=0)
    with pytest.raises(ValueError, match=r"needs an optimizer"):
        SafeTrainer(model, loss="mse")
    # Compiled without a loss and no `add_loss`: Keras's own error, at the trace, before any step runs.
    trainer = SafeTrainer(model, optimizer="adam")
    with pytest.raises(ValueError, match=r"No loss to compute"):
        trainer.fit(x, y, verbose=0)
    assert int(trainer.model.optimizer.iterations) == 0


def test_a_model_whose_only_losses_come_from_add_loss_trains_as_in_keras():
    class Penalty(keras.layers.Layer):
        def call(self, x):
            self.add_loss(0.1 * keras.ops.sum(keras.ops.square(x)))
            return x

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), Penalty(), keras.layers.Dense(1)])
        m.compile(optimizer="adam")  # no loss: Keras allows it
        return m

    x, y = regression_data(n=64)
    plain = build()
    expected = plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False).history
    trainer = SafeTrainer(build())
    history = trainer.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False).history
    assert history.keys() == expected.keys()
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-6)
    assert trainer.evaluate(x, y, verbose=0) == pytest.approx(plain.evaluate(x, y, verbose=0), rel=1e-6)


def test_uncompiled_model_can_predict():
    model = make_mlp(compile=False)
    assert SafeTrainer(model).predict(np.zeros((5, 8), "float32"), verbose=0).shape == (5, 1)


def test_arguments_override_the_compiled_configuration():
    model = make_mlp()  # compiled with adam, mse, mae
    trainer = SafeTrainer(model, optimizer=keras.optimizers.SGD(0.01), metrics=["mse"])
    assert isinstance(trainer.model.optimizer, keras.optimizers.SGD)
    x, y = regression_data(n=32)
    history = trainer.fit(x, y, epochs=1, verbose=0)
    assert {"loss", "mse"} <= set(history.history) and "mae" not in history.history
    assert trainer.model.loss == "mse"


def test_uncompiled_model_with_arguments_trains():
    trainer = SafeTrainer(make_mlp(compile=False), optimizer="adam", loss="mae")
    x, y = regression_data(n=32)
    assert np.isfinite(trainer.fit(x, y, epochs=1, verbose=0).history["loss"][0])


class ModelWithOwnTrainStep(keras.Model):
    """A Keras custom train_step: it doubles the learning signal, so it is observable."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.calls = keras.metrics.Sum(name="custom_steps")

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.calls.update_state(1.0)
        return {"loss": loss, "custom_steps": self.calls.result()}


def test_a_model_s_own_train_step_is_used():
    model = ModelWithOwnTrainStep()
    model.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(n=40)
    history = SafeTrainer(model).fit(x, y, batch_size=10, epochs=2, verbose=0)
    assert history.history["custom_steps"] == [8.0, 8.0] or history.history["custom_steps"][-1] >= 4.0
    assert int(model.optimizer.iterations) == 8


class ClippedTrainer(SafeTrainer):
    """A Keras-style custom step, moved over unchanged but for the class it lives in."""

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, self.trainable_variables)
        self.last_norm = None
        grads, _ = tf.clip_by_global_norm(grads, 1e-3)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def test_subclass_train_step_is_compiled_once_and_used():
    x, y = regression_data(n=64)
    plain, clipped = make_mlp(), make_mlp()
    w0 = [w.copy() for w in plain.get_weights()]
    SafeTrainer(plain, optimizer=keras.optimizers.SGD(1.0)).fit(x, y, batch_size=16, epochs=1, verbose=0)
    trainer = ClippedTrainer(clipped, optimizer=keras.optimizers.SGD(1.0))
    history = trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert trainer.trace_counts["train"] == 1
    step_plain = sum(np.abs(a - b).sum() for a, b in zip(plain.get_weights(), w0))
    step_clipped = sum(np.abs(a - b).sum() for a, b in zip(clipped.get_weights(), w0))
    assert step_clipped < 0.01 * step_plain  # 4 steps of global norm <= 1e-3
    assert history.history["loss"][0] > 0


class ExtraPenaltyTrainer(SafeTrainer):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        base = super().compute_loss(x, y, y_pred, sample_weight, training)
        return base + 100.0


def test_subclass_compute_loss_changes_the_logged_loss():
    x, y = regression_data(n=32)
    plain = SafeTrainer(make_mlp()).evaluate(x, y, verbose=0, return_dict=True)["loss"]
    penalised = ExtraPenaltyTrainer(make_mlp()).evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert penalised == pytest.approx(plain + 100.0, rel=1e-5)


class MeanOnlyPredictor(SafeTrainer):
    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return {"pred": self(x, training=False), "mean": tf.reduce_mean(x, axis=1, keepdims=True)}


def test_subclass_predict_step_returns_its_structure():
    x, _ = regression_data(n=21)
    out = MeanOnlyPredictor(make_mlp()).predict(x, batch_size=4, verbose=0)
    assert out["pred"].shape == (21, 1)
    np.testing.assert_allclose(out["mean"][:, 0], x.mean(axis=1), rtol=1e-5)


def test_safetrainer_never_calls_keras_own_loops(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("SafeTrainer called a Keras loop")

    for name in (
        "fit",
        "evaluate",
        "predict",
        "make_train_function",
        "make_test_function",
        "make_predict_function",
        "train_on_batch",
    ):
        monkeypatch.setattr(keras.Model, name, forbidden)
    x, y = regression_data(n=40)
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, epochs=1, validation_split=0.25, verbose=0)
    trainer.evaluate(x, y, verbose=0)
    trainer.predict(x, verbose=0)
    assert trainer.model.train_function is None


def test_stop_training_set_by_a_callback_ends_training_after_that_epoch():
    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    x, y = regression_data(n=32)
    history = SafeTrainer(make_mlp()).fit(x, y, epochs=10, verbose=0, callbacks=[StopAfterTwo()])
    assert len(history.history["loss"]) == 2


def test_stop_training_mid_epoch_stops_at_that_batch():
    class StopAtBatch3(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                self.model.stop_training = True

    x, y = regression_data(n=80)
    trainer = SafeTrainer(make_mlp())
    history = trainer.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[StopAtBatch3()])
    assert len(history.history["loss"]) == 1
    assert int(trainer.model.optimizer.iterations) == 4


def test_initial_epoch_continues_the_epoch_count():
    x, y = regression_data(n=32)
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(epoch))
    history = SafeTrainer(make_mlp()).fit(x, y, epochs=5, initial_epoch=3, verbose=0, callbacks=[cb])
    assert seen == [3, 4]
    assert history.epoch == [3, 4]


def test_validation_freq_runs_validation_on_those_epochs_only():
    x, y = regression_data(n=40)
    history = SafeTrainer(make_mlp()).fit(x, y, epochs=4, validation_split=0.25, validation_freq=2, verbose=0)
    assert len(history.history["loss"]) == 4 and len(history.history["val_loss"]) == 2


def test_evaluate_returns_a_list_or_scalar_or_dict_like_keras():
    x, y = regression_data(n=32)
    trainer = SafeTrainer(make_mlp())
    loss, mae = trainer.evaluate(x, y, verbose=0)
    assert isinstance(loss, float) and isinstance(mae, float)
    assert set(trainer.evaluate(x, y, verbose=0, return_dict=True)) == {"loss", "mae"}
    only_loss = SafeTrainer(make_mlp(metrics=None))
    assert isinstance(only_loss.evaluate(x, y, verbose=0), float)


def test_memory_telemetry_lands_in_history_and_trainer_memory():
    x, y = regression_data(n=32)
    trainer = SafeTrainer(make_mlp(), memory_logs=True)
    history = trainer.fit(x, y, epochs=4, verbose=0)
    rss = history.history["rss_mb"]
    assert len(rss) == 4 and all(r > 50 for r in rss)
    assert trainer.memory.series("rss_mb") == rss
    assert [s.epoch for s in trainer.memory] == [0, 1, 2, 3]
    assert trainer.memory[-1].traces == {"train": 1, "test": 0, "predict": 0}
    assert np.isfinite(trainer.memory.slope())


def test_jit_compile_follows_the_model_unless_given():
    x, y = regression_data(n=32)
    assert SafeTrainer(make_mlp()).jit_compile is False  # "auto" on a CPU-only machine: off, as in Keras
    xla = make_mlp(jit_compile=True)
    trainer = SafeTrainer(xla)
    assert trainer.jit_compile is True and trainer.steps.jit_compile is True
    assert np.isfinite(trainer.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    assert SafeTrainer(make_mlp(jit_compile=True), jit_compile=False).jit_compile is False
    with pytest.raises(TypeError, match="jit_compile"):
        SafeTrainer(make_mlp(), jit_compile="xla")
    assert SafeTrainer(make_mlp(jit_compile=True), jit_compile="auto").jit_compile is True


def test_run_eagerly_is_reported_as_ignored():
    model = make_mlp(run_eagerly=True)
    with pytest.warns(UserWarning, match="run_eagerly is ignored"):
        trainer = SafeTrainer(model)
    x, y = regression_data(n=16)
    trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.trace_counts["train"] == 1


def test_ragged_outputs_through_fit_evaluate_and_predict_in_chunks():
    import tensorflow as tf

    class Doubles(keras.Model):
        def call(self, x):
            return x * 2

    x = tf.ragged.constant([[1.0], [2.0, 3.0], [4.0], [5.0, 6.0, 7.0], [8.0]])
    model = Doubles()
    model.compile(optimizer="adam", loss=lambda y, y_pred, sample_weight=None: 0.0)
    trainer = SafeTrainer(model, steps_per_execution=2)  # several steps per call
    trainer.fit(x, x, batch_size=2, epochs=2, verbose=0)
    out = trainer.predict(x, batch_size=2, verbose=0)
    assert isinstance(out, tf.RaggedTensor)
    assert out.to_list() == [[2.0], [4.0, 6.0], [8.0], [10.0, 12.0, 14.0], [16.0]]
    assert trainer.trace_counts["predict"] == 1


def test_sparse_outputs_through_predict_in_chunks_as_in_keras():
    import tensorflow as tf

    class ToSparse(keras.layers.Layer):
        def call(self, x):
            return tf.sparse.from_dense(x)

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        return keras.Model(inputs, ToSparse()(keras.layers.Dense(4, activation="relu")(inputs)))

    x = np.random.default_rng(0).standard_normal((10, 4)).astype("float32")
    expected = build().predict(x, batch_size=4, verbose=0)
    trainer = SafeTrainer(build(), steps_per_execution=2)
    got = trainer.predict(x, batch_size=4, verbose=0)
    assert isinstance(got, tf.SparseTensor) and got.dense_shape.numpy().tolist() == [10, 4]
    np.testing.assert_array_equal(tf.sparse.to_dense(got).numpy(), tf.sparse.to_dense(expected).numpy())
    assert trainer.trace_counts["predict"] == 1
