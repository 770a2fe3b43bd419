"""Policies: small objects that decide *when* the trainer acts on memory; the trainer knows *how*.

A policy overrides the hooks it needs. Each hook receives the trainer (and, where it applies, the
latest memory sample); `every_n_batches` asks for `on_batch_end` every that many training steps: the
trainer then ends its compiled chunks on those steps, so the hook sees exactly that step. Policies
without `every_n_batches` cost nothing per step.

Example:
    >>> class PrintRSS(Policy):
    ...     def on_epoch_end(self, trainer, epoch, logs, sample):
    ...         print(epoch, sample.rss_mb)
    >>> SafeTrainer(model, policies=[PrintRSS()]).fit(x, y, epochs=3)
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import os
import sys
import warnings
from typing import Iterable

from safetrain import memory
from safetrain.errors import ConfigurationError, SafetrainError

__all__ = ["Policy", "PolicyList", "ResetStates", "ClearSession", "GarbageCollect", "TrimMalloc", "MemoryBudget",
           "RetraceGuard", "LeakDetector", "Checkpoint", "StopOnNaN", "MemoryBudgetExceeded", "RetraceError",
           "LeakWarning", "NonFiniteLoss", "trim_malloc"]


class MemoryBudgetExceeded(SafetrainError, ValueError):
    """Resident memory went over a `MemoryBudget(action="raise")`; `.memory` holds the series so far."""

    def __init__(self, message: str, memory_log: "memory.MemoryLog", sample: "memory.MemorySample") -> None:
        super().__init__(message)
        self.memory = memory_log
        self.sample = sample


class RetraceError(SafetrainError, ValueError):
    """A step was traced more often than a `RetraceGuard` allows; the message names both signatures."""


class LeakWarning(UserWarning):
    """`LeakDetector` found memory growing epoch after epoch; the message holds the diagnosis."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value


class Policy:
    """Base class of every policy. Override any of the hooks; the defaults do nothing.

    Attributes:
        every_n_batches: call `on_batch_end` every this many training steps (None: never).
    """

    every_n_batches: int | None = None
    #: set True to get `on_nonfinite_loss`: training chunks then stop on the step whose loss is NaN/Inf
    watches_nonfinite: bool = False

    def on_train_begin(self, trainer) -> None:
        """Before the first epoch of a `fit`."""

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        """Before epoch `epoch` runs."""

    def on_batch_end(self, trainer, step: int, sample: memory.MemorySample) -> None:
        """After global training step `step` (1-based), when `step % every_n_batches == 0`."""

    def on_nonfinite_loss(self, trainer, epoch: int, step: int, logs: dict) -> None:
        """(with `watches_nonfinite`) Right after step `step` of epoch `epoch` produced a NaN/Inf loss."""

    def on_epoch_end(self, trainer, epoch: int, logs: dict, sample: memory.MemorySample) -> None:
        """After epoch `epoch` and its callbacks, with its logs and memory sample."""

    def on_train_end(self, trainer) -> None:
        """After the last epoch of a `fit` (also when training was stopped early)."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class PolicyList:
    """The trainer's policies, called in the order given."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        if isinstance(policies, Policy):
            policies = [policies]
        self.policies: list[Policy] = list(policies)
        for i, p in enumerate(self.policies):
            if not isinstance(p, Policy):
                raise TypeError(f"`policies[{i}]` must be a safetrain.Policy, got {type(p).__name__}.")
            n = p.every_n_batches
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"`{type(p).__name__}.every_n_batches` must be a positive int or None, got {n!r}.")

    def __iter__(self):
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    @property
    def wants_batches(self) -> bool:
        return any(p.every_n_batches for p in self.policies)

    def steps_to_next_batch_hook(self, global_step: int) -> int | None:
        """Steps until the next step some policy wants to see (so a compiled chunk can end there)."""
        gaps = [p.every_n_batches - global_step % p.every_n_batches for p in self.policies if p.every_n_batches]
        return min(gaps) if gaps else None

    def on_train_begin(self, trainer) -> None:
        for p in self.policies:
            p.on_train_begin(trainer)

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        for p in self.policies:
            p.on_epoch_begin(trainer, epoch)

    def on_batch_end(self, trainer, step: int) -> None:
        due = [p for p in self.policies if p.every_n_batches and step % p.every_n_batches == 0]
        if due:
            sample = trainer.sample_memory(getattr(trainer, "epoch", None))
            for p in due:
                p.on_batch_end(trainer, step, sample)

    @property
    def watches_nonfinite(self) -> bool:
        return any(p.watches_nonfinite for p in self.policies)

    def on_nonfinite_loss(self, trainer, epoch: int, step: int, logs: dict) -> None:
        for p in self.policies:
            if p.watches_nonfinite:
                p.on_nonfinite_loss(trainer, epoch, step, logs)

    def on_epoch_end(self, trainer, epoch: int, logs: dict, sample: memory.MemorySample) -> None:
        for p in self.policies:
            p.on_epoch_end(trainer, epoch, logs, sample)

    def on_train_end(self, trainer) -> None:
        for p in self.policies:
            p.on_train_end(trainer)


