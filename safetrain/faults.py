"""Fault injection for testing recovery, from outside: make train steps run out of memory above a batch size.

    safetrain.faults.simulate_oom_above(trainer, 8)
    trainer.fit(x, y, batch_size=32)   # steps on more than 8 samples raise tf.errors.ResourceExhaustedError;
                                       # the trainer retries them in microbatches of 16, then 8

It wraps the trainer's `compute_loss` (on the instance, nothing in the production step knows): while
training, the wrapped loss depends on a check of the batch (or microbatch) size, so the check runs before
any variable changes, and fails with `MemoryError`, which TensorFlow raises as the same
`ResourceExhaustedError` a real allocation failure gives.
"""

from __future__ import annotations

import tensorflow as tf

from safetrain.microbatch import first_tensor

__all__ = ["simulate_oom_above", "MARKER"]

MARKER = "safetrain: simulated out of memory"


def _raise_above(size, limit):
    if int(size) > int(limit):
        raise MemoryError(
            f"{MARKER}: a step on {int(size)} samples needs more than the simulated limit of {int(limit)}"
        )
    return tf.constant(0.0)


def _check(size, limit: int) -> tf.Tensor:
    """A 0.0 (inside the graph) that fails with ResourceExhaustedError when `size > limit`."""
    zero = tf.py_function(_raise_above, [size, tf.constant(limit)], tf.float32)
    zero.set_shape([])
    return zero


def simulate_oom_above(trainer, max_batch_size: int | None) -> None:
    """Make the trainer's train steps raise `ResourceExhaustedError` on batches larger than `max_batch_size`
    (None turns it off). Takes effect from the next trace (the train step is rebuilt now)."""
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0
    ):
        raise ValueError(f"`max_batch_size` must be a non-negative int or None, got {max_batch_size!r}.")
    trainer.__dict__.pop("compute_loss", None)  # a previous simulation's wrapper
    if max_batch_size is not None:
        compute_loss = trainer.compute_loss

        def faulty_compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
            if not training:
                return loss
            size = tf.shape(first_tensor(x))[0]
            # Multiplied, not added: the gradients then depend on the check, so it runs before any update.
            return loss * (1.0 + tf.cast(_check(size, max_batch_size), loss.dtype))

        trainer.compute_loss = faulty_compute_loss
    trainer.steps.reset("train")
