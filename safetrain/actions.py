"""The actions policies call on a trainer: policies decide *when*, these do the work (*how*).

    class RehydrateEvery3(Policy):
        def on_epoch_end(self, trainer, epoch, logs, sample):
            if (epoch + 1) % 3 == 0:
                trainer.rehydrate()             # or stop(), restart(), save_checkpoint(...), ...

`TrainerActions` is mixed into `SafeTrainer`; each action delegates to the module that owns the idea
(`snapshot`, `checkpoint`, `isolation`, `hooks`, `memory`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from safetrain import checkpoint, distributed, hooks, isolation, memory, snapshot
from safetrain.checks import check_int
from safetrain.errors import ConfigurationError
from safetrain.policies import Checkpoint

if TYPE_CHECKING:
    import keras
    from keras.callbacks import CallbackList

    from safetrain.data import Batches
    from safetrain.microbatch import Microbatches
    from safetrain.policies import PolicyList
    from safetrain.state import TrainingProgress
    from safetrain.steps import Steps

__all__ = ["TrainerActions"]


class TrainerActions:
    """Mixin of `SafeTrainer`: stop, restart, re-hydrate, checkpoint, watch for NaN, reset, release."""

    model: keras.Model
    progress: TrainingProgress
    policies: PolicyList
    steps: Steps
    microbatches: Microbatches
    inference_slices: dict[str, Microbatches]
    callbacks: CallbackList | None
    strategy: Any
    train_batches: Batches | None
    _resume: dict | None = None  # what a loaded checkpoint asks the next fit to resume at
    _rebuildable_checked = False

    def stop(self) -> None:
        """End training cleanly after the current step (the epoch still ends: callbacks and History see it)."""
        self.model.stop_training = True

    def reset_states(self) -> int:
        """Reset every stateful layer (stateful RNNs, layers with a `reset_state` hook); returns how many."""
        return hooks.reset_states(self.model)

    def release_memory(self) -> int:
        """Ask every layer with a `release_memory` hook to drop its caches; returns how many were asked."""
        return hooks.release_memory(self.model)

    def watch_nonfinite(self, watch: bool = True) -> None:
        """Check every training step's loss for NaN/Inf inside the compiled loop, so that training chunks
        stop on the exact step and policies hear `on_nonfinite_loss`. `fit` turns it on for its run when a
        policy sets `watches_nonfinite`."""
        self.steps["train"].set_watch_nonfinite(watch)

    def set_microbatch_size(self, size: int) -> None:
        """Split training batches into microbatches of `size` samples from the next step on."""
        check_int("size", size, 1)
        if self.microbatches.set_size(size):
            self.steps.reset("train")
        self.progress.microbatch_size = int(size)

    def clear_microbatch_size(self, size: int | None = None) -> None:
        """Back to whole batches (or to microbatches of `size`) from the next step on."""
        if size is not None:
            self.set_microbatch_size(size)
        elif self.progress.microbatch_size is not None:
            self.progress.microbatch_size = None
            self.microbatches.clear()
            self.steps.reset("train")

    def set_slice_size(self, kind: str, size: int | None) -> None:
        """Run the `kind` ("test" or "predict") step on slices of `size` samples of each batch, outputs put
        back together (what a memory budget does where whole batches would not fit); None: whole batches."""
        slices = self.inference_slices[kind]
        if size is None:
            rebuild = slices.clear()
        else:
            check_int("size", size, 1)
            rebuild = slices.set_size(size)
        if rebuild:
            self.steps.reset(kind)

    def load_progress(self, state: Mapping[str, Any]) -> None:
        """Take counters from a snapshot or checkpoint (`TrainingProgress.state_dict()` keys), with their
        effects: the microbatch size in use, the shuffle seed of the training data."""
        size, current = state.get("microbatch_size"), self.progress.microbatch_size
        self.progress.load_state_dict({k: v for k, v in state.items() if k != "position"})
        if size and size != current:
            self.set_microbatch_size(int(size))
        if self.train_batches is not None and self.progress.data_seed is not None:
            self.train_batches.seed = self.progress.data_seed
            self.train_batches.keras_order = self.progress.keras_order

    def check_rehydratable(self) -> None:
        """Raise `ConfigurationError` now (before training) if `rehydrate()` could not rebuild the model."""
        if not self._rebuildable_checked:
            snapshot.check_rebuildable(self)
            self._rebuildable_checked = True

    def rehydrate(self) -> snapshot.Snapshot:
        """Clear the Keras session without losing the run: snapshot, clear, rebuild, restore, recompile.

        Every model, optimizer and metric variable, Keras's global seed state and the trainer's counters
        come back, so training continues exactly as if nothing happened; callbacks are re-pointed to the
        new model (EarlyStopping, ModelCheckpoint, ... keep their own state). Layers' `release_memory`
        hooks run before the session is cleared and `after_rehydrate` hooks after the restore. If the
        rebuild fails, the trainer keeps its old model (usable as before) and the error is raised.

        Example:
            >>> trainer.fit(x, y, epochs=3)
            >>> trainer.rehydrate()     # trainer.model is a new object in exactly the same state
            >>> trainer.fit(x, y, epochs=6, initial_epoch=3)
        """
        return snapshot.rehydrate(self)

    def save_checkpoint(self, directory: str, keep: int = 2) -> str | None:
        """Write the full training state to `directory` atomically (see `safetrain.checkpoint`); returns its
        path, or None on workers other than the chief. Raises `OSError` if it could not be written."""
        return checkpoint.save(self, directory, keep)

    def load_checkpoint(self, directory: str) -> str | None:
        """Load the newest valid checkpoint in `directory` into this trainer; the running (or next) `fit`
        continues from its position. Returns its path, or None when there is none.

        Raises `CheckpointMismatch` when it was written for another model, and `ConfigurationError` when the
        workers of a multi-worker run see different checkpoints.
        """
        found = checkpoint.load_latest(self, directory)
        if found is None:
            return None
        path, meta = found
        self._resume = {"position": self.progress.position, "history": meta.get("history")}
        return path

    def take_resume(self) -> dict | None:
        """The data position and History a loaded checkpoint asks the next `fit` to resume at (once)."""
        resume, self._resume = self._resume, None
        return resume

    def restart(self) -> bool:
        """Checkpoint (with this trainer's `Checkpoint` policy), flush the callbacks, and re-execute this
        process's command line (`os.execv`): the new process resumes exactly. Returns False, without
        restarting, when the checkpoint could not be written."""
        policy = self.policies.find(Checkpoint)
        if not isinstance(policy, Checkpoint):
            raise ConfigurationError(
                "restart() needs a Checkpoint policy in the trainer: the restarted process resumes from its checkpoint."
            )
        if policy.save(self) is None:
            return False
        if self.callbacks is not None:  # TensorBoard writers, CSVLogger files, the progress bar: closed
            self.callbacks.on_train_end(logs=None)
        isolation.restart_process()
        return True  # not reached

    def sample_memory(self, epoch: int | None = None, step: int | None = None) -> memory.MemorySample:
        """Read memory now; in a multi-worker run `rss_mb` is the largest over all workers (a collective:
        every worker calls it at the same point, which the trainer and policies do).

        Example:
            >>> trainer.sample_memory().rss_mb
            412.5
        """
        sample = memory.sample(epoch, self.steps.trace_counts)
        if step is not None:
            sample = dataclasses.replace(sample, step=step)
        if distributed.is_multi_worker(self.strategy):
            per_worker = distributed.per_worker_values(self.strategy, sample.rss_mb)
            sample = memory.MemorySample(
                **{**sample.__dict__, "rss_mb": max(per_worker), "worker_rss_mb": tuple(per_worker)}
            )
        return sample