# -- built-in policies: each decides when, in a few lines; the trainer does the work -------------------

class ResetStates(Policy):
    """Reset every stateful layer (stateful RNNs and layers with a `reset_state` hook).

    Args:
        every: "epoch" (before each epoch), "batch" (after every step) or an int (after every that many
            training steps).

    Example:
        >>> SafeTrainer(stateful_lstm, policies=[ResetStates("epoch")]).fit(x, y, shuffle=False)
    """

    def __init__(self, every: str | int = "epoch") -> None:
        if every == "batch":
            self.every_n_batches = 1
        elif isinstance(every, int) and not isinstance(every, bool):
            self.every_n_batches = _positive_int("every", every)
        elif every != "epoch":
            raise ValueError(f"`every` must be 'epoch', 'batch' or a positive int, got {every!r}.")
        self.every = every

    def on_epoch_begin(self, trainer, epoch):
        if self.every == "epoch":
            trainer.reset_states()

    def on_batch_end(self, trainer, step, sample):
        trainer.reset_states()


class ClearSession(Policy):
    """Re-hydrate every `every_n_epochs` epochs: clear the Keras session and continue exactly.

    The model must rebuild from its config, or the trainer must have a factory; that is checked before the
    first epoch.

    Example:
        >>> SafeTrainer(build_model, policies=[ClearSession(every_n_epochs=5)]).fit(x, y, epochs=50)
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)

    def on_train_begin(self, trainer):
        trainer.check_rehydratable()

    def on_epoch_end(self, trainer, epoch, logs, sample):
        last = epoch + 1 >= getattr(trainer, "epochs_target", 0) or trainer.model.stop_training
        if (epoch + 1) % self.every_n_epochs == 0 and not last:
            trainer.rehydrate()


class GarbageCollect(Policy):
    """Run Python's cyclic garbage collector every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        self.collected = 0

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if (epoch + 1) % self.every_n_epochs == 0:
            self.collected += gc.collect()


_LIBC = None
_TRIM_WARNED = False


def trim_malloc() -> bool:
    """Return freed heap memory to the OS with glibc's `malloc_trim(0)`; False (and one warning) elsewhere."""
    global _LIBC, _TRIM_WARNED
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if not _LIBC:
        if not _TRIM_WARNED:
            _TRIM_WARNED = True
            warnings.warn(f"TrimMalloc: malloc_trim is only available with glibc; it does nothing on "
                          f"{sys.platform}.", RuntimeWarning, stacklevel=3)
        return False
    _LIBC.malloc_trim(0)
    return True


