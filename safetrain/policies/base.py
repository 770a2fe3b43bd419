"""The policy protocol: `Policy` (hooks that decide *when*) and `PolicyList` (the trainer's, in order).

Example:
    >>> class PrintRSS(Policy):
    ...     def on_epoch_end(self, trainer, epoch, logs, sample):
    ...         print(epoch, sample.rss_mb)
"""

from __future__ import annotations

from collections.abc import Iterable

from safetrain import memory

__all__ = ["Policy", "PolicyList", "positive_int", "choice"]


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value


class Policy:
    """Base class of every policy. Override any of the hooks; the defaults do nothing.

    Attributes:
        every_n_batches: call `on_batch_end` every this many training steps (None: never).
    """

    every_n_batches: int | None = None
    #: set True to get `on_nonfinite_loss`: during `fit`, every training step's loss is then checked inside
    #: the compiled loop, and chunks stop right after the step whose loss is NaN/Inf
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
        """After the last epoch of a `fit`, also when training was stopped early or failed with an error."""

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

    def find(self, cls: type) -> Policy | None:
        """The first policy of class `cls`, or None."""
        return next((p for p in self.policies if isinstance(p, cls)), None)

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
            sample = trainer.sample_memory(trainer.progress.epoch)
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
