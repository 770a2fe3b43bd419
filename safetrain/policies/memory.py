"""Policies that keep memory in check: re-hydrate, collect, trim, budget, and watch for leaks.

Example:
    >>> SafeTrainer(model, policies=[ClearSession(every_n_epochs=5), MemoryBudget(6000)]).fit(x, y, epochs=50)
"""

from __future__ import annotations

import gc
import os
import warnings

from safetrain import diagnostics, distributed, hooks, isolation, memory
from safetrain.diagnostics import FIXES
from safetrain.errors import ConfigurationError, LeakWarning, MemoryBudgetExceeded
from safetrain.memory import trim_malloc
from safetrain.policies.base import Policy, choice, positive_int
from safetrain.policies.training import Checkpoint, ResetStates

__all__ = ["ClearSession", "GarbageCollect", "TrimMalloc", "MemoryBudget", "LeakDetector"]


class ClearSession(Policy):
    """Re-hydrate every `every_n_epochs` epochs: clear the Keras session and continue exactly.

    The model must rebuild from its config, or the trainer must have a factory; that is checked before the
    first epoch.

    Example:
        >>> SafeTrainer(build_model, policies=[ClearSession(every_n_epochs=5)]).fit(x, y, epochs=50)
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = positive_int("every_n_epochs", every_n_epochs)

    def on_train_begin(self, trainer):
        trainer.check_rehydratable()

    def on_epoch_end(self, trainer, epoch, logs, sample):
        last = epoch + 1 >= trainer.progress.epochs_target or trainer.model.stop_training
        if (epoch + 1) % self.every_n_epochs == 0 and not last:
            trainer.rehydrate()


class GarbageCollect(Policy):
    """Run Python's cyclic garbage collector every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = positive_int("every_n_epochs", every_n_epochs)
        self.collected = 0

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if (epoch + 1) % self.every_n_epochs == 0:
            self.collected += gc.collect()


