"""Policies for the course of training: reset stateful layers, guard against retracing, stop on NaN, checkpoint.

Example:
    >>> SafeTrainer(model, policies=[RetraceGuard(), StopOnNaN(), Checkpoint("runs/a")]).fit(x, y, epochs=50)
"""

from __future__ import annotations

import os
import time
import warnings

from safetrain.data import describe_spec
from safetrain.errors import CheckpointWarning, NonFiniteLoss, RetraceError
from safetrain.policies.base import Policy, choice, positive_int
from safetrain.snapshot import Snapshot

__all__ = ["ResetStates", "RetraceGuard", "StopOnNaN", "Checkpoint"]


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
            self.every_n_batches = positive_int("every", every)
        elif every != "epoch":
            raise ValueError(f"`every` must be 'epoch', 'batch' or a positive int, got {every!r}.")
        self.every = every

    def on_epoch_begin(self, trainer, epoch):
        if self.every == "epoch":
            trainer.reset_states()

    def on_batch_end(self, trainer, step, sample):
        trainer.reset_states()


class RetraceGuard(Policy):
    """Make a retrace visible: a step traced more than `max_traces` times raises (or warns).

    The error names the step and shows the signature it was compiled for and the one that forced the
    retrace. Counts start again after re-hydration (which compiles new functions on purpose). A step traced
    for a fixed batch size (as `model.fit` traces it) that meets batches of another size is traced once more
    with the batch dimension `None`; that one relaxation is not counted. It listens to the trainer's traces
    during `fit` (from `on_train_begin` to `on_train_end`).

    Example:
        >>> SafeTrainer(model, policies=[RetraceGuard(max_traces=1)])
    """

    def __init__(self, max_traces: int = 1, action: str = "raise") -> None:
        self.max_traces = positive_int("max_traces", max_traces)
        self.action = choice("action", action, ("raise", "warn"))
        self.events: list = []

    def on_train_begin(self, trainer):
        if self._on_trace not in trainer.steps.listeners:
            trainer.steps.listeners.append(self._on_trace)

    def on_train_end(self, trainer):
        if self._on_trace in trainer.steps.listeners:
            trainer.steps.listeners.remove(self._on_trace)

    def _on_trace(self, event) -> None:
        if event.count - event.relaxations <= self.max_traces:
            return
        self.events.append(event)
        message = (
            f"The {event.kind} step was traced {event.count} times (RetraceGuard allows {self.max_traces}). "
            f"It was compiled for {describe_spec(event.old_spec)} and now received "
            f"{describe_spec(event.new_spec)}. Give the data one dtype and structure (dimensions "
            "that vary must be None in the dataset's element_spec)."
        )
        if self.action == "raise":
            raise RetraceError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


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

    def on_epoch_begin(self, trainer, epoch):
        if self.rollback:
            self._good = (epoch, Snapshot.take(trainer))

    def on_nonfinite_loss(self, trainer, epoch, step, logs):
        loss = logs.get("loss", next(iter(logs.values()), float("nan"))) if logs else float("nan")
        global_step = trainer.progress.global_step
        self.event = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "loss": loss,
            "rolled_back_to_epoch": None,
        }
        trainer.stop()
        message = (
            f"Non-finite loss ({loss}) at epoch index {epoch} (Epoch {epoch + 1}), batch {step} (global "
            f"step {global_step}); training stopped"
        )
        if self.rollback and self._good is not None:
            good_epoch, snapshot = self._good
            snapshot.restore_values(trainer, metrics=False, counters=False)
            self.event["rolled_back_to_epoch"] = good_epoch
            message += f" and the model and optimizer were rolled back to the start of epoch index {good_epoch}"
        warnings.warn(message + ".", NonFiniteLoss, stacklevel=2)


class Checkpoint(Policy):
    """Write the full training state to `directory` atomically; resume from it when `fit` starts.

    The state is what re-hydration restores: every model, optimizer and metric variable, the RNG state, the
    counters, the data position (mid-epoch with `every_n_batches`) and the History so far. Each write goes
    to a temporary folder, is fsynced and renamed into place; the oldest beyond `keep` are removed after.
    A killed process therefore leaves the previous or the new checkpoint, never half of one; the restarted
    `fit` ends with the weights and History of an uninterrupted run. A checkpoint failing its checksum is
    reported and the previous one used; a failed write (disk full, permissions) warns and training goes on.

    Preemption: while `fit` runs, SIGTERM (what Kubernetes, Slurm and spot reclaims send before SIGKILL) stops
    training at the next step: the chunk in flight is cut short after its current step, a checkpoint of that
    exact step is written, callbacks and policies hear `on_train_end`, and `fit` raises `TrainingPreempted`
    (a `SystemExit` with status 143). With `save_on_interrupt=True`, Ctrl-C (SIGINT) saves the same way and
    then raises `KeyboardInterrupt`. Run the same command again to resume (see docs/recovery.md).

    Args:
        directory: where checkpoints live (one folder per run).
        every_n_epochs: write after every this many epochs (None: never at epoch end).
        every_n_batches: also write every this many training steps (None: never mid-epoch).
        keep: how many checkpoints to keep.
        save_on_interrupt: also save when Ctrl-C (SIGINT) stops `fit` (SIGTERM always saves).

    Example:
        >>> SafeTrainer(model, policies=[Checkpoint("runs/mlp", every_n_batches=500)]).fit(x, y, epochs=50)
        # kill it any time; run the same command again and it finishes the same run.
    """

    def __init__(
        self,
        directory: str,
        every_n_epochs: int | None = 1,
        every_n_batches: int | None = None,
        keep: int = 2,
        save_on_interrupt: bool = False,
    ) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path, got {type(directory).__name__}.")
        self.directory = os.fspath(directory)
        self.every_n_epochs = None if every_n_epochs is None else positive_int("every_n_epochs", every_n_epochs)
        self.every_n_batches = None if every_n_batches is None else positive_int("every_n_batches", every_n_batches)
        self.keep = positive_int("keep", keep)
        if not isinstance(save_on_interrupt, bool):
            raise TypeError(f"`save_on_interrupt` must be True or False, got {save_on_interrupt!r}.")
        self.save_on_interrupt = save_on_interrupt
        self.resumed_from: str | None = None
        self.written: list[str] = []
        self.failures: list[str] = []
        self.seconds = 0.0

    def on_train_begin(self, trainer):
        path = trainer.load_checkpoint(self.directory)
        if path is not None:
            self.resumed_from = path

    def save(self, trainer) -> str | None:
        """Write a checkpoint now; returns its path, or None (with a `CheckpointWarning`) if writing failed
        (and on workers other than the chief, which do not write)."""
        t0 = time.perf_counter()
        try:
            path = trainer.save_checkpoint(self.directory, keep=self.keep)
        except OSError as e:
            self.failures.append(f"{type(e).__name__}: {e}")
            warnings.warn(
                f"Checkpoint could not be written to {self.directory} ({type(e).__name__}: {e}); the "
                "previous checkpoint is intact and training goes on.",
                CheckpointWarning,
                stacklevel=2,
            )
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        if path is not None and (not self.written or self.written[-1] != path):  # epoch end on a batch save
            self.written.append(path)
        return path

    def on_batch_end(self, trainer, step, sample):
        self.save(trainer)

    def on_epoch_end(self, trainer, epoch, logs, sample):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer)
