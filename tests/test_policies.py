"""Each built-in policy does its job, and the same run without it does not."""

import gc
import warnings
import weakref

import keras
import numpy as np
import pytest
from conftest import make_mlp, regression_data

from safetrain import (
    ClearSession,
    GarbageCollect,
    LeakDetector,
    LeakWarning,
    MemoryBudget,
    MemoryBudgetExceeded,
    Policy,
    ResetStates,
    RetraceError,
    RetraceGuard,
    SafeTrainer,
    TrimMalloc,
    memory,
)

x, y = regression_data(n=64)


def test_policies_are_validated_and_exported_from_both_places():
    import safetrain.policies as module

    assert module.ClearSession is ClearSession
    with pytest.raises(TypeError, match=r"`policies\[0\]` must be a safetrain.Policy, got str"):
        SafeTrainer(make_mlp(), policies=["ClearSession"])
    for bad in (
        lambda: ClearSession(0),
        lambda: ResetStates("sometimes"),
        lambda: MemoryBudget(-1),
        lambda: MemoryBudget(10, action="explode"),
        lambda: RetraceGuard(action="ignore"),
        lambda: LeakDetector(window=2),
    ):
        with pytest.raises(ValueError):
            bad()


class Recorder(Policy):
    def __init__(self, every_n_batches=None):
        self.every_n_batches = every_n_batches
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.calls.append(("epoch_begin", epoch))

    def on_batch_end(self, trainer, step, sample):
        self.calls.append(("batch", step, sample.rss_mb > 0))

    def on_epoch_end(self, trainer, epoch, logs, sample):
        self.calls.append(("epoch_end", epoch, "loss" in logs, sample.epoch))

    def on_train_end(self, trainer):
        self.calls.append("train_end")


def test_policy_hooks_run_in_order_and_batch_hooks_on_exact_steps():
    first, second = Recorder(every_n_batches=3), Recorder()
    SafeTrainer(make_mlp(), policies=[first, second]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert second.calls == [
        "train_begin",
        ("epoch_begin", 0),
        ("epoch_end", 0, True, 0),
        ("epoch_begin", 1),
        ("epoch_end", 1, True, 1),
        "train_end",
    ]
    assert [c[1] for c in first.calls if c[0] == "batch"] == [3, 6, 9, 12, 15]


# -- ResetStates ---------------------------------------------------------------------------------------


def stateful_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5, 3), batch_size=4), keras.layers.LSTM(6, stateful=True), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


class StateAtEpochBegin(Policy):
    def __init__(self):
        self.norms = []

    def on_epoch_begin(self, trainer, epoch):
        lstm = trainer.model.layers[0]
        self.norms.append(float(sum(np.abs(s.numpy()).sum() for s in lstm.states)))


@pytest.mark.parametrize("with_policy", [True, False])
def test_reset_states_every_epoch_zeroes_stateful_rnns(with_policy):
    xs = np.random.default_rng(0).standard_normal((16, 5, 3)).astype("float32")
    ys = np.ones((16, 1), "float32")
    probe = StateAtEpochBegin()
    chosen = [ResetStates("epoch"), probe] if with_policy else [probe]
    SafeTrainer(stateful_model(), policies=chosen).fit(xs, ys, batch_size=4, epochs=3, shuffle=False, verbose=0)
    if with_policy:
        assert probe.norms == [0.0, 0.0, 0.0]
    else:
        assert probe.norms[1] > 0 and probe.norms[2] > 0


