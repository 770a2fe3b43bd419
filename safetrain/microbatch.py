"""Microbatching: one optimizer update from gradients summed over slices of a batch; and recovery from OOM.

    SafeTrainer(model, microbatch_size=8).fit(x, y, batch_size=64)    # 8 slices of 8, one update per batch
    SafeTrainer(model).fit(x, y, batch_size=4096)     # a step that runs out of memory is retried in halves

The microbatch size lives in a variable read inside the compiled step, so changing it (recovery halving it)
needs no retrace after the first switch from whole batches.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf
from keras import tree

from safetrain.errors import OutOfMemory, OutOfMemoryWarning

__all__ = ["Microbatches", "recover_from_oom"]


def first_tensor(x):
    return next(t for t in tree.flatten(x) if t is not None)


class Microbatches:
    """The variable holding a train step's microbatch size, and the step that applies it. The size itself is
    `trainer.progress.microbatch_size` (None: whole batches)."""

    def __init__(self) -> None:
        self._variable: tf.Variable | None = None

    def set_size(self, size: int) -> bool:
        """Use microbatches of `size` samples from the next step on; True when the step must be rebuilt
        (the first switch from whole batches, which makes the variable)."""
        if self._variable is None:
            self._variable = tf.Variable(size, dtype=tf.int32, trainable=False, name="safetrain_microbatch")
            return True
        self._variable.assign(size)
        return False

    def train_step(self, trainer, data) -> dict:
        """`trainer.train_step` on microbatches: gradients of each slice, weighted by its share of the batch,
        summed into one optimizer update; metrics then see the whole batch, as in the one-piece step."""
        model = trainer.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(first_tensor(x))[0]
        assert self._variable is not None, "set_size() first"
        size = tf.minimum(self._variable.read_value(), batch)
        count = (batch + size - 1) // size
        trainable = model.trainable_weights

        def piece(i):
            start = i * size
            length = tf.minimum(size, batch - start)

            def cut(t):
                return None if t is None else t[start : start + length]

            xs, ys, sws = (tree.map_structure(cut, v) if v is not None else None for v in (x, y, sample_weight))
            with tf.GradientTape() as tape:
                y_pred = trainer.forward(xs, training=True)
                loss = trainer.compute_loss(x=xs, y=ys, y_pred=y_pred, sample_weight=sws, training=True)
                share = loss * tf.cast(length, loss.dtype) / tf.cast(batch, loss.dtype)
                scaled = model.optimizer.scale_loss(share)
            return share, tape.gradient(scaled, trainable), y_pred

        loss, grads, y_pred = piece(tf.constant(0))
        connected = [g is not None for g in grads]
        arrays = tree.map_structure(
            lambda t: tf.TensorArray(t.dtype, size=count, infer_shape=False, element_shape=[None] + t.shape[1:]).write(
                0, t
            ),
            y_pred,
        )

        def body(i, loss, grads, arrays):
            share, g, y_pred = piece(i)
            grads = [a + b for a, b in zip(grads, (gi for gi, c in zip(g, connected) if c))]
            arrays = tree.map_structure(lambda a, t: a.write(i, t), arrays, y_pred)
            return i + 1, loss + share, grads, arrays

        # One microbatch at a time: a slice's forward and backward pass does not depend on the previous slice,
        # so the default (10 iterations in parallel) would hold several microbatches' activations at once.
        _, loss, summed, arrays = tf.while_loop(
            lambda i, *_: i < count,
            body,
            (tf.constant(1), loss, [g for g in grads if g is not None], arrays),
            parallel_iterations=1,
        )
        summed = list(summed)
        y_pred = tree.map_structure(lambda a, t: tf.ensure_shape(a.concat(), [None] + t.shape[1:]), arrays, y_pred)
        with tf.control_dependencies(summed + [loss]):  # as in train_step: no state changes before this
            parts = iter(summed)
            model.optimizer.apply_gradients(zip([next(parts) if c else None for c in connected], trainable))
            trainer.track_loss(loss, x)
            return trainer.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def recover_from_oom(trainer, data, ran_before_failure: int, error: BaseException) -> tuple:
    """A training chunk ran out of memory: keep the steps it completed, retry the failed batch in halving
    microbatches, keep the size that fits. Advances `data` (an `EpochIterator`) past what ran; returns
    `(steps, outputs)` as a chunk would."""
    if trainer.has_custom("train_step") and trainer.progress.microbatch_size is None:
        raise OutOfMemory(
            "A training step ran out of memory, and it cannot be split into microbatches "
            "because the model or trainer overrides train_step; use a smaller batch_size."
        ) from error
    completed = ran_before_failure
    data.advance(completed, completed)
    data.reposition()  # the failed batch is next again
    batch = data.iterator.get_next()
    size = int(tf.shape(first_tensor(keras.utils.unpack_x_y_sample_weight(batch)[0]))[0])
    old = trainer.progress.microbatch_size or size
    step = data.steps_done
    epoch = trainer.progress.epoch
    new = min(old, size) // 2
    while True:
        if new < 1:
            raise OutOfMemory(
                f"Out of memory at epoch index {epoch}, batch {step}, even with microbatches "
                f"of 1 sample (batch of {size}); the model does not fit."
            ) from error
        trainer.set_microbatch_size(new)
        try:
            outputs = trainer.steps["train"].run_step(batch, data.element_spec)
            break
        except tf.errors.ResourceExhaustedError:
            new //= 2
    trainer.oom_events.append(
        {
            "epoch": epoch,
            "step": step,
            "global_step": trainer.progress.global_step + completed + 1,
            "batch_size": size,
            "old_microbatch_size": old,
            "new_microbatch_size": new,
        }
    )
    warnings.warn(
        f"Out of memory at epoch index {epoch}, batch {step} (a batch of {size}): retried in "
        f"microbatches of {new} (was {old}); keeping that size for the rest of the run.",
        OutOfMemoryWarning,
        stacklevel=4,
    )
    data.advance(1, 1)
    return completed + 1, outputs