class TrimMalloc(Policy):
    """Hand freed heap pages back to the OS (`malloc_trim(0)`, glibc) every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if (epoch + 1) % self.every_n_epochs == 0:
            trim_malloc()


class MemoryBudget(Policy):
    """Act when resident memory exceeds `max_rss_mb`, checked after each epoch and every `check_every` steps.

    Args:
        max_rss_mb: the budget, in MiB of resident memory.
        action: "rehydrate" (clear the session and continue exactly), "stop" (end training cleanly after
            the current step, History intact), "raise" (`MemoryBudgetExceeded`, carrying the series) or
            "restart" (write a checkpoint with the trainer's `Checkpoint` policy, then re-execute the same
            command line in this process with `os.execv`; the new process resumes exactly). A restart that
            made no progress since the process started is not repeated (a warning says so), nor is one
            beyond `max_restarts`.
        check_every: also check every this many training steps (None: only at epoch end).
        max_restarts: for "restart", how many restarts in a row are allowed.

    Example:
        >>> SafeTrainer(model, policies=[Checkpoint("runs/a"), MemoryBudget(6000, action="restart")])
    """

    def __init__(self, max_rss_mb: float, action: str = "rehydrate", check_every: int | None = None,
                 max_restarts: int = 100) -> None:
        if isinstance(max_rss_mb, bool) or not isinstance(max_rss_mb, (int, float)) or max_rss_mb <= 0:
            raise ValueError(f"`max_rss_mb` must be a positive number, got {max_rss_mb!r}.")
        self.max_rss_mb = float(max_rss_mb)
        self.action = _choice("action", action, ("rehydrate", "stop", "raise", "restart"))
        self.every_n_batches = None if check_every is None else _positive_int("check_every", check_every)
        self.max_restarts = _positive_int("max_restarts", max_restarts)
        self.events: list[tuple[str, int | None, float]] = []
        self._process_start_step: int | None = None

    def on_train_begin(self, trainer):
        from safetrain import distributed

        if self.action == "restart" and distributed.is_multi_worker(getattr(trainer, "strategy", None)):
            raise ConfigurationError("MemoryBudget(action='restart') is not supported in a multi-worker run (the "
                                     "workers would have to restart together); use action='rehydrate' or "
                                     "'raise', or restart the job from its Checkpoint with your scheduler.")
        if self.action == "rehydrate":
            trainer.check_rehydratable()
        if self.action == "restart" and self._checkpoint(trainer) is None:
            raise ConfigurationError("MemoryBudget(action='restart') needs a Checkpoint policy in the same "
                                     "trainer: the restarted process resumes from its checkpoint.")

    def on_epoch_begin(self, trainer, epoch):
        if self._process_start_step is None:  # after every on_train_begin, a resume included
            self._process_start_step = trainer._global_step

    @staticmethod
    def _checkpoint(trainer):
        return next((p for p in trainer.policies if isinstance(p, Checkpoint)), None)

    def _check(self, trainer, sample, where: str, step: int | None) -> None:
        if sample.rss_mb <= self.max_rss_mb:
            return
        self.events.append((where, step, sample.rss_mb))
        if self.action == "rehydrate":
            trainer.rehydrate()
        elif self.action == "stop":
            trainer.model.stop_training = True
        elif self.action == "restart":
            self._restart(trainer, sample)
        else:
            raise MemoryBudgetExceeded(
                f"Resident memory {sample.rss_mb:.1f} MiB exceeds the budget of {self.max_rss_mb:.1f} MiB "
                f"({where}{'' if step is None else f' {step}'}, epoch {sample.epoch}).", trainer.memory, sample)

    def _restart(self, trainer, sample) -> None:
        from safetrain.isolation import RESTARTS_ENV, restart_process

        restarts = int(os.environ.get(RESTARTS_ENV, "0"))
        if trainer._global_step <= (self._process_start_step or 0):
            warnings.warn(f"MemoryBudget: {sample.rss_mb:.1f} MiB is over the budget of {self.max_rss_mb:.1f} MiB "
                          "right after a restart, before any progress; not restarting again (raise the budget).",
                          RuntimeWarning, stacklevel=3)
            return
        if restarts >= self.max_restarts:
            warnings.warn(f"MemoryBudget: over budget, but {restarts} restarts already (max_restarts); going on.",
                          RuntimeWarning, stacklevel=3)
            return
        if self._checkpoint(trainer).save(trainer) is None:
            warnings.warn("MemoryBudget: the checkpoint before the restart failed; not restarting.",
                          RuntimeWarning, stacklevel=3)
            return
        if trainer._progress_bar is not None:
            trainer._progress_bar.on_train_end()
        restart_process()

    def on_batch_end(self, trainer, step, sample):
        self._check(trainer, sample, "step", step)

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if self.action == "restart" and epoch + 1 >= getattr(trainer, "epochs_target", 0):
            return  # nothing left to train: a restart would only resume a finished run
        self._check(trainer, sample, "end of epoch", epoch)


class RetraceGuard(Policy):
    """Make a retrace visible: a step traced more than `max_traces` times raises (or warns).

    The error names the step and shows the signature it was compiled for and the one that forced the
    retrace. Counts start again after re-hydration (which compiles new functions on purpose).

    Example:
        >>> SafeTrainer(model, policies=[RetraceGuard(max_traces=1)])
    """

    def __init__(self, max_traces: int = 1, action: str = "raise") -> None:
        self.max_traces = _positive_int("max_traces", max_traces)
        self.action = _choice("action", action, ("raise", "warn"))
        self.events: list = []
        self._trainer = None

    def on_train_begin(self, trainer):
        if self._trainer is not trainer:
            trainer.steps.listeners.append(self._on_trace)
            self._trainer = trainer

    def _on_trace(self, event) -> None:
        if event.count <= self.max_traces:
            return
        from safetrain.data import describe_spec

        self.events.append(event)
        message = (f"The {event.kind} step was traced {event.count} times (RetraceGuard allows {self.max_traces}). "
                   f"It was compiled for {describe_spec(event.old_spec)} and now received "
                   f"{describe_spec(event.new_spec)}. Give the data one dtype and structure (dimensions "
                   "that vary must be None in the dataset's element_spec).")
        if self.action == "raise":
            raise RetraceError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def object_stats() -> dict[str, tuple[int, int]]:
    """Live Python objects by type: `{type name: (count, bytes)}`.

    `gc.get_objects()` only lists containers; objects without references (bytes, bytearray, NumPy
    buffers) are found one level down, as referents of those containers.
    """
    seen: set[int] = set()
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def add(o) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        entry = stats[type(o).__name__]
        entry[0] += 1
        try:
            entry[1] += sys.getsizeof(o)
        except TypeError:
            pass

    for o in gc.get_objects():
        add(o)
        for r in gc.get_referents(o):
            if not gc.is_tracked(r):
                add(r)
    return {k: (v[0], v[1]) for k, v in stats.items()}


def _live_models() -> int:
    import keras

    return sum(1 for o in gc.get_objects() if isinstance(o, keras.Model))


class LeakDetector(Policy):
    """Warn once, with a diagnosis, when RSS grows faster than `threshold_mb_per_epoch` over `window` epochs.

    The diagnosis (also in `detector.report`) gives the trace counts, the Python object types that grew
    most (by bytes) since the first epoch, the growth in live Keras models and TensorFlow function graphs,
    and the policy that would help. With `rehydrate=True` it also re-hydrates whenever it fires. It takes a
    census of live objects after the first epoch and again when it fires (about a second each); the
    slope is fitted from the second epoch on.

    Example:
        >>> detector = LeakDetector(window=10, threshold_mb_per_epoch=1.0)
        >>> SafeTrainer(model, policies=[detector]).fit(x, y, epochs=50)
        >>> detector.report["suggestion"]
    """

    def __init__(self, window: int = 10, threshold_mb_per_epoch: float = 1.0, rehydrate: bool = False) -> None:
        self.window = _positive_int("window", window)
        if self.window < 3:
            raise ValueError(f"`window` must be at least 3 epochs to fit a slope, got {window}.")
        if isinstance(threshold_mb_per_epoch, bool) or not isinstance(threshold_mb_per_epoch, (int, float)):
            raise TypeError(f"`threshold_mb_per_epoch` must be a number, got {threshold_mb_per_epoch!r}.")
        self.threshold_mb_per_epoch = float(threshold_mb_per_epoch)
        self.rehydrate = bool(rehydrate)
        self.report: dict | None = None
        self._baseline: dict | None = None
        self._start: int | None = None

    def on_train_begin(self, trainer):
        if self._start is None:
            # Slopes start after the first epoch: its sample holds tracing, warm-up and the object census.
            self._start = len(trainer.memory) + 1
        if self.rehydrate:
            trainer.check_rehydratable()

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if self._baseline is None:
            # After the first epoch: tracing and warm-up are done, what grows from here on is the leak.
            self._baseline = dict(objects=object_stats(), models=_live_models(), epoch=epoch,
                                  rss_mb=sample.rss_mb)
        series = trainer.memory.series("rss_mb")[self._start or 0:]
        if len(series) < self.window:
            return
        growth = memory.slope(series[-self.window:])
        if growth <= self.threshold_mb_per_epoch:
            return
        if self.report is None:
            self.report = self.diagnose(trainer, growth, sample)
            warnings.warn(self.report["text"], LeakWarning, stacklevel=2)
        if self.rehydrate:
            trainer.rehydrate()

    def diagnose(self, trainer, growth: float, sample) -> dict:
        """What is growing and what would help; the same text the warning shows."""
        base = self._baseline
        now = object_stats()
        grew = sorted(((k, n - base["objects"].get(k, (0, 0))[0], b - base["objects"].get(k, (0, 0))[1])
                       for k, (n, b) in now.items()), key=lambda t: -t[2])
        grew = [g for g in grew if g[2] > 0][:8]
        object_mb = sum(g[2] for g in grew) / 2**20
        rss_mb = sample.rss_mb - base["rss_mb"]
        models = _live_models() - base["models"]
        graphs = now.get("FuncGraph", (0, 0))[0] - base["objects"].get("FuncGraph", (0, 0))[0]
        traces = dict(trainer.steps.total_trace_counts)
        stateful = any(getattr(layer, "stateful", False) for layer in trainer.model._flatten_layers())
        resets = any(isinstance(p, ResetStates) for p in trainer.policies)
        if any(n > 1 for n in trainer.steps.trace_counts.values()):
            suggestion = ("RetraceGuard(max_traces=1): steps are being traced again; give the data one dtype and "
                          "make dimensions that vary None")
        elif models > 0:
            suggestion = (f"ClearSession(every_n_epochs=...), and build models with a factory: {models} more "
                          "Keras models are alive than after the first epoch")
        elif stateful and not resets:
            suggestion = "ResetStates('epoch'): the model has stateful layers that are never reset"
        elif grew and object_mb >= 0.5 * max(rss_mb, 1e-9):
            suggestion = (f"something accumulates Python objects ({grew[0][0]}: +{grew[0][1]} objects, "
                          f"+{grew[0][2] / 2**20:.1f} MiB); look at callbacks and custom layers that keep "
                          "per-batch results (give layers a release_memory hook)")
        else:
            suggestion = ("TrimMalloc() or GarbageCollect(): no live objects account for the growth, so the "
                          "allocator is keeping freed memory; memory only a new process returns needs a fresh "
                          "process per run")
        top = ", ".join(f"{k} +{n} ({b / 2**20:.1f} MiB)" for k, n, b in grew[:5]) or "none"
        text = (f"RSS grows {growth:.2f} MiB/epoch over the last {self.window} epochs (threshold "
                f"{self.threshold_mb_per_epoch:.2f}); +{rss_mb:.1f} MiB since epoch {base['epoch'] + 1}, of which "
                f"live Python objects account for {object_mb:.1f} MiB. Traces: {traces}. Keras models alive: "
                f"{models:+d}, function graphs: {graphs:+d} since epoch {base['epoch'] + 1}. Grew most: {top}. "
                f"Suggested: {suggestion}.")
        return dict(slope_mb_per_epoch=growth, traces=traces, grew=grew, object_mb=object_mb, rss_mb=rss_mb,
                    live_models=models, func_graphs=graphs, suggestion=suggestion, text=text)


class Checkpoint(Policy):
    """Write the full training state to `directory` atomically; resume from it when `fit` starts.

    The state is what re-hydration restores: every model, optimizer and metric variable, the RNG state, the
    counters, the data position (mid-epoch with `every_n_batches`) and the History so far. Each write goes
    to a temporary folder, is fsynced and renamed into place; the oldest beyond `keep` are removed after.
    A killed process therefore leaves the previous or the new checkpoint, never half of one; the restarted
    `fit` ends with the weights and History of an uninterrupted run. A checkpoint failing its checksum is
    reported and the previous one used; a failed write (disk full, permissions) warns and training goes on.

    Args:
        directory: where checkpoints live (one folder per run).
        every_n_epochs: write after every this many epochs (None: never at epoch end).
        every_n_batches: also write every this many training steps (None: never mid-epoch).
        keep: how many checkpoints to keep.

    Example:
        >>> SafeTrainer(model, policies=[Checkpoint("runs/mlp", every_n_batches=500)]).fit(x, y, epochs=50)
        # kill it any time; run the same command again and it finishes the same run.
    """

    def __init__(self, directory: str, every_n_epochs: int | None = 1, every_n_batches: int | None = None,
                 keep: int = 2) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path, got {type(directory).__name__}.")
        self.directory = os.fspath(directory)
        self.every_n_epochs = None if every_n_epochs is None else _positive_int("every_n_epochs", every_n_epochs)
        self.every_n_batches = None if every_n_batches is None else _positive_int("every_n_batches", every_n_batches)
        self.keep = _positive_int("keep", keep)
        self.resumed_from: str | None = None
        self.written: list[str] = []
        self.failures: list[str] = []
        self.seconds = 0.0

    def on_train_begin(self, trainer):
        from safetrain import checkpoint, distributed

        strategy = getattr(trainer, "strategy", None)
        found = checkpoint.latest(self.directory, clean=distributed.is_chief(strategy))
        if distributed.is_multi_worker(strategy):
            # Every worker must resume from the same checkpoint, so the directory must be shared by all.
            name = os.path.basename(found[0]) if found is not None else ""
            step = float(name[len(checkpoint.PREFIX):]) if name.startswith(checkpoint.PREFIX) else -1.0
            steps = distributed.per_worker_values(strategy, step)
            if len(set(steps)) > 1:
                seen = ", ".join(f"worker {i}: {'none' if s < 0 else f'step {int(s)}'}" for i, s in enumerate(steps))
                raise ConfigurationError(
                    f"Checkpoint: the workers see different checkpoints in {self.directory!r} ({seen}). In a "
                    "multi-worker run only the chief writes checkpoints, so `directory` must be on storage "
                    "that every worker reads (a shared filesystem or a bucket path).")
        if found is not None:
            path, arrays, meta = found
            trainer.resume(arrays, meta)
            self.resumed_from = path

    def save(self, trainer) -> str | None:
        """Write a checkpoint now; returns its path, or None (with a `CheckpointWarning`) if writing failed."""
        import time

        from safetrain import checkpoint

        from safetrain import distributed

        t0 = time.perf_counter()
        arrays, meta = trainer.training_state()  # on every worker: reading some variables is a collective
        name = f"{checkpoint.PREFIX}{trainer._global_step:012d}"
        if not distributed.is_chief(getattr(trainer, "strategy", None)):
            self.seconds += time.perf_counter() - t0
            return None  # only the chief writes
        try:
            path = checkpoint.write(self.directory, name, arrays, meta)
            checkpoint.prune(self.directory, self.keep)
        except OSError as e:
            self.failures.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"Checkpoint could not be written to {self.directory} ({type(e).__name__}: {e}); the "
                          "previous checkpoint is intact and training goes on.", checkpoint.CheckpointWarning,
                          stacklevel=2)
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        if not self.written or self.written[-1] != path:  # an epoch end on a batch checkpoint's step
            self.written.append(path)
        return path

    def on_batch_end(self, trainer, step, sample):
        self.save(trainer)

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer)


class NonFiniteLoss(UserWarning):
    """`StopOnNaN` stopped training; the message says where and what was rolled back."""


class StopOnNaN(Policy):
    """Stop at the first step whose loss is NaN or infinite, and (with `rollback`) restore the last good state.

    The check runs inside the compiled loop, so training keeps running many steps per call and still stops
    on the exact step. With `rollback=True` the model and optimizer go back to their state at the start of
    that epoch (kept in memory), so the model is usable; the History keeps the epoch's logs as they were.
    `policy.event` says where it happened.

    Example:
        >>> stop = StopOnNaN()
        >>> SafeTrainer(model, policies=[stop]).fit(x, y, epochs=20)
        >>> stop.event   # {'epoch': 3, 'step': 41, 'global_step': 1041, 'loss': nan, 'rolled_back_to_epoch': 3}
    """

    watches_nonfinite = True

    def __init__(self, rollback: bool = True) -> None:
        self.rollback = bool(rollback)
        self.event: dict | None = None
        self._good = None

    def on_train_begin(self, trainer):
        trainer.steps.stop_on_nonfinite = True

    def on_epoch_begin(self, trainer, epoch):
        if self.rollback:
            from safetrain.snapshot import Snapshot

            self._good = (epoch, Snapshot.take(trainer))

    def on_nonfinite_loss(self, trainer, epoch, step, logs):
        loss = logs.get("loss", next(iter(logs.values()), float("nan"))) if logs else float("nan")
        self.event = {"epoch": epoch, "step": step, "global_step": trainer._global_step, "loss": loss,
                      "rolled_back_to_epoch": None}
        trainer.model.stop_training = True
        message = (f"Non-finite loss ({loss}) at epoch index {epoch} (Epoch {epoch + 1}), batch {step} (global "
                   f"step {trainer._global_step}); training stopped")
        if self.rollback and self._good is not None:
            good_epoch, snapshot = self._good
            snapshot.restore_values(trainer, metrics=False, counters=False)
            self.event["rolled_back_to_epoch"] = good_epoch
            message += f" and the model and optimizer were rolled back to the start of epoch index {good_epoch}"
        warnings.warn(message + ".", NonFiniteLoss, stacklevel=2)

    def on_train_end(self, trainer):
        trainer.steps.stop_on_nonfinite = False
