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
    """The variable holding a step's microbatch size, and the steps that apply it. For training the size in
    use is `trainer.progress.microbatch_size`; for evaluation and prediction (run in slices under a memory
    budget) it is `size` (None: whole batches)."""

    def __init__(self) -> None:
        self._variable: tf.Variable | None = None
        self.size: int | None = None

    def set_size(self, size: int) -> bool:
        """Use microbatches of `size` samples from the next step on; True when the step must be rebuilt
        (the first switch from whole batches, which makes the variable)."""
        rebuild = self.size is None
        self.size = int(size)
        if self._variable is None:
            self._variable = tf.Variable(size, dtype=tf.int32, trainable=False, name="safetrain_microbatch")
            return True
        self._variable.assign(size)
        return rebuild

    def clear(self) -> bool:
        """Back to whole batches; True when the step must be rebuilt (it ran in slices)."""
        was, self.size = self.size, None
        return was is not None

    def _slices(self, data):
        """`(x, y, sample_weight)`, the batch size, the number of slices, and `cut(i)`: slice `i` and its length."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(first_tensor(x))[0]
        assert self._variable is not None, "set_size() first"
        size = tf.minimum(self._variable.read_value(), batch)

        def cut(i):
            start = i * size
            length = tf.minimum(size, batch - start)

            def part(t):
                return None if t is None else t[start : start + length]

            return tuple(tree.map_structure(part, v) if v is not None else None for v in (x, y, sample_weight)), length

        return (x, y, sample_weight), batch, (batch + size - 1) // size, cut

    def train_step(self, trainer, data) -> dict:
        """`trainer.train_step` on microbatches: gradients of each slice, weighted by its share of the batch,
        summed into one optimizer update; metrics then see the whole batch, as in the one-piece step."""
        model = trainer.model
        (x, y, sample_weight), batch, count, cut = self._slices(data)
        trainable = model.trainable_weights

        def piece(i):
            (xs, ys, sws), length = cut(i)
            with tf.GradientTape() as tape:
                y_pred = trainer.forward(xs, training=True)
                loss = trainer.compute_loss(x=xs, y=ys, y_pred=y_pred, sample_weight=sws, training=True)
                share = loss * tf.cast(length, loss.dtype) / tf.cast(batch, loss.dtype)
                scaled = model.optimizer.scale_loss(share)
            return [share, *tape.gradient(scaled, trainable)], y_pred

        (loss, *summed), y_pred = _accumulate(piece, count)
        with tf.control_dependencies([g for g in summed if g is not None] + [loss]):  # as in train_step
            model.optimizer.apply_gradients(zip(summed, trainable))
            trainer.track_loss(loss, x)
            return trainer.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, trainer, data) -> dict:
        """`trainer.test_step` on slices of the batch: the loss of each slice weighted by its share, the
        outputs put back together for the metrics, which see the whole batch as in the one-piece step."""
        (x, y, sample_weight), batch, count, cut = self._slices(data)

        def piece(i):
            (xs, ys, sws), length = cut(i)
            y_pred = trainer.forward(xs, training=False)
            loss = trainer.compute_loss(x=xs, y=ys, y_pred=y_pred, sample_weight=sws, training=False)
            return [loss * tf.cast(length, loss.dtype) / tf.cast(batch, loss.dtype)], y_pred

        (loss,), y_pred = _accumulate(piece, count)
        trainer.track_loss(loss, x)
        return trainer.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, trainer, data):
        """`trainer.predict_step` on slices of the batch, the outputs put back together."""
        _, _, count, cut = self._slices(data)

        def piece(i):
            (xs, _, _), _ = cut(i)
            return [], trainer.forward(xs, training=False)

        return _accumulate(piece, count)[1]


def _accumulate(piece, count):
    """Run `piece(i)` for i < `count`, one at a time: a slice's pass does not depend on the previous one, so
    the default (10 iterations in parallel) would hold several slices' activations at once. `piece` returns
    `(values, outputs)`; returns the values summed (None where the first slice gave None: a disconnected
    gradient) and the outputs concatenated along the batch. A sparse value (an embedding's gradient, a
    `tf.IndexedSlices`) is gathered, not summed: the slices' rows one after the other, as the whole batch's
    gradient lists them (summed dense, Keras's optimizers would also decay the moments of rows no sample used).
    """
    values, y_pred = piece(tf.constant(0))
    kinds = [None if v is None else "sparse" if isinstance(v, tf.IndexedSlices) else "dense" for v in values]

    def array(t):
        return tf.TensorArray(t.dtype, size=count, infer_shape=False, element_shape=[None] + t.shape[1:]).write(0, t)

    def arrays_of(v):
        return (array(v.values), array(v.indices))

    arrays = tree.map_structure(array, y_pred)
    sums = [v for v, k in zip(values, kinds) if k == "dense"]
    rows = [arrays_of(v) for v, k in zip(values, kinds) if k == "sparse"]

    def body(i, sums, rows, arrays):
        more, y_pred = piece(i)
        dense = (m for m, k in zip(more, kinds) if k == "dense")
        sparse = (m for m, k in zip(more, kinds) if k == "sparse")
        sums = [a + b for a, b in zip(sums, dense)]
        rows = [(a.write(i, m.values), b.write(i, m.indices)) for (a, b), m in zip(rows, sparse)]
        return i + 1, sums, rows, tree.map_structure(lambda a, t: a.write(i, t), arrays, y_pred)

    _, sums, rows, arrays = tf.while_loop(
        lambda i, *_: i < count, body, (tf.constant(1), sums, rows, arrays), parallel_iterations=1
    )
    dense_parts, sparse_parts = iter(list(sums)), iter(list(rows))
    firsts = iter(v for v, k in zip(values, kinds) if k == "sparse")
    result = []
    for kind in kinds:
        if kind == "dense":
            result.append(next(dense_parts))
        elif kind == "sparse":
            (a, b), first = next(sparse_parts), next(firsts)
            result.append(tf.IndexedSlices(a.concat(), b.concat(), first.dense_shape))
        else:
            result.append(None)
    outputs = tree.map_structure(lambda a, t: tf.ensure_shape(a.concat(), [None] + t.shape[1:]), arrays, y_pred)
    return result, outputs


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
