"""train_on_batch, test_on_batch and predict_on_batch: Keras's signatures and numbers, one trace each."""

import keras
import numpy as np
import pytest
from conftest import make_mlp, regression_data

from safetrain import MemoryBudget, Policy, SafeTrainer

x, y = regression_data(n=96)


def model(seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return m


def test_train_test_and_predict_on_batch_give_what_keras_gives():
    keras_model, trainer = model(), SafeTrainer(model())
    for start in range(0, 96, 32):
        xb, yb = x[start : start + 32], y[start : start + 32]
        np.testing.assert_allclose(trainer.train_on_batch(xb, yb), keras_model.train_on_batch(xb, yb), rtol=1e-6)
    assert trainer.test_on_batch(x, y, return_dict=True) == pytest.approx(
        keras_model.test_on_batch(x, y, return_dict=True), rel=1e-6
    )
    np.testing.assert_allclose(trainer.predict_on_batch(x[:5]), keras_model.predict_on_batch(x[:5]), rtol=1e-6)
    for a, b in zip(trainer.model.get_weights(), keras_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_each_kind_is_traced_once_whatever_the_batch_size():
    trainer = SafeTrainer(model())
    for size in (3, 7, 16, 1, 32):
        trainer.train_on_batch(x[:size], y[:size])
        trainer.test_on_batch(x[:size], y[:size])
        assert trainer.predict_on_batch(x[:size]).shape == (size, 1)
    assert trainer.trace_counts == {"train": 1, "test": 1, "predict": 1}
    assert trainer.progress.global_step == 5 and int(trainer.model.optimizer.iterations) == 5


def test_sample_and_class_weights_and_return_values_follow_keras():
    keras_model, trainer = model(), SafeTrainer(model())
    weights = np.linspace(0.5, 2.0, 32).astype("float32")
    np.testing.assert_allclose(
        trainer.train_on_batch(x[:32], y[:32], sample_weight=weights),
        keras_model.train_on_batch(x[:32], y[:32], sample_weight=weights),
        rtol=1e-6,
    )
    logs = trainer.train_on_batch(x[:32], y[:32], return_dict=True)
    assert set(logs) == {"loss", "mae"} and all(isinstance(v, float) for v in logs.values())
    with pytest.raises(ValueError, match="`class_weight` and `sample_weight`"):
        trainer.train_on_batch(x[:32], y[:32], sample_weight=weights, class_weight={0: 1.0})


class Every2(Policy):
    every_n_batches = 2

    def __init__(self):
        self.steps = []

    def on_batch_end(self, trainer, step, sample):
        self.steps.append(step)


def test_policies_that_watch_steps_hear_train_on_batch():
    seen = Every2()
    trainer = SafeTrainer(model(), policies=[seen, MemoryBudget(1e9, check_every=3)])
    for _ in range(6):
        trainer.train_on_batch(x[:16], y[:16])
    assert seen.steps == [2, 4, 6]


def test_train_on_batch_needs_an_optimizer_like_fit():
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"You must call `compile\(\)`"):
        SafeTrainer(plain).train_on_batch(x[:4], y[:4])


def test_predict_and_evaluate_on_one_batch_take_the_direct_path_with_keras_results():
    model = make_mlp()
    trainer = SafeTrainer(model)
    small_x, small_y = x[:5], y[:5]
    batches = []
    cb = keras.callbacks.LambdaCallback(on_predict_batch_end=lambda batch, logs: batches.append(batch))
    for _ in range(3):
        np.testing.assert_allclose(
            trainer.predict(small_x, verbose=0, callbacks=[cb]), model.predict(small_x, verbose=0), rtol=1e-6
        )
        assert trainer.evaluate(small_x, small_y, verbose=0) == pytest.approx(
            model.evaluate(small_x, small_y, verbose=0), rel=1e-6
        )
    assert batches == [0, 0, 0]
    assert trainer.trace_counts == {"train": 0, "test": 1, "predict": 1}
    # the same compiled steps serve inputs of several batches
    np.testing.assert_allclose(
        trainer.predict(x, batch_size=8, verbose=0), model.predict(x, batch_size=8, verbose=0), rtol=1e-6
    )
    assert trainer.trace_counts["predict"] == 1


def test_train_on_batch_loops_get_memory_samples_and_memory_policies():
    from safetrain import on_batch

    budget = MemoryBudget(max_rss_mb=1e9, action="stop", check_every=50)  # never exceeded: counts its checks
    trainer = SafeTrainer(make_mlp(), policies=[budget])
    for _ in range(2 * on_batch.MEMORY_EVERY + 10):
        trainer.train_on_batch(x[:8], y[:8])
    samples = list(trainer.memory)
    assert [s.step for s in samples] == [on_batch.MEMORY_EVERY, 2 * on_batch.MEMORY_EVERY]
    assert all(s.epoch is None and s.rss_mb > 50 and s.traces["train"] == 1 for s in samples)
    assert budget.events == []  # checked, never over
