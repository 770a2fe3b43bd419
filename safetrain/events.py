"""One dispatcher for a run's listeners: Keras callbacks (the progress bar among them) and policies.

    events = Events(trainer, callback_list)
    events.chunk_end("train", last_step, logs)   # every step to per-batch callbacks, or chunk ends to chunk-safe ones

The loop (`loop.py`) says what happened; `Events` says who hears it, in a fixed order: callbacks first,
then policies.
"""

from __future__ import annotations

from keras.callbacks import CallbackList

from safetrain import _compat

__all__ = ["Events"]

_BATCH_HOOKS = {
    "train": ("on_batch_begin", "on_batch_end", "on_train_batch_begin", "on_train_batch_end"),
    "test": ("on_test_batch_begin", "on_test_batch_end"),
    "predict": ("on_predict_batch_begin", "on_predict_batch_end"),
}


def _overrides(callback, hook: str) -> bool:
    return not getattr(getattr(callback, hook), "_is_default", False)


class Events:
    """One dispatcher for a run's listeners: Keras callbacks (the progress bar among them) and policies.

    A callback that overrides a per-batch hook of a kind makes that kind run one step per call and hear
    every step (as under `model.fit`); callbacks marked `chunk_safe` (the progress bar) instead hear the
    last step of every chunk, so training keeps running many steps per call.
    """

    def __init__(self, trainer, callbacks: CallbackList) -> None:
        self.trainer = trainer
        self.callbacks = callbacks
        listeners = callbacks.callbacks
        self.per_step = {
            kind: any(
                not getattr(cb, "chunk_safe", False) and any(_overrides(cb, h) for h in hooks) for cb in listeners
            )
            for kind, hooks in _BATCH_HOOKS.items()
        }
        self.per_chunk = {
            kind: [
                cb for cb in listeners if getattr(cb, "chunk_safe", False) and _overrides(cb, f"on_{kind}_batch_end")
            ]
            for kind in _BATCH_HOOKS
        }

    def chunk_begin(self, kind: str, step: int) -> None:
        if self.per_step[kind]:
            getattr(self.callbacks, f"on_{kind}_batch_begin")(step)

    def chunk_end(self, kind: str, last_step: int, logs) -> None:
        if self.per_step[kind]:
            getattr(self.callbacks, f"on_{kind}_batch_end")(last_step, logs)
            return
        for cb in self.per_chunk[kind]:
            getattr(cb, f"on_{kind}_batch_end")(last_step, logs)

    def train_steps_done(self) -> None:
        """Training steps ran: the policies that asked to see this global step hear it."""
        policies = self.trainer.policies
        if policies.wants_batches:
            policies.on_batch_end(self.trainer, self.trainer.progress.global_step)

    def nonfinite(self, epoch: int, step: int, logs) -> None:
        self.trainer.policies.on_nonfinite_loss(self.trainer, epoch, step, _compat.pythonify_logs(logs))

    def train_begin(self) -> None:
        self.callbacks.on_train_begin()
        self.trainer.policies.on_train_begin(self.trainer)

    def epoch_begin(self, epoch: int) -> None:
        self.callbacks.on_epoch_begin(epoch)
        self.trainer.policies.on_epoch_begin(self.trainer, epoch)

    def epoch_end(self, epoch: int, logs: dict, sample) -> None:
        self.callbacks.on_epoch_end(epoch, logs)
        self.trainer.progress.epoch = epoch + 1  # a snapshot taken now resumes at the next epoch
        self.trainer.policies.on_epoch_end(self.trainer, epoch, logs, sample)
