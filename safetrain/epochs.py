"""Epochs over a source of batches: `steps_per_epoch` as in `model.fit`, and a position that can be resumed.

Example:
    >>> epochs = EpochIterator(batches, steps_per_epoch=None)
    >>> epochs.start(epoch=0); epochs.remaining()
    625
    >>> epochs.position            # DataPosition(pass_epoch=0, pass_batches=0, epoch_steps=0)
"""

from __future__ import annotations

import threading
import warnings

import tensorflow as tf

from safetrain.data import Batches
from safetrain.state import DataPosition

__all__ = ["EpochIterator"]

_RAN_OUT = (
    "Your input ran out of data; interrupting the epoch. Make sure that your dataset or generator "
    "can generate at least `steps_per_epoch * epochs` batches (e.g. use `.repeat()` on a dataset)."
)


class EpochIterator:
    """Hands out the `tf.data` iterator of each epoch, with the `steps_per_epoch` semantics of `model.fit`.

    Without `steps_per_epoch` every epoch starts a fresh pass over the data (for arrays: in that epoch's
    shuffled order) and runs until it ends. With it, epochs draw `steps_per_epoch` batches from one
    iterator that persists across epochs and is renewed when the data runs out (with a warning when that
    cuts an epoch short), as Keras does.

    Example:
        >>> epochs = EpochIterator(batches, steps_per_epoch=None)
        >>> epochs.start(epoch=0); epochs.remaining()
        625
    """

    def __init__(
        self,
        batches: Batches,
        steps_per_epoch: int | None = None,
        strategy: tf.distribute.Strategy | None = None,
        direct: bool = False,
    ) -> None:
        self.batches = batches
        self.steps_per_epoch = steps_per_epoch
        self.num_batches = batches.num_batches
        self._strategy = strategy
        self.iterator = None
        #: Where the data stands (live: the trainer's `progress.position` is this object during `fit`).
        self.position = DataPosition()
        self._exhausted = False
        self.element_spec = batches.step_spec
        #: With `direct` (evaluate, predict), the whole pass as one batch of tensors when it is one unshuffled
        #: batch of arrays on one replica: the step then runs on it directly, without a `tf.data` iterator
        #: (see `Batches.single_batch`).
        self.batch = None
        if direct and steps_per_epoch in (None, 1) and (strategy is None or strategy.num_replicas_in_sync == 1):
            self.batch = batches.single_batch()

    def _new_iterator(self, epoch: int, skip: int = 0):
        ds = self.batches.dataset(epoch)
        if skip:
            ds = ds.skip(skip)
        strategy = self._strategy
        if (
            strategy is not None
            and strategy.num_replicas_in_sync > 1
            and not isinstance(ds, tf.distribute.DistributedDataset)
        ):
            ds = strategy.experimental_distribute_dataset(ds)
        iterator = iter(ds)
        if isinstance(ds, tf.distribute.DistributedDataset):
            self.element_spec = iterator.element_spec  # per-replica values
        self.position.pass_epoch = epoch
        return iterator

    def start(self, epoch: int) -> None:
        """Begin epoch `epoch`: a fresh iterator unless one persists across epochs (`steps_per_epoch`)."""
        self.batches.on_epoch_begin()
        if self.batch is not None:
            self.position.pass_epoch = epoch
            self.position.pass_batches = 0
        elif self.iterator is None or self.steps_per_epoch is None:
            self.iterator = self._new_iterator(epoch)
            self.position.pass_batches = 0
        self.position.epoch_steps = 0
        self._exhausted = False

    def reposition(self) -> None:
        """Re-create the iterator at the current position (after a failed call consumed batches it did not
        train on): the next batch is the first one not yet trained on."""
        self.iterator = self._new_iterator(self.position.pass_epoch, skip=self.position.pass_batches)

    def resume(self, epoch: int, position: DataPosition) -> None:
        """Begin epoch `epoch` part-way, at `position` (from `position` in an earlier process).

        The pass is re-created and fast-forwarded: exact for arrays (their order is a function of seed and
        epoch) and for any dataset whose order does not depend on how often it was iterated before.
        """
        self.batches.on_epoch_begin()
        self.iterator = self._new_iterator(position.pass_epoch, skip=position.pass_batches)
        self.position.pass_batches = position.pass_batches
        self.position.epoch_steps = position.epoch_steps
        self._exhausted = False

    def remaining(self) -> int | None:
        """Steps still to run this epoch; `None` when unknown (run until the data ends)."""
        if self._exhausted:
            return 0
        limits = []
        if self.steps_per_epoch is not None:
            limits.append(self.steps_per_epoch - self.position.epoch_steps)
        if self.num_batches is not None:
            limits.append(self.num_batches - self.position.pass_batches)
        return max(0, min(limits)) if limits else None

    def advance(self, steps_run: int, requested: int) -> None:
        """Record that a call ran `steps_run` of `requested` steps (fewer means the data ended)."""
        self.position.pass_batches += steps_run
        self.position.epoch_steps += steps_run
        if steps_run < requested:
            self._exhausted = True
            if self.num_batches is None and self.steps_per_epoch is None:
                self.num_batches = self.position.pass_batches

    @property
    def steps_done(self) -> int:
        return self.position.epoch_steps

    @property
    def ran_out(self) -> bool:
        """The pass has been read to its end (the data ended, or every batch of a known count was taken)."""
        return self._exhausted or (self.num_batches is not None and self.position.pass_batches >= self.num_batches)

    def calls_past_end(self, stopped: bool) -> bool:
        """Does `model.fit` call its step once more at the end of this pass: yes for data of unknown length read
        to its end (Keras learns the end from a call that finds no batch), unless a callback stopped the pass."""
        return (
            self.batches.num_batches is None
            and self.batch is None
            and self.iterator is not None
            and self.ran_out
            and not stopped
            and not isinstance(self.iterator, tf.distribute.DistributedIterator)
        )

    def finish(self, stopped: bool = False) -> None:
        """End the epoch: renew the iterator if the data ended, warn if that cut a fixed-length epoch short.

        `stopped`: a callback stopped the pass (`stop_training`, `stop_evaluating`, `stop_predicting`).
        """
        position = self.position
        ran_out = self.ran_out
        if self.steps_per_epoch is not None and ran_out and position.epoch_steps < self.steps_per_epoch:
            warnings.warn(_RAN_OUT, stacklevel=3)
        if ran_out or self.steps_per_epoch is None:
            self._retire()  # the next epoch starts a new pass
            position.pass_batches = 0
            if ran_out and not stopped and self.steps_per_epoch is None:
                self._open_spare()
        position.epoch_steps = 0
        self.batches.on_epoch_end()

    def _open_spare(self) -> None:
        # Keras's EpochIterator opens the next pass's iterator as soon as a pass of known length is read to its
        # end, and (without `steps_per_epoch`) opens another at the next epoch, dropping the first. A dataset
        # that reshuffles each iteration (`shuffle(buffer)`, TensorFlow's default) draws its order when an
        # iterator is opened, so `model.fit`'s epochs see passes 1, 3, 5 and a second `fit` starts at pass 7.
        # Opening (and dropping) the same iterator here gives the same orders; it reads nothing. Arrays have
        # their own order (`order.py`), and generators no known length.
        if self.batches.kind != "arrays" and self.batches.num_batches is not None:
            iter(self.batches.dataset(self.position.pass_epoch))

    def _retire(self) -> None:
        # Tearing down a multi-worker distributed iterator blocks for about 0.6 s (its prefetching ops are
        # cancelled and waited for): a thread takes the last reference and pays that while training goes on.
        holder, self.iterator = [self.iterator], None
        if isinstance(holder[0], tf.distribute.DistributedIterator):
            # Not a daemon: the interpreter waits for it at exit (a teardown cut off there aborts the process).
            threading.Thread(target=holder.clear, daemon=False, name="safetrain-retire-iterator").start()
