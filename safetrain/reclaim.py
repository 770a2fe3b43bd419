"""What earlier trainers leave behind, freed when a new trainer starts, by a collection paced to its cost.

    reclaim.on_new_trainer(trainer)     # SafeTrainer.__init__ calls this
    reclaim.stats()                     # {'trainers': 31, 'collections': 9, 'collect_s': 1.31, ...}

A model trained in a loop (k-fold, hyper-parameter search, KerasTuner trials) outlives its fold: a Keras
model and a trainer's traced steps are reference cycles (layers and their trackers, graphs and their
operations), and with the ~300k long-lived objects TensorFlow and Keras import, Python's full collection
runs rarely. Measured on an 8-16-1 model fitted for 8 steps, 30 fresh models with no collection: anonymous
memory +2.3 MiB per model. A full `gc.collect()` frees them, but it walks every object the collector tracks:
0.13-0.17 s with TensorFlow loaded, against 0.38 s for the whole fit.

**What the imports made is frozen**, so that a collection is cheap: importing this module (which
`SafeTrainer` does) runs `gc.freeze()` once, moving the objects alive then (TensorFlow's and Keras's, ~350k)
out of the collector's reach, so that a full collection walks only what came after: 0.14 s -> about 15 ms in
a loop of fresh models (Python's own advice for long-lived processes; Python's automatic collections gain
as much). Frozen objects are still freed by reference counting; only a reference cycle among them would
never be collected, so nothing is frozen while a Keras layer, optimizer or variable or a `tf.Module` is alive
(a model built before safetrain was imported could otherwise never be freed), or with `SAFETRAIN_GC_FREEZE=0`.
`stats()["frozen"]` says how many were frozen, `stats()["not_frozen"]` why none.

**The collection runs only when it can free something and has paid for itself:**
- something may be garbage: a trainer made since the last collection is still weakly referenced (one that is
  gone was freed by reference counting, so there is nothing to collect for it);
- and one of: `PACE` times the last collection's duration has passed since it ended (collections then cost at
  most 1/(1+PACE), 11%, of the time; with the imports frozen that is nearly every trainer), or `MAX_PENDING`
  such trainers wait (a bound in dead models, whatever the timing), or anonymous memory grew `BUDGET_MB`
  since the last collection (the bound in MiB: a large model is not kept waiting, whatever the pacing).

Dead models waiting for a collection hold memory the next ones reuse once it is freed: memory grows by the
few that wait, once, and then stays flat. Measured with `benchmarks/loops.py` (Dense 32-128-128-1, 60 fresh
models, fit + evaluate + predict each, nothing between folds): with the collection at 0.14 s it ran for 14
of 60 trainers, +0.134 MiB per model and a 43 MiB sawtooth; frozen, 59 of 60, 15 ms each: +0.009 and 2.6 MiB.

TensorFlow's eager kernel cache is freed on its own evidence, whoever collected the garbage: each variable
created eagerly adds an entry (about 35 KB, keyed on its unique name; 0.49 MiB for that model with Adam),
which no collection frees. Trainers report the variables they build (`on_variables`); the cache is cleared
once the ones not seen before may have added `KERNEL_CACHE_MB`. It is only a cache (clearing it costs the
next ops about 10 ms to re-create their kernels). It used to be cleared with the garbage, so a loop that ran
its own `gc.collect()` (nothing left pending) never cleared it: +0.75 MiB per model (Dense 32-128-128-1).
"""

from __future__ import annotations

import gc
import os
import time
import weakref
from typing import Any

from safetrain import _compat
from safetrain.diagnostics import read_memory

__all__ = [
    "on_new_trainer",
    "on_variables",
    "collect",
    "freeze_imports",
    "stats",
    "PACE",
    "MAX_PENDING",
    "BUDGET_MB",
    "KERNEL_CACHE_MB",
]

#: A collection waits until this many times its last duration has passed since it ended.
PACE = 8.0
#: ...but never past this many trainers that may be garbage...
MAX_PENDING = 8
#: ...nor past this much growth of anonymous memory (MiB) since it ran.
BUDGET_MB = 64.0
#: The eager kernel cache is cleared once the variables created since its last clear may have added this much.
KERNEL_CACHE_MB = 4.0
#: What one eagerly created variable with a unique name adds to it (measured: 1000 variables, +35 MiB).
KERNEL_ENTRY_MB = 35 / 1024