class CountingLayer(keras.layers.Layer):
    """A custom layer with a reset hook: counts how often it was reset."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.resets = 0

    def call(self, inputs):
        return inputs

    def reset_state(self):
        self.resets += 1


@pytest.mark.parametrize("every, expected", [("batch", 16), (4, 4), ("epoch", 2)])
def test_reset_states_every_batch_or_n_steps_calls_layer_hooks(every, expected):
    keras.utils.set_random_seed(0)
    layer = CountingLayer()
    model = keras.Sequential([keras.Input((8,)), layer, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    SafeTrainer(model, policies=[ResetStates(every)]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert layer.resets == expected


# -- ClearSession --------------------------------------------------------------------------------------


def test_clear_session_rehydrates_on_schedule():
    trainer = SafeTrainer(make_mlp(dropout=0.2), policies=[ClearSession(every_n_epochs=2)])
    models = []
    trainer.fit(
        x,
        y,
        epochs=5,
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: models.append(id(trainer.model)))],
    )
    assert trainer.rehydrations == 2  # after epochs 2 and 4 (not after the last)
    assert len(set(models)) == 3
    plain = SafeTrainer(make_mlp(dropout=0.2))
    plain.fit(x, y, epochs=5, verbose=0)
    assert plain.rehydrations == 0


def test_rehydration_of_a_larger_model_is_timed():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    assert model.count_params() > 700_000
    trainer = SafeTrainer(model)
    xs = np.zeros((64, 256), "float32")
    trainer.fit(xs, np.zeros((64, 1), "float32"), epochs=1, verbose=0)
    trainer.rehydrate()
    assert trainer.last_rehydration_seconds > 0  # the benchmark reports it; correctness is in test_snapshot


# -- GarbageCollect and TrimMalloc ---------------------------------------------------------------------


class Cycle:
    def __init__(self):
        self.me = self


class MakeGarbage(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        cycle = Cycle()
        self.ref = weakref.ref(cycle)


@pytest.mark.parametrize("with_policy", [True, False])
def test_garbage_collect_frees_cycles_at_epoch_end(with_policy):
    maker = MakeGarbage()
    gc.disable()
    try:
        chosen = [GarbageCollect(every_n_epochs=1)] if with_policy else []
        SafeTrainer(make_mlp(), policies=chosen).fit(x, y, epochs=1, verbose=0, callbacks=[maker])
        freed = maker.ref() is None
    finally:
        gc.enable()
    assert freed is with_policy


def test_trim_malloc_calls_glibc_on_schedule(monkeypatch):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(memory, "_LIBC", FakeLibc())
    SafeTrainer(make_mlp(), policies=[TrimMalloc(every_n_epochs=2)]).fit(x, y, epochs=5, verbose=0)
    assert calls == [0, 0]


def test_trim_malloc_without_glibc_warns_once_and_does_nothing(monkeypatch):
    monkeypatch.setattr(memory, "_LIBC", False)
    monkeypatch.setattr(memory, "_TRIM_WARNED", False)
    with pytest.warns(RuntimeWarning, match="only available with glibc") as record:
        SafeTrainer(make_mlp(), policies=[TrimMalloc()]).fit(x, y, epochs=3, verbose=0)
    assert len([w for w in record if "glibc" in str(w.message)]) == 1


def test_trim_malloc_really_runs_here():
    assert memory.trim_malloc() is True  # glibc on this platform


# -- MemoryBudget --------------------------------------------------------------------------------------


def test_memory_budget_stop_ends_training_cleanly_with_history():
    budget = MemoryBudget(1.0, action="stop")  # 1 MiB: always exceeded
    history = SafeTrainer(make_mlp(), policies=[budget]).fit(x, y, epochs=5, verbose=0)
    assert len(history.history["loss"]) == 1 and budget.events[0][0] == "end of epoch"


def test_memory_budget_checked_every_n_steps_stops_mid_epoch():
    trainer = SafeTrainer(make_mlp(), policies=[MemoryBudget(1.0, action="stop", check_every=3)])
    history = trainer.fit(x, y, batch_size=4, epochs=5, verbose=0)
    assert len(history.history["loss"]) == 1
    assert int(trainer.model.optimizer.iterations) == 3


def test_memory_budget_raise_carries_the_series():
    with pytest.raises(MemoryBudgetExceeded, match=r"exceeds the budget of 1.0 MiB") as info:
        SafeTrainer(make_mlp(), policies=[MemoryBudget(1.0, action="raise")]).fit(x, y, epochs=3, verbose=0)
    assert len(info.value.memory) == 1 and info.value.sample.rss_mb > 1.0


def test_memory_budget_rehydrate_continues_training():
    trainer = SafeTrainer(make_mlp(), policies=[MemoryBudget(1.0, action="rehydrate")])
    history = trainer.fit(x, y, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3 and trainer.rehydrations == 3


def test_memory_budget_not_exceeded_does_nothing():
    budget = MemoryBudget(10**7, action="raise", check_every=1)
    history = SafeTrainer(make_mlp(), policies=[budget]).fit(x, y, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and budget.events == []


# -- RetraceGuard --------------------------------------------------------------------------------------


def test_retrace_guard_names_the_step_and_both_signatures():
    trainer = SafeTrainer(make_mlp(), policies=[RetraceGuard(max_traces=1)])
    trainer.fit(x, y, epochs=1, verbose=0)
    import tensorflow as tf

    wide = tf.data.Dataset.from_tensor_slices((x.astype("float64"), y.astype("float64"))).batch(8)
    with pytest.raises(
        RetraceError, match=r"The train step was traced 2 times.*float32\[(None|32), 8\].*float64\[None, 8\]"
    ):
        trainer.fit(wide, epochs=1, verbose=0)


def test_retrace_guard_allows_the_one_relaxation_of_a_fixed_batch_size():
    # Traced for batches of 16 (as model.fit traces them when every batch has 16 samples), then given batches
    # of another size: the batch dimension is relaxed once, which is not a retrace the guard counts.
    trainer = SafeTrainer(make_mlp(), policies=[RetraceGuard(max_traces=1)])
    trainer.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0)
    trainer.fit(x[:50], y[:50], batch_size=16, epochs=1, verbose=0)
    trainer.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    assert trainer.trace_counts["train"] == 2 and trainer.steps["train"].batch_relaxations == 1


def test_without_retrace_guard_a_retrace_just_happens():
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, epochs=1, verbose=0)
    import tensorflow as tf

    trainer.fit(tf.data.Dataset.from_tensor_slices((x.astype("float64"), y)).batch(8), epochs=1, verbose=0)
    assert trainer.trace_counts["train"] == 2


def test_retrace_guard_warn_mode_warns_and_continues():
    import tensorflow as tf

    trainer = SafeTrainer(make_mlp(), policies=[RetraceGuard(action="warn")])
    trainer.fit(x, y, epochs=1, verbose=0)
    with pytest.warns(RuntimeWarning, match="traced 2 times"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x.astype("float64"), y)).batch(8), epochs=1, verbose=0)


# -- LeakDetector --------------------------------------------------------------------------------------


class Hoarder(keras.callbacks.Callback):
    """Python-side accumulation: keeps `blocks` x 64 KiB (8 MiB by default) of per-epoch results forever.

    The bytes are written, so they are resident; still, a long test process has freed memory that new
    allocations reuse first, so a test that needs RSS to rise asks for more."""

    def __init__(self, blocks: int = 128):
        super().__init__()
        self.blocks = blocks
        self.kept = []

    def on_epoch_end(self, epoch, logs=None):
        self.kept.append([bytearray(b"x") * (64 * 1024) for _ in range(self.blocks)])


def test_leak_detector_diagnoses_python_side_accumulation():
    detector = LeakDetector(window=4, threshold_mb_per_epoch=2.0)
    with pytest.warns(LeakWarning, match=r"RSS grows .* MiB/epoch.*bytearray") as record:
        SafeTrainer(make_mlp(), policies=[detector]).fit(x, y, epochs=7, verbose=0, callbacks=[Hoarder()])
    assert len([w for w in record if issubclass(w.category, LeakWarning)]) == 1  # once
    assert detector.report["slope_mb_per_epoch"] > 2.0
    grew = {name: (count, size) for name, count, size in detector.report["grew"]}
    assert grew["bytearray"][0] >= 128 * 3 and grew["bytearray"][1] >= 3 * 8 * 2**20
    # The doctor's rules (safetrain.diagnostics): the bytes live objects hold account for the growth.
    assert [c["cause"] for c in detector.report["causes"]] == ["python_accumulation"]
    assert "keep numbers, not tensors or arrays" in detector.report["suggestion"]
    # The line that keeps them: the callback's append, found from who holds the bytearrays (Hoarder.kept).
    (site,) = detector.report["causes"][0]["lines"]
    assert site["file"].endswith("test_policies.py") and site["source"].startswith("self.kept.append([bytearray(")
    assert "Hoarder.kept" in site["role"] and f"{site['file']}:{site['line']}" in str(record[0].message)
    assert detector.report["traces"]["train"] == 1


def test_leak_detector_stays_quiet_on_a_flat_run():
    detector = LeakDetector(window=4, threshold_mb_per_epoch=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakWarning)
        SafeTrainer(make_mlp(), policies=[detector]).fit(x, y, epochs=7, verbose=0)
    assert detector.report is None


def test_leak_detector_can_trigger_rehydration():
    trainer = SafeTrainer(make_mlp(), policies=[LeakDetector(window=3, threshold_mb_per_epoch=2.0, rehydrate=True)])
    with pytest.warns(LeakWarning):
        trainer.fit(x, y, epochs=6, verbose=0, callbacks=[Hoarder(blocks=512)])
    assert trainer.rehydrations >= 1