class TrimMalloc(Policy):
    """Hand freed heap pages back to the OS (`malloc_trim(0)`, glibc) every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = positive_int("every_n_epochs", every_n_epochs)

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

    def __init__(
        self, max_rss_mb: float, action: str = "rehydrate", check_every: int | None = None, max_restarts: int = 100
    ) -> None:
        if isinstance(max_rss_mb, bool) or not isinstance(max_rss_mb, (int, float)) or max_rss_mb <= 0:
            raise ValueError(f"`max_rss_mb` must be a positive number, got {max_rss_mb!r}.")
        self.max_rss_mb = float(max_rss_mb)
        self.action = choice("action", action, ("rehydrate", "stop", "raise", "restart"))
        self.every_n_batches = None if check_every is None else positive_int("check_every", check_every)
        self.max_restarts = positive_int("max_restarts", max_restarts)
        self.events: list[tuple[str, int | None, float]] = []
        self._process_start_step: int | None = None

    def on_train_begin(self, trainer):
        if self.action == "restart" and distributed.is_multi_worker(trainer.strategy):
            raise ConfigurationError(
                "MemoryBudget(action='restart') is not supported in a multi-worker run (the "
                "workers would have to restart together); use action='rehydrate' or "
                "'raise', or restart the job from its Checkpoint with your scheduler."
            )
        if self.action == "rehydrate":
            trainer.check_rehydratable()
        if self.action == "restart" and trainer.policies.find(Checkpoint) is None:
            raise ConfigurationError(
                "MemoryBudget(action='restart') needs a Checkpoint policy in the same "
                "trainer: the restarted process resumes from its checkpoint."
            )

    def on_epoch_begin(self, trainer, epoch):
        if self._process_start_step is None:  # after every on_train_begin, a resume included
            self._process_start_step = trainer.progress.global_step

    def _check(self, trainer, sample, where: str, step: int | None) -> None:
        if sample.rss_mb <= self.max_rss_mb:
            return
        self.events.append((where, step, sample.rss_mb))
        if self.action == "rehydrate":
            trainer.rehydrate()
        elif self.action == "stop":
            trainer.stop()
        elif self.action == "restart":
            self._restart(trainer, sample)
        else:
            raise MemoryBudgetExceeded(
                f"Resident memory {sample.rss_mb:.1f} MiB exceeds the budget of {self.max_rss_mb:.1f} MiB "
                f"({where}{'' if step is None else f' {step}'}, epoch {sample.epoch}).",
                trainer.memory,
                sample,
            )

    def _restart(self, trainer, sample) -> None:
        restarts = int(os.environ.get(isolation.RESTARTS_ENV, "0"))
        if trainer.progress.global_step <= (self._process_start_step or 0):
            warnings.warn(
                f"MemoryBudget: {sample.rss_mb:.1f} MiB is over the budget of {self.max_rss_mb:.1f} MiB "
                "right after a restart, before any progress; not restarting again (raise the budget).",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if restarts >= self.max_restarts:
            warnings.warn(
                f"MemoryBudget: over budget, but {restarts} restarts already (max_restarts); going on.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if not trainer.restart():
            warnings.warn(
                "MemoryBudget: the checkpoint before the restart failed; not restarting.", RuntimeWarning, stacklevel=3
            )

    def on_batch_end(self, trainer, step, sample):
        self._check(trainer, sample, "step", step)

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if self.action == "restart" and epoch + 1 >= trainer.progress.epochs_target:
            return  # nothing left to train: a restart would only resume a finished run
        self._check(trainer, sample, "end of epoch", epoch)


class LeakDetector(Policy):
    """Warn once, with a diagnosis, when RSS grows faster than `threshold_mb_per_epoch` over `window` epochs.

    The diagnosis comes from the same rules as the doctor's (`safetrain.diagnostics.diagnose`): the causes
    whose evidence accounts for the growth (retracing, models kept alive, Python-side accumulation by the
    bytes live arrays and tensors hold, allocator growth), warnings (a stateful layer never reset), and the
    fix for each. `detector.report` holds it: `causes`, `suggestion` (the first fix), `grew` (the object
    types that grew most, by bytes, since the first epoch), `traces`, `live_models`, `text` (what the warning
    says). Each cause names the lines to change where it can (`lines`, and "at file.py:LINE" in the warning):
    for Python-side accumulation, the line of a callback, custom step or loop that adds to the list or dict
    holding what grew (`safetrain.diagnostics.holders`); for retracing, the `def` of a custom step. With
    `rehydrate=True` it also re-hydrates whenever it fires. It takes a census of live objects after the
    first epoch and again when it fires (a few tenths of a second each, and 0.5-1.5 s more to find who
    holds what grew; that search never raises into the fit); the slope is fitted from the second epoch on.

    Example:
        >>> detector = LeakDetector(window=10, threshold_mb_per_epoch=1.0)
        >>> SafeTrainer(model, policies=[detector]).fit(x, y, epochs=50)
        >>> detector.report["suggestion"]
    """

    def __init__(self, window: int = 10, threshold_mb_per_epoch: float = 1.0, rehydrate: bool = False) -> None:
        self.window = positive_int("window", window)
        if self.window < 3:
            raise ValueError(f"`window` must be at least 3 epochs to fit a slope, got {window}.")
        if isinstance(threshold_mb_per_epoch, bool) or not isinstance(threshold_mb_per_epoch, (int, float)):
            raise TypeError(f"`threshold_mb_per_epoch` must be a number, got {threshold_mb_per_epoch!r}.")
        self.threshold_mb_per_epoch = float(threshold_mb_per_epoch)
        self.rehydrate = bool(rehydrate)
        self.report: dict | None = None
        self._baseline: dict | None = None
        self._events: list[dict] = []
        self._start: int | None = None

    def on_train_begin(self, trainer):
        if self._start is None:
            # Slopes start after the first epoch: its sample holds tracing, warm-up and the object census.
            self._start = len(trainer.memory) + 1
        if self.rehydrate:
            trainer.check_rehydratable()

    def on_epoch_end(self, trainer, epoch, logs, sample):
        t = float(len(self._events))
        self._events.append(dict(t=t, kind="epoch", rss_mb=sample.rss_mb))
        if self._baseline is None:
            # After the first epoch: tracing and warm-up are done, what grows from here on is the leak.
            self._baseline = dict(
                t=t,
                stats=diagnostics.census(),
                rss_mb=sample.rss_mb,
                models=live_models(),
                traces=dict(trainer.steps.total_trace_counts),
            )
        series = trainer.memory.series("rss_mb")[self._start or 0 :]
        if len(series) < self.window:
            return
        growth = memory.slope(series[-self.window :])
        if growth <= self.threshold_mb_per_epoch:
            return
        if self.report is None:
            self.report = self._diagnose(trainer, growth, sample)
            warnings.warn(self.report["text"], LeakWarning, stacklevel=2)
        if self.rehydrate:
            trainer.rehydrate()

    def _record(self, trainer, sample) -> dict:
        """What this run shows, as a `safetrain.diagnostics` record (the doctor's shape)."""
        base = self._baseline
        assert base is not None
        now = self._events[-1]["t"]
        events = list(self._events)
        functions = []
        for kind, total in trainer.steps.total_trace_counts.items():
            before = base["traces"].get(kind, 0)
            specs = [repr(s)[:200] for s in trainer.steps.signatures.get(kind, [])]
            specs = [""] * max(0, total - len(specs)) + specs  # traces before a re-hydration: signatures unknown
            traces = [
                dict(t=base["t"] if i < before else now, args={"data": spec or f"trace {i + 1}"})
                for i, spec in enumerate(specs)
            ]
            functions.append(dict(name=kind, traces=traces, defined=_step_defined(trainer, kind)))
            events += [dict(t=now, kind="trace", function=kind, rss_mb=sample.rss_mb)] * max(0, total - before)
        stateful = {}
        if trainer.policies.find(ResetStates) is None:
            for layer in hooks.layers_of(trainer.model):
                if getattr(layer, "stateful", False):
                    stateful[layer.name] = dict(
                        layer=layer.name, **{"class": type(layer).__name__}, epochs=len(self._events), resets=0
                    )
        stats = diagnostics.census()
        return dict(
            events=sorted(events, key=lambda e: e["t"]) + [dict(t=now, kind="end", rss_mb=sample.rss_mb)],
            functions=functions,
            stateful=stateful,
            census=dict(
                first=dict(t=base["t"], stats=base["stats"], rss_mb=base["rss_mb"]),
                last=dict(t=now, stats=stats, rss_mb=sample.rss_mb),
            ),
            holders=_holders(base["stats"], stats),
            counts=dict(epochs=len(self._events)),
            baseline=dict(t=base["t"], reason="the first epoch"),
            live_models_growth=live_models() - base["models"],
        )

    def _diagnose(self, trainer, growth: float, sample) -> dict:
        record = self._record(trainer, sample)
        found = diagnostics.diagnose(record)
        first = found["causes"] + found["warnings"]
        suggestion = first[0]["fix"] if first else FIXES["allocator_growth"]
        grew = [(name, count, size) for size, count, name in found["grew"]]
        top = ", ".join(f"{k} +{n} ({b / 2**20:.1f} MiB)" for k, n, b in grew[:5]) or "none"
        named = "; ".join(f"{c['title']}: {c['evidence']}{_at(c)}" for c in first) or "no cause accounts for it"
        traces = dict(trainer.steps.total_trace_counts)
        text = (
            f"RSS grows {growth:.2f} MiB/epoch over the last {self.window} epochs (threshold "
            f"{self.threshold_mb_per_epoch:.2f}); {found['growth_mb']:+.1f} MiB since epoch 1, of which live "
            f"objects hold {found['object_growth_mb']:.1f} MiB. Traces: {traces}. Keras models alive: "
            f"{record['live_models_growth']:+d} since epoch 1. Grew most: {top}. Found: {named}. "
            f"Suggested: {suggestion}."
        )
        return dict(
            slope_mb_per_epoch=growth,
            causes=found["causes"],
            warnings=found["warnings"],
            traces=traces,
            grew=grew,
            object_mb=found["object_growth_mb"],
            rss_mb=found["growth_mb"],
            live_models=record["live_models_growth"],
            suggestion=suggestion,
            text=text,
        )


def _holders(first: dict, last: dict) -> list[dict]:
    """Who holds the arrays and tensors that grew between two censuses, and the user's lines that add to them."""
    from safetrain.diagnostics.holders import holders_of_growth
    from safetrain.diagnostics.sites import Sites

    # The user's code: any file outside the libraries. `holders` never raises: a diagnosis must not stop a fit.
    return holders_of_growth(first, last, Sites(None))


def _step_defined(trainer, kind: str) -> tuple[str, int] | None:
    """Where the `kind` step is defined when it is the user's (a trainer's or a model's override)."""
    from safetrain.diagnostics.sites import Sites

    try:
        method = trainer.step_method(kind, microbatched=False)
        return Sites(None).defined(getattr(method, "__func__", method))
    except Exception:  # a diagnosis must not stop a fit
        return None


def _at(cause: dict) -> str:
    """` (at train.py:30)`: the lines a cause names, for the warning's text."""
    lines = [f"{site['file']}:{site['line']}" for site in cause.get("lines") or ()]
    return f" (at {', '.join(lines)})" if lines else ""


def live_models() -> int:
    """How many Keras models are alive now."""
    import keras

    return sum(1 for o in gc.get_objects() if isinstance(o, keras.Model))
