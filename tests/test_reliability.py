"""Out-of-memory recovery by microbatching, StopOnNaN with rollback, and bad input named with its batch."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import regression_data

from safetrain import (
    Checkpoint,
    DataError,
    NonFiniteLoss,
    OutOfMemory,
    OutOfMemoryWarning,
    SafeTrainer,
    StopOnNaN,
    checkpoint,
    faults,
)

x, y = regression_data(n=200, seed=3)


def build(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def fit(trainer, data=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfMemoryWarning)
        if data is None:
            return trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, **kwargs).history
        return trainer.fit(data, epochs=2, verbose=0, **kwargs).history


def assert_same(t1, h1, t2, h2, atol=0.0):
    for key in ("loss", "mae"):
        np.testing.assert_allclose(h1[key], h2[key], rtol=0, atol=atol)
    for a, b in zip(t1.model.get_weights(), t2.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


# -- out of memory -------------------------------------------------------------------------------


def test_microbatches_give_the_full_batch_update_up_to_summation_order():
    full, micro = SafeTrainer(build()), SafeTrainer(build(), microbatch_size=5)
    assert_same(full, fit(full), micro, fit(micro), atol=1e-6)


def test_microbatches_of_an_embedding_keep_its_sparse_gradient():
    # Keras's optimizers update only the rows a sparse (IndexedSlices) gradient lists: summed dense, the moments
    # of every other row would decay too, and training would differ from whole batches.
    def embedding_model():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(500, 8),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        return model

    tokens = np.random.default_rng(0).integers(0, 500, (96, 6))
    full, micro = SafeTrainer(embedding_model()), SafeTrainer(embedding_model(), microbatch_size=7)
    h1 = full.fit(tokens, y[:96], batch_size=32, epochs=2, verbose=0).history
    h2 = micro.fit(tokens, y[:96], batch_size=32, epochs=2, verbose=0).history
    assert_same(full, h1, micro, h2, atol=1e-6)


def test_oom_on_the_first_batch_halves_until_it_fits_and_matches_that_size_from_the_start():
    trainer = SafeTrainer(build(), memory_logs=True)
    faults.simulate_oom_above(trainer, 8)
    with pytest.warns(
        OutOfMemoryWarning,
        match=r"epoch index 0, batch 0 \(a batch of 32\): retried in "
        r"microbatches of 8 \(was 32\)",
    ):
        history = trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    assert trainer.oom_events == [
        {"epoch": 0, "step": 0, "global_step": 1, "batch_size": 32, "old_microbatch_size": 32, "new_microbatch_size": 8}
    ]
    assert history["microbatch_size"] == [8, 8]
    reference = SafeTrainer(build(), microbatch_size=8)
    assert_same(trainer, history, reference, fit(reference))  # bit for bit
    assert trainer.trace_counts["train"] == 1  # the microbatched step, traced once


def mixed_batches():
    """Batches of 8, one of 32 in the middle (step 5), then 8 again."""
    first = tf.data.Dataset.from_tensor_slices((x[:40], y[:40])).batch(8)
    big = tf.data.Dataset.from_tensor_slices((x[40:72], y[40:72])).batch(32)
    last = tf.data.Dataset.from_tensor_slices((x[72:104], y[72:104])).batch(8)
    return first.concatenate(big).concatenate(last)


def test_oom_in_the_middle_of_a_chunk_keeps_the_completed_steps_and_retries_only_the_failed_batch():
    trainer = SafeTrainer(build())
    faults.simulate_oom_above(trainer, 16)
    history = fit(trainer, mixed_batches())
    assert [(e["epoch"], e["step"], e["batch_size"], e["new_microbatch_size"]) for e in trainer.oom_events] == [
        (0, 5, 32, 16)
    ]
    assert int(trainer.model.optimizer.iterations) == 2 * 10
    reference = SafeTrainer(build(), microbatch_size=16)
    assert_same(trainer, history, reference, fit(reference, mixed_batches()), atol=1e-6)


def test_below_one_sample_is_a_clear_error():
    trainer = SafeTrainer(build())
    faults.simulate_oom_above(trainer, 0)
    with pytest.raises(OutOfMemory, match=r"even with microbatches of 1 sample \(batch of 32\)"):
        fit(trainer)


def test_without_recovery_the_real_exception_type_surfaces():
    trainer = SafeTrainer(build(), oom_recovery=False)
    faults.simulate_oom_above(trainer, 8)
    with pytest.raises(tf.errors.ResourceExhaustedError, match="simulated out of memory"):
        fit(trainer)


class OwnStep(SafeTrainer):
    def train_step(self, data):
        return super().train_step(data)


def test_a_custom_train_step_cannot_be_split_and_says_so():
    trainer = OwnStep(build())
    faults.simulate_oom_above(trainer, 8)
    with pytest.raises(OutOfMemory, match=r"overrides train_step; use a smaller batch_size"):
        fit(trainer)


# -- non-finite loss -----------------------------------------------------------------------------


def poisoned():
    """Targets with an Inf at sample 150: batch 4 of every epoch (batch 32, no shuffle). (An Inf or NaN
    input need not reach the loss: ReLU maps NaN to 0.)"""
    bad = y.copy()
    bad[150, 0] = np.inf
    return bad


def test_stop_on_nan_stops_at_the_exact_step_and_rolls_back_to_a_usable_model():
    model = build()
    start = [w.copy() for w in model.get_weights()]
    policy = StopOnNaN()
    trainer = SafeTrainer(model, policies=[policy])
    with pytest.warns(NonFiniteLoss, match=r"epoch index 0 \(Epoch 1\), batch 4 \(global step 5\).*rolled back"):
        history = trainer.fit(x, poisoned(), batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert policy.event["epoch"] == 0 and policy.event["step"] == 4 and policy.event["rolled_back_to_epoch"] == 0
    assert len(history.history["loss"]) == 1 and not np.isfinite(history.history["loss"][0])
    for a, b in zip(start, trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(trainer.predict(x[:5], verbose=0)).all()


def test_without_stop_on_nan_training_runs_on_with_nan_weights():
    trainer = SafeTrainer(build())
    history = trainer.fit(x, poisoned(), batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    assert not all(np.isfinite(w).all() for w in trainer.model.get_weights())


def test_stop_on_nan_without_rollback_keeps_the_state_it_stopped_in():
    policy = StopOnNaN(rollback=False)
    trainer = SafeTrainer(build(), policies=[policy])
    with pytest.warns(NonFiniteLoss, match="training stopped."):
        trainer.fit(x, poisoned(), batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert policy.event["rolled_back_to_epoch"] is None and int(trainer.model.optimizer.iterations) == 5


# -- bad input -----------------------------------------------------------------------------------


def classifier():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


labels = np.random.default_rng(0).integers(0, 4, 64)
labels[37] = 7


def test_labels_out_of_range_in_arrays_are_refused_before_training():
    model = classifier()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"`y` holds labels outside \[0, 4\).*sample 37 has label 7"):
        SafeTrainer(model).fit(x[:64], labels, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_labels_out_of_range_in_a_dataset_name_the_batch():
    ds = tf.data.Dataset.from_tensor_slices((x[:64], labels)).batch(8)
    with pytest.raises(
        DataError,
        match=r"fit: epoch index 0, batch 4 failed: Received a label value of 7 "
        r"which is outside the valid range of \[0, 4\)",
    ):
        SafeTrainer(classifier()).fit(ds, verbose=0)


def test_inputs_that_do_not_fit_the_model_are_refused_before_training():
    with pytest.raises(ValueError, match=r"`x` has shape \(None, 7\) per batch, but the model expects \(None, 8\)"):
        SafeTrainer(build()).fit(x[:, :7], y, verbose=0)
    with pytest.raises(TypeError, match=r"`x` has dtype string"):
        SafeTrainer(build()).evaluate(np.array([["a"] * 8] * 4), y[:4], verbose=0)


def nan_at_sample_20():
    bad = x[:64].copy()
    bad[20, 3] = np.nan
    return bad


def test_check_inputs_refuses_nan_in_arrays_naming_the_sample():
    with pytest.raises(ValueError, match=r"`x` contains NaN or Inf: sample 20 \(batch 2 without shuffling\)"):
        SafeTrainer(build(), check_inputs=True).fit(nan_at_sample_20(), y[:64], batch_size=8, shuffle=False, verbose=0)


def test_check_inputs_refuses_nan_in_a_dataset_naming_the_batch():
    ds = tf.data.Dataset.from_tensor_slices((nan_at_sample_20(), y[:64])).batch(8)
    with pytest.raises(DataError, match=r"epoch index 0, batch 2 failed: check_inputs: .* NaN or Inf"):
        SafeTrainer(build(), check_inputs=True).fit(ds, verbose=0)


def test_without_check_inputs_nan_inputs_train_silently():
    trainer = SafeTrainer(build())
    trainer.fit(nan_at_sample_20(), y[:64], batch_size=8, shuffle=False, verbose=0)
    assert int(trainer.model.optimizer.iterations) == 8


def test_a_generator_failing_mid_epoch_names_the_batch_and_leaves_checkpoints_intact(tmp_path):
    def sensor():
        for i in range(12):
            if i == 8:
                raise ValueError("sensor 3 went offline")
            yield x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

    policy = Checkpoint(tmp_path / "c", every_n_batches=3)
    with pytest.raises(
        DataError, match=r"fit: epoch index 0, batch 8 failed: ValueError: sensor 3 went offline"
    ) as info:
        SafeTrainer(build(), policies=[policy]).fit(sensor(), epochs=1, verbose=0)
    assert info.value.__cause__ is not None
    assert [os.path.basename(p) for p in policy.written] == ["ckpt-000000000003", "ckpt-000000000006"]
    found = checkpoint.latest(str(tmp_path / "c"))
    assert found is not None and found[0].endswith("ckpt-000000000006")
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".tmp-")]
