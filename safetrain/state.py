"""Training progress: the counters that say where a run stands, saved and restored as one record.

Checkpoints, snapshots and policies read `trainer.progress`; nothing reads the trainer's private fields.

Example:
    >>> trainer.fit(x, y, epochs=3)
    >>> trainer.progress.epoch, trainer.progress.global_step
    (3, 96)
    >>> state = trainer.progress.state_dict()          # JSON-able
    >>> TrainingProgress().load_state_dict(state)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["TrainingProgress", "DataPosition"]


@dataclasses.dataclass
class DataPosition:
    """Where the training data stands: which epoch's pass the iterator is on, how many batches it has given,
    and how many steps the current epoch has run. Resuming at this point gives exactly the next batch."""

    pass_epoch: int = 0
    pass_batches: int = 0
    epoch_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DataPosition:
        return cls(int(state["pass_epoch"]), int(state["pass_batches"]), int(state["epoch_steps"]))


@dataclasses.dataclass
class TrainingProgress:
    """Where a trainer's run stands.

    Attributes:
        epoch: the next epoch to run (the current one while it runs).
        global_step: training steps run over the trainer's life (1 after the first step).
        data_seed: the seed of the array shuffle order (the order of epoch `e` is a function of it and `e`).
        keras_order: True when `data_seed` is the TensorFlow global seed and arrays are shuffled in the order
            `model.fit` uses under it.
        microbatch_size: the microbatch size in use (None: whole batches), e.g. after out-of-memory recovery.
        epochs_target: the `epochs` of the running (or last) `fit`.
        position: where the training data stands mid-epoch (None outside a fit).
    """

    epoch: int = 0
    global_step: int = 0
    data_seed: int | None = None
    keras_order: bool = False
    microbatch_size: int | None = None
    epochs_target: int = 0
    position: DataPosition | None = None

    def counters(self) -> dict[str, Any]:
        """The counters without the data position: what a re-hydration snapshot restores (the data
        iterator itself carries on)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "data_seed": self.data_seed,
            "keras_order": self.keras_order,
            "microbatch_size": self.microbatch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able copy (what a checkpoint stores)."""
        return dict(self.counters(), position=None if self.position is None else self.position.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> TrainingProgress:
        """Take the values of `state_dict()` output; keys it lacks keep their current value. Returns self."""
        for key in ("epoch", "global_step", "data_seed", "keras_order", "microbatch_size"):
            if key in state:
                setattr(self, key, state[key])
        if "position" in state:
            position = state["position"]
            self.position = None if position is None else DataPosition.from_state_dict(position)
        return self
