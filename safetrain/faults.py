"""Fault injection for testing recovery: make train steps run out of memory above a batch size.

    safetrain.faults.simulate_oom_above(trainer, 8)
    trainer.fit(x, y, batch_size=32)   # steps on more than 8 samples raise tf.errors.ResourceExhaustedError;
                                       # the trainer retries them in microbatches of 16, then 8

The check runs inside the compiled step, before any variable changes, on the batch (or microbatch) size;
what the trainer's recovery sees is the exception class a real allocation failure raises.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["simulate_oom_above", "MARKER"]

MARKER = "safetrain: simulated out of memory"


def simulate_oom_above(trainer, max_batch_size: int | None) -> None:
    """Make the trainer's train steps raise `ResourceExhaustedError` on batches larger than `max_batch_size`
    (None turns it off). Takes effect from the next trace (the train step is rebuilt now)."""
    if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                       or max_batch_size < 0):
        raise ValueError(f"`max_batch_size` must be a non-negative int or None, got {max_batch_size!r}.")
    trainer._simulated_oom_above = max_batch_size
    trainer.steps.reset_kind("train")


def _raise_above(size, limit):
    if int(size) > int(limit):
        raise RuntimeError(f"{MARKER}: a step on {int(size)} samples needs more than the simulated limit of "
                           f"{int(limit)}")
    return tf.constant(0.0)


def check(size, limit) -> tf.Tensor:
    """A 0.0 to add to the loss; raises (inside the graph) when `size > limit`."""
    zero = tf.py_function(_raise_above, [size, tf.constant(limit)], tf.float32)
    zero.set_shape([])
    return zero


def translate(error: Exception) -> Exception | None:
    """The `ResourceExhaustedError` a simulated OOM stands for, or None if `error` is something else."""
    if isinstance(error, tf.errors.OpError) and MARKER in str(error.message):
        line = next((ln for ln in str(error.message).splitlines() if MARKER in ln), MARKER)
        return tf.errors.ResourceExhaustedError(None, None, line.strip())
    return None
