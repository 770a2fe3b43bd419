"""What earlier trainers leave behind is collected when it is due, and only then (safetrain/reclaim.py)."""

import contextlib
import gc
import weakref

import pytest
from conftest import make_mlp, regression_data

from safetrain import SafeTrainer, reclaim

x, y = regression_data(n=64)
SHIPPED_PACE = reclaim.PACE


@pytest.fixture
def fresh(monkeypatch):
    """A clean record of trainers and collections; never paced by time (the tests set the other triggers)."""
    monkeypatch.setattr(reclaim, "_state", reclaim._State())
    monkeypatch.setattr(reclaim, "PACE", 1e9)
    monkeypatch.setattr(reclaim, "BUDGET_MB", 1e9)
    gc.collect()
    return reclaim._state


def fit_and_drop() -> weakref.ref:
    """Fit a fresh model with a trainer of its own, drop both, and return a weak reference to the model."""
    model = make_mlp()
    SafeTrainer(model).fit(x, y, epochs=1, verbose=0)
    return weakref.ref(model)


def test_a_dead_model_outlives_its_trainer_until_a_collection_frees_it(fresh, no_automatic_collections):
    ref = fit_and_drop()
    assert ref() is not None  # a Keras model and a traced step are reference cycles
    SafeTrainer(make_mlp())  # the first collection: due at once (no earlier one to pace it by)
    assert ref() is None
    assert fresh.collections == 1 and fresh.trainers == 2


def test_no_collection_runs_when_no_earlier_trainer_may_be_garbage(fresh):
    SafeTrainer(make_mlp())  # nothing before it
    assert fresh.collections == 0
    reclaim.collect()
    model = make_mlp()
    kept = SafeTrainer(model)
    kept.fit(x, y, epochs=1, verbose=0)
    reclaim.collect()  # `kept` survives it: proven alive, not counted again
    assert fresh.pending == [] and fresh.collections == 2
    SafeTrainer(model)
    assert fresh.collections == 2


def test_at_most_max_pending_trainers_wait_for_a_collection(fresh, monkeypatch, no_automatic_collections):
    monkeypatch.setattr(reclaim, "MAX_PENDING", 3)
    reclaim.collect()  # paced from here on: only the count can make one due
    refs = [fit_and_drop() for _ in range(3)]
    assert fresh.collections == 1 and all(r() is not None for r in refs)
    SafeTrainer(make_mlp())  # three wait: this one collects
    assert fresh.collections == 2 and all(r() is None for r in refs)


@pytest.fixture
def no_automatic_collections():
    gc.disable()  # Python's own collections would free dead models at moments of their choosing
    yield
    gc.enable()


def test_a_collection_is_due_once_pace_times_its_cost_has_passed(fresh, monkeypatch, no_automatic_collections):
    reclaim.collect()
    ref = fit_and_drop()
    SafeTrainer(make_mlp())
    assert fresh.collections == 1 and ref() is not None  # paced: 1e9 times the last collection has not passed
    monkeypatch.setattr(reclaim, "PACE", 0.0)
    SafeTrainer(make_mlp())
    assert fresh.collections == 2 and ref() is None


def test_growth_past_the_budget_makes_a_collection_due(fresh, monkeypatch, no_automatic_collections):
    reclaim.collect()
    ref = fit_and_drop()
    monkeypatch.setattr(reclaim, "BUDGET_MB", -1e9)  # any reading is past it
    SafeTrainer(make_mlp())
    assert fresh.collections == 2 and ref() is None


def test_a_trainer_freed_by_reference_counting_leaves_nothing_to_collect(fresh):
    SafeTrainer(make_mlp())  # never fitted: no cycle holds it, so it is gone at once
    SafeTrainer(make_mlp())
    assert fresh.collections == 0 and fresh.trainers == 2


def test_models_trained_in_a_loop_never_pile_up_past_the_bound(fresh, monkeypatch, no_automatic_collections):
    # Paced by time as shipped: whatever the timing, at most MAX_PENDING dead models wait.
    monkeypatch.setattr(reclaim, "PACE", SHIPPED_PACE)
    refs = [fit_and_drop() for _ in range(2 * reclaim.MAX_PENDING + 1)]
    alive = sum(r() is not None for r in refs)
    assert alive <= reclaim.MAX_PENDING, (alive, reclaim.stats())
    assert 2 <= fresh.collections <= len(refs) - 1


def test_stats_report_trainers_collections_and_their_time(fresh, no_automatic_collections):
    fit_and_drop()
    SafeTrainer(make_mlp())
    stats = reclaim.stats()
    assert stats["trainers"] == 2 and stats["collections"] == 1 and stats["collect_s"] > 0
    assert set(stats) == {
        "trainers",
        "collections",
        "collect_s",
        "last_collect_s",
        "pending",
        "kernel_cache_clears",
        "frozen",
        "not_frozen",
    }