class _State:
    def __init__(self) -> None:
        self.pending: list[weakref.ref] = []  # trainers made since the last collection
        self.trainers = 0
        self.collections = 0
        self.collect_s = 0.0  # total seconds spent collecting
        self.last_s = 0.0  # duration of the last collection
        self.last_end = 0.0  # perf_counter() when it ended
        self.anon_after = 0.0  # anonymous MiB after it
        self.seen: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # variables counted, by id
        self.new_variables = 0  # counted since the kernel cache was last cleared
        self.cache_clears = 0
        self.frozen = 0  # objects this module froze (gc.freeze), 0 if it did not
        self.not_frozen = ""  # why not, if it did not


_state = _State()


def _due(state: _State) -> bool:
    state.pending = [ref for ref in state.pending if ref() is not None]
    if not state.pending:
        return False
    if len(state.pending) >= MAX_PENDING:
        return True
    if time.perf_counter() - state.last_end >= PACE * state.last_s:
        return True
    return read_memory()[1] - state.anon_after >= BUDGET_MB


def collect() -> int:
    """Collect now (a full `gc.collect()`); returns what it found."""
    state = _state
    start = time.perf_counter()
    found = gc.collect()
    end = time.perf_counter()
    state.pending = []  # what is still referenced now is alive: not counted again
    state.collections += 1
    state.last_s, state.last_end = end - start, end
    state.collect_s += end - start
    state.anon_after = read_memory()[1]
    return found


def on_new_trainer(trainer: Any) -> None:
    """A trainer starts: free what earlier ones left behind when that is due (see the module docstring)."""
    state = _state
    state.trainers += 1
    if _due(state):
        collect()
    state.pending.append(weakref.ref(trainer))


def on_variables(variables) -> None:
    """A trainer built these variables (model, optimizer, metrics): count the ones not seen before, and clear
    the eager kernel cache once they may have added `KERNEL_CACHE_MB` to it."""
    state = _state
    for v in variables:
        if state.seen.get(id(v)) is not v:
            state.seen[id(v)] = v
            state.new_variables += 1
    if state.new_variables * KERNEL_ENTRY_MB >= KERNEL_CACHE_MB:
        _compat.clear_kernel_cache()
        state.new_variables = 0
        state.cache_clears += 1


def _alive_user_object() -> str | None:
    """The type name of a live Keras layer, optimizer or variable, or `tf.Module`, if any (about 20 ms)."""
    import keras
    import tensorflow as tf

    kinds = (keras.Layer, keras.optimizers.Optimizer, keras.Variable, tf.Module, tf.Variable)
    for kind in set(map(type, gc.get_objects())):
        if issubclass(kind, kinds):
            return kind.__name__
    return None


def freeze_imports() -> int:
    """Freeze (`gc.freeze()`) the objects alive now, once, unless a model may be among them (see the module
    docstring); returns how many were frozen (0: not frozen, `stats()["not_frozen"]` says why).

    Example:
        >>> reclaim.freeze_imports() > 100_000   # right after `import safetrain.trainer`, nothing else built
        True
    """
    state = _state
    if state.frozen or state.not_frozen:
        return state.frozen
    if os.environ.get("SAFETRAIN_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        state.not_frozen = "SAFETRAIN_GC_FREEZE=0"
        return 0
    alive = _alive_user_object()
    if alive is not None:
        state.not_frozen = f"a {alive} was alive when safetrain was imported"
        return 0
    before = gc.get_freeze_count()
    gc.collect()  # garbage frozen would never be freed
    gc.freeze()
    state.frozen = gc.get_freeze_count() - before
    return state.frozen


def stats() -> dict[str, Any]:
    """Trainers started, collections run and seconds spent in them, kernel-cache clears, in this process.

    Example:
        >>> reclaim.stats()["collections"] / reclaim.stats()["trainers"]
        0.5
    """
    state = _state
    return dict(
        trainers=state.trainers,
        collections=state.collections,
        collect_s=round(state.collect_s, 4),
        last_collect_s=round(state.last_s, 4),
        pending=len(state.pending),
        kernel_cache_clears=state.cache_clears,
        frozen=state.frozen,
        not_frozen=state.not_frozen,
    )


freeze_imports()
