"""The loop's events and stop conditions: what policies and callbacks hear, also when something fails."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, regression_data

import safetrain
from safetrain import Policy, RetraceError, RetraceGuard, SafeTrainer, StepError, StopOnNaN
from safetrain import steps as steps_module

x, y = regression_data(n=64)


class Ends(Policy):
    def __init__(self):
        self.ended = 0

    def on_train_end(self, trainer):
        self.ended += 1


class FailAtEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("callback failed")


def test_policies_hear_train_end_even_when_fit_fails():
    ends = Ends()
    trainer = SafeTrainer(make_mlp(), policies=[ends])
    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.fit(x, y, epochs=2, verbose=0, callbacks=[FailAtEpochEnd()])
    assert ends.ended == 1


def test_the_per_step_nan_check_is_off_after_a_fit_that_failed():
    trainer = SafeTrainer(make_mlp(), policies=[StopOnNaN()])
    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.fit(x, y, epochs=2, verbose=0, callbacks=[FailAtEpochEnd()])
    assert trainer.steps["train"].watch_nonfinite is False


class NaNSpotter(Policy):
    watches_nonfinite = True

    def __init__(self):
        self.seen = []

    def on_nonfinite_loss(self, trainer, epoch, step, logs):
        self.seen.append((epoch, step, logs["loss"]))


@pytest.mark.parametrize("stepwise", [32, 0], ids=["one call a step", "in the graph loop"])
def test_a_user_policy_with_watches_nonfinite_hears_the_exact_step(stepwise, monkeypatch):
    monkeypatch.setattr(steps_module, "STEPWISE_STEPS", stepwise)
    bad = y.copy()
    bad[5 * 8 + 3] = np.nan  # batch 5 of 8 samples: its loss is NaN
    spotter = NaNSpotter()
    trainer = SafeTrainer(make_mlp(), policies=[spotter])
    trainer.fit(x, bad, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert spotter.seen and spotter.seen[0][:2] == (0, 5) and np.isnan(spotter.seen[0][2])
    assert trainer.steps["train"].watch_nonfinite is False  # only while that fit ran


def test_a_failing_step_raises_the_tensorflow_error_keras_would_with_where_it_failed():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    labels = np.zeros((40,), "int64")
    labels[33] = 7  # batch 4 of 8: out of range for 3 classes
    data = tf.data.Dataset.from_tensor_slices((np.ones((40, 4), "float32"), labels)).batch(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"fit: epoch index 0, batch 4 failed") as info:
        SafeTrainer(model).fit(data, epochs=1, verbose=0)
    assert isinstance(info.value, StepError) and isinstance(info.value, safetrain.DataError)
    assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)


def test_retrace_guard_listens_only_while_fit_runs():
    guard = RetraceGuard(max_traces=1)
    trainer = SafeTrainer(make_mlp(), policies=[guard])
    trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.steps.listeners == []
    wide = tf.data.Dataset.from_tensor_slices((x.astype("float64"), y)).batch(16)  # another dtype: a retrace
    trainer.evaluate(x, y, verbose=0)
    trainer.evaluate(wide, verbose=0)  # a second test trace, outside any fit: not guarded
    assert trainer.trace_counts["test"] == 2
    with pytest.raises(RetraceError):  # inside fit it is
        trainer.fit(wide, epochs=2, initial_epoch=1, verbose=0)
