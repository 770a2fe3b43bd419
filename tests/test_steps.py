"""Compiled steps: one trace per step kind, many steps per call, retraces visible."""

import keras
import numpy as np
import tensorflow as tf
from conftest import make_mlp, regression_data

from safetrain import SafeTrainer, _compat
from safetrain import steps as steps_module
from safetrain.graph_loops import ChunkSizer


def test_partial_last_batch_traces_each_step_once():
    x, y = regression_data(n=107)  # 107 = 6 * 16 + 11
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, batch_size=16, epochs=3, validation_data=(x[:37], y[:37]), verbose=0)
    trainer.predict(x[:23], batch_size=16, verbose=0)
    assert trainer.trace_counts == {"train": 1, "test": 1, "predict": 1}


def sequence_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((None, 4)), keras.layers.Conv1D(8, 3, padding="same"), keras.layers.LSTM(8), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def test_variable_length_sequences_trace_the_train_step_once():
    rng = np.random.default_rng(0)

    def sequences():
        for length in range(5, 45):  # 40 different shapes
            yield rng.standard_normal((4, length, 4)).astype("float32"), rng.standard_normal((4, 1)).astype("float32")

    trainer = SafeTrainer(sequence_model())
    trainer.fit(sequences(), epochs=1, verbose=0)
    # 40 steps, and the count model.fit adds for its call that finds the generator exhausted
    assert int(trainer.model.optimizer.iterations) == 41
    assert trainer.trace_counts["train"] == 1
    spec = trainer.steps.signatures["train"][0]
    assert spec[0].shape.as_list()[1:] == [None, 4]  # every length, one trace


def test_padded_tf_data_batches_trace_once():
    lengths = list(range(3, 30))
    ds = tf.data.Dataset.from_generator(
        lambda: ((np.ones((n, 4), "float32"), np.ones((1,), "float32")) for n in lengths),
        output_signature=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([1], tf.float32)),
    )
    trainer = SafeTrainer(sequence_model())
    trainer.fit(ds.padded_batch(5), epochs=2, verbose=0)
    assert trainer.trace_counts["train"] == 1


def test_repeated_fit_evaluate_predict_calls_do_not_retrace():
    x, y = regression_data(n=64)
    trainer = SafeTrainer(make_mlp())

    def calls():
        for n in (64, 40, 17):
            trainer.fit(x[:n], y[:n], batch_size=8, epochs=1, verbose=0)
            trainer.evaluate(x[:n], y[:n], verbose=0)
            trainer.predict(x[:n], verbose=0)

    calls()
    # Each step was traced for the fixed batch size of the first call (8 for fit, 32 for evaluate and predict,
    # as model.fit traces them), then once with the batch dimension relaxed; nothing more, however many calls.
    assert trainer.trace_counts == {"train": 2, "test": 2, "predict": 2}
    assert all(step.batch_relaxations == 1 for step in (trainer.steps[k] for k in ("train", "test", "predict")))
    calls()
    assert trainer.trace_counts == {"train": 2, "test": 2, "predict": 2}


def test_a_new_input_signature_is_a_counted_retrace_with_both_signatures():
    x, y = regression_data(n=32)
    trainer = SafeTrainer(make_mlp())
    events = []
    trainer.steps.listeners.append(events.append)
    trainer.evaluate(x, y, verbose=0)
    wide = tf.data.Dataset.from_tensor_slices((x.astype("float64"), y)).batch(8)
    trainer.evaluate(wide, verbose=0)
    assert trainer.trace_counts["test"] == 2
    assert [e.kind for e in events] == ["test", "test"]
    assert events[1].old_spec[0].dtype == tf.float32 and events[1].new_spec[0].dtype == tf.float64


def test_auto_runs_many_steps_per_call_without_batch_hooks():
    x, y = regression_data(n=640)
    trainer = SafeTrainer(make_mlp())
    calls = []
    step = trainer.steps["train"]
    run = step.run
    step.run = lambda it, n, spec=None, **kw: calls.append(n) or run(it, n, spec, **kw)
    trainer.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert int(trainer.model.optimizer.iterations) == 320
    assert len(calls) < 320 / 4 and max(calls) > 8


class BatchRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append((batch, logs["loss"]))


def test_a_callback_with_batch_hooks_sees_every_batch_with_its_logs():
    x, y = regression_data(n=50)
    recorder = BatchRecorder()
    SafeTrainer(make_mlp()).fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[recorder])
    assert [b for b, _ in recorder.batches] == list(range(7)) * 2
    assert all(isinstance(loss, float) for _, loss in recorder.batches)


def test_integer_steps_per_execution_reports_batches_per_call_like_keras():
    x, y = regression_data(n=50)
    recorder, keras_recorder = BatchRecorder(), BatchRecorder()
    SafeTrainer(make_mlp(), steps_per_execution=3).fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[recorder])
    make_mlp(steps_per_execution=3).fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[keras_recorder])
    # Keras 3.11+ reports a call's last batch as first + 3 - 1, also for the short last call (7 batches:
    # 6, 8); older Keras reports its first batch.
    expected = [2, 5, 8] if _compat.BATCH_END_IS_LAST_STEP else [0, 3, 6]
    assert [b for b, _ in recorder.batches] == [b for b, _ in keras_recorder.batches] == expected
    # A model compiled with steps_per_execution=3 runs that way without the argument
    recorder = BatchRecorder()
    SafeTrainer(make_mlp(steps_per_execution=3)).fit(x, y, batch_size=8, verbose=0, callbacks=[recorder])
    assert [b for b, _ in recorder.batches] == expected


class OptimizerStateAtTrace(SafeTrainer):
    def train_step(self, data):
        self.optimizer_built_at_trace = self.optimizer.built
        self.variables_at_trace = len(self.optimizer.variables)
        return super().train_step(data)


def test_optimizer_is_built_eagerly_before_the_first_trace():
    x, y = regression_data(n=16)
    trainer = OptimizerStateAtTrace(make_mlp())
    trainer.fit(x, y, epochs=1, verbose=0)
    assert trainer.optimizer_built_at_trace is True
    assert trainer.variables_at_trace == len(trainer.optimizer.variables)


def test_chunk_sizer_grows_to_the_target_time_and_respects_caps():
    sizer = ChunkSizer("auto", target_seconds=0.25, start=8)
    assert sizer.next(None) == 8
    sizer.observe(8, 8, 5.0)  # first call traces: ignored
    assert sizer.size == 8
    sizer.observe(8, 8, 0.008)  # 1000 steps/s -> ~250 steps per call
    assert sizer.size == 128
    assert sizer.next(remaining=30) == 30
    assert sizer.next(remaining=None, boundary=5) == 5
    fixed = ChunkSizer(10)
    fixed.observe(10, 10, 0.001)
    assert fixed.next(None) == 10


def test_a_short_fit_runs_its_steps_one_call_each_and_a_longer_one_traces_the_loop():
    x, y = regression_data(n=64)
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 8 steps: no loop traced for them
    step = trainer.steps["train"]
    assert step.loop_traces == 0 and step.stepwise_steps == 8
    trainer.fit(x, y, batch_size=8, epochs=4, verbose=0)  # 8 + 24 = STEPWISE_STEPS one call each, then the loop
    assert step.stepwise_steps == steps_module.STEPWISE_STEPS == 32 and step.loop_traces == 1
    assert trainer.trace_counts["train"] == 1


def test_steps_run_one_call_each_give_the_numbers_of_the_loop(monkeypatch):
    x, y = regression_data(n=96)
    weights = {}
    for stepwise in (32, 0):
        monkeypatch.setattr(steps_module, "STEPWISE_STEPS", stepwise)
        model = make_mlp(seed=3)
        history = SafeTrainer(model).fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights[stepwise] = ([w.copy() for w in model.get_weights()], history.history["loss"])
    for a, b in zip(weights[32][0], weights[0][0]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(weights[32][1], weights[0][1], rtol=1e-6)
