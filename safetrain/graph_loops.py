"""The graph loops a compiled step runs in: many steps per Python call, plain functions of the step.

Each builder returns a `tf.function(iterator, n)` that pulls up to `n` batches from a `tf.data` iterator
inside one graph `while_loop` and calls the step on each: the same numbers as one step per call, with the
Python overhead paid once per call.

Example:
    >>> loop = make_loop(step, spec)
    >>> steps_run, last_logs = loop(iter(dataset), tf.constant(100))
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from safetrain import _compat

__all__ = ["function", "make_loop", "make_predict_loop", "make_distributed_loop", "ChunkSizer", "all_finite"]


def function(fn, **kwargs):
    """`tf.function(fn, **kwargs)` without TensorFlow's "frequent retracing" warning (see `_compat`); real
    retraces are counted per trainer in `trace_counts` and enforced by `RetraceGuard`."""
    compiled = tf.function(fn, **kwargs)
    _compat.omit_retracing_warning(compiled)
    return compiled


def _zeros(spec):
    if not isinstance(spec, tf.TensorSpec):
        raise TypeError(
            f"A step must return a (nested) structure of dense tensors; got an output of type {type(spec).__name__}."
        )
    shape = [0 if d is None else d for d in spec.shape.as_list()] if spec.shape.rank is not None else [0]
    if spec.dtype == tf.string:
        return tf.fill(shape, "")
    return tf.zeros(shape, spec.dtype)


def _output_specs(concrete):
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs)


def all_finite(outputs):
    checks = [
        tf.reduce_all(tf.math.is_finite(o))
        for o in tf.nest.flatten(outputs)
        if o.dtype.is_floating and o.shape.rank == 0
    ]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def make_loop(
    step,
    spec,
    watch_nonfinite: bool = False,
    on_trace: Callable[[], None] = lambda: None,
    stop: tf.Variable | None = None,
):
    """Up to `n` steps on batches from an iterator in one graph; returns `(steps_run, last outputs)`.

    With `watch_nonfinite` the loop also stops right after a step whose float scalar outputs (the loss)
    are NaN or infinite; with `stop` (a boolean variable), it runs no further step once `stop` is True (a
    signal's stop request, set from another thread while the loop runs). Single-device inputs only: the
    step's output spec comes from its concrete function, so the loop carries plain tensors (zeros until the
    first step), one `cond` per step. Measured
    faster than carrying the outputs as an Optional (Keras's pattern, which distributed inputs would need;
    those take `make_distributed_loop`): safe/floor 0.95 vs 0.80 on the MLP.
    """

    def loop(iterator, n):
        on_trace()
        out_specs = _output_specs(step.get_concrete_function(spec))
        init = tf.nest.map_structure(_zeros, out_specs)
        invariants = (tf.TensorShape([]), tf.TensorShape([]), tf.nest.map_structure(lambda s: s.shape, out_specs))

        def body(i, done, outputs):
            nxt = iterator.get_next_as_optional()

            def run():
                new = step(nxt.get_value())
                return i + 1, tf.logical_not(all_finite(new)) if watch_nonfinite else tf.constant(False), new

            return tf.cond(nxt.has_value(), run, lambda: (i, tf.constant(True), outputs))

        def more(i, done, _):
            go = tf.logical_and(i < n, tf.logical_not(done))
            return go if stop is None else tf.logical_and(go, tf.logical_not(stop.read_value()))

        i, _, outputs = tf.while_loop(
            more, body, (tf.constant(0), tf.constant(False), init), shape_invariants=invariants
        )
        return i, outputs

    return function(loop, autograph=False, reduce_retracing=True)


def make_predict_loop(step, spec, on_trace: Callable[[], None] = lambda: None):
    """Up to `n` predict steps in one graph; returns `(steps_run, outputs of all steps concatenated)`."""

    def loop(iterator, n):
        on_trace()
        out_specs = _output_specs(step.get_concrete_function(spec))
        arrays = tf.nest.map_structure(
            lambda s: tf.TensorArray(s.dtype, size=0, dynamic_size=True, infer_shape=False, element_shape=s.shape),
            out_specs,
        )

        def body(i, done, arrays):
            nxt = iterator.get_next_as_optional()

            def run():
                out = step(nxt.get_value())
                return i + 1, tf.constant(False), tf.nest.map_structure(lambda a, o: a.write(i, o), arrays, out)

            return tf.cond(nxt.has_value(), run, lambda: (i, tf.constant(True), arrays))

        i, _, arrays = tf.while_loop(
            lambda i, done, _: tf.logical_and(i < n, tf.logical_not(done)),
            body,
            (tf.constant(0), tf.constant(False), arrays),
        )
        return i, tf.nest.map_structure(lambda a, s: tf.cond(i > 0, a.concat, lambda: _zeros(s)), arrays, out_specs)

    return function(loop, autograph=False, reduce_retracing=True)


def make_distributed_loop(step, on_trace: Callable[[], None] = lambda: None):
    """`n` steps under a multi-replica strategy: `n - 1` in a counted loop, then one whose outputs are returned.

    Under a multi-replica strategy the step may not sit inside a `tf.cond`: the optimizer's cross-replica
    merge there leaves unfed placeholders (keras-team/keras#19246; Keras's own steps_per_execution > 1
    fails the same way under MirroredStrategy here). So the caller must know that `n` batches are left
    (`CompiledStep.chunk_limit`); otherwise it runs one step per call and the end of the data shows as
    OutOfRangeError.
    """

    def loop(iterator, n):
        on_trace()

        def body(i):
            step(iterator.get_next())
            return i + 1

        tf.while_loop(lambda i: i < n - 1, body, [tf.constant(0)])
        return n, step(iterator.get_next())

    return function(loop, autograph=False, reduce_retracing=True)


class ChunkSizer:
    """How many steps to run per call: a fixed `steps_per_execution`, or "auto".

    "auto" starts small and grows the chunk until one call takes about `target_seconds`, so that Python
    overhead is paid once per chunk while the progress bar still moves a few times a second. Per-call
    timing never changes the numbers: the same steps run in the same order either way.
    """

    def __init__(
        self,
        steps_per_execution: int | str = "auto",
        target_seconds: float = 0.25,
        start: int = 8,
        max_steps: int = 4096,
        agree: Callable[[int], int] | None = None,
    ) -> None:
        # `agree`: how the workers of a multi-worker run settle on one size (each measures its own speed,
        # but all must run the same number of steps per call); called at the same calls on every worker.
        self.agree = agree
        self.auto = steps_per_execution == "auto"
        self.size = start if self.auto else int(steps_per_execution)
        self.target_seconds = target_seconds
        self.max_steps = max_steps
        self._calls = 0
        self._rate: float | None = None

    def next(self, remaining: int | None, boundary: int | None = None) -> int:
        """Steps for the next call, at most `remaining` and at most `boundary` (steps to the next hook)."""
        n = self.size
        for cap in (remaining, boundary):
            if cap is not None:
                n = min(n, cap)
        return max(1, n)

    def observe(self, steps_run: int, requested: int, seconds: float) -> None:
        """Learn from a call; the first call (which traces) is not timed."""
        self._calls += 1
        if not self.auto or self._calls == 1 or steps_run < requested or steps_run == 0:
            return
        if seconds > 0:
            rate = steps_run / seconds
            self._rate = rate if self._rate is None else 0.5 * self._rate + 0.5 * rate
            want = self._rate * self.target_seconds
            size = 1
            while size * 2 <= want and size * 2 <= self.max_steps:
                size *= 2
            self.size = size
        if self.agree is not None:
            self.size = max(1, int(self.agree(self.size)))