@pytest.mark.parametrize("loop", ["install()", "a trainer per fit"])
def test_models_trained_under_install_or_a_trainer_per_fit_are_freed_by_later_trainers(
    fresh, monkeypatch, no_automatic_collections, loop
):
    import safetrain

    monkeypatch.setattr(reclaim, "MAX_PENDING", 2)
    reclaim.collect()  # paced from here on: only the count can make one due
    refs = []
    with safetrain.install() if loop == "install()" else contextlib.nullcontext():
        for _ in range(4):
            model = make_mlp()
            if loop == "install()":
                model.fit(x, y, epochs=1, verbose=0)  # a trainer kept on the model: a cycle with it
                model.evaluate(x, y, verbose=0)
            else:
                for _ in range(2):  # "one more epoch": a new trainer each time, on one model
                    SafeTrainer(model).fit(x, y, epochs=1, verbose=0)
            refs.append(weakref.ref(model))
            del model
    assert fresh.collections >= 2 and sum(r() is not None for r in refs) <= 2, reclaim.stats()


# -- the eager kernel cache: cleared on its own evidence, whoever collects the garbage --------------------------


@pytest.fixture
def cache_clears(fresh, monkeypatch):
    """Counts the kernel-cache clears; the cache is cleared once 20 new variables are counted."""
    from safetrain import _compat

    clears = []
    real = _compat.clear_kernel_cache
    monkeypatch.setattr(_compat, "clear_kernel_cache", lambda: clears.append(1) or real())
    monkeypatch.setattr(reclaim, "KERNEL_CACHE_MB", 20 * reclaim.KERNEL_ENTRY_MB)
    return clears


def fit_fresh_model():
    model = make_mlp()  # 4 weights, 9 optimizer variables (Adam), 1 metric's
    SafeTrainer(model).fit(x, y, epochs=1, verbose=0)
    return len(model.variables) + len(model.optimizer.variables)


@pytest.mark.parametrize("between", ["nothing", "gc.collect()", "clear_session()", "both"])
def test_the_kernel_cache_is_cleared_as_fresh_models_add_to_it_whatever_the_loop_does_between(cache_clears, between):
    import keras

    per_model = 0
    for _ in range(6):
        per_model = fit_fresh_model()
        if between in ("gc.collect()", "both"):
            gc.collect()  # the user's own collection: nothing left pending for reclaim to collect
        if between in ("clear_session()", "both"):
            keras.backend.clear_session()
    models_per_clear = -(-20 // per_model)  # the count starts again at each clear
    assert len(cache_clears) == 6 // models_per_clear >= 2, (per_model, reclaim.stats())


def test_a_trainer_per_fit_on_one_model_counts_its_variables_once(cache_clears):
    model = make_mlp()
    for _ in range(6):
        SafeTrainer(model).fit(x, y, epochs=1, verbose=0)  # "one more epoch", a new trainer each time
    assert cache_clears == []  # the same variables: no new cache entries, nothing to clear
    assert reclaim._state.new_variables == len(model.variables) + len(model.optimizer.variables)


def test_the_kernel_cache_is_cleared_with_garbage_collection_disabled(cache_clears):
    gc.disable()
    try:
        for _ in range(4):
            fit_fresh_model()
    finally:
        gc.enable()
    assert len(cache_clears) >= 1


# -- what the imports made is frozen, so that a collection walks only what came after ----------------------

FREEZE_SCRIPT = """
import gc, json, os, weakref
{before}
from safetrain import SafeTrainer, reclaim
import keras, numpy as np
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("adam", "mse")
SafeTrainer(model).fit(np.ones((8, 3)), np.ones((8, 2)), verbose=0)
ref = weakref.ref(model)
del model
gc.collect()
print(json.dumps(dict(reclaim.stats(), freeze_count=gc.get_freeze_count(), model_freed=ref() is None)))
"""


BUILT_BEFORE = "import keras\nearly = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])"


def test_importing_safetrain_freezes_what_the_imports_made_unless_a_model_may_be_among_it():
    import json
    import os
    import subprocess
    import sys

    before = {
        "nothing": ("", {}),
        "a model built before": (BUILT_BEFORE, {}),
        "SAFETRAIN_GC_FREEZE=0": ("", {"SAFETRAIN_GC_FREEZE": "0"}),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", FREEZE_SCRIPT.format(before=code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        )
        for name, (code, env) in before.items()
    }
    out = {name: json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for name, p in procs.items()}
    frozen = out["nothing"]
    # (Frozen objects are still freed by reference counting: the count only goes down.)
    assert frozen["frozen"] >= frozen["freeze_count"] > 100_000 and not frozen["not_frozen"]
    assert out["a model built before"]["frozen"] == 0
    assert "alive when safetrain was imported" in out["a model built before"]["not_frozen"]
    assert out["SAFETRAIN_GC_FREEZE=0"] | {"freeze_count": 0} == out["SAFETRAIN_GC_FREEZE=0"]
    assert out["SAFETRAIN_GC_FREEZE=0"]["not_frozen"] == "SAFETRAIN_GC_FREEZE=0"
    # A model built after the import is young: a collection frees it, frozen or not.
    assert all(o["model_freed"] for o in out.values())
