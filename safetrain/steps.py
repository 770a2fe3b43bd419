"""Compiled step functions: one `tf.function` per step kind, traced once for a fixed input signature.

Each kind ("train", "test", "predict") has two functions:

- the *step*, `tf.function(input_signature=[element_spec with batch dim None])`, which runs the trainer's
  `train_step`/`test_step`/`predict_step` through `strategy.run`. Its Python body runs only while tracing,
  which is how `trace_counts` counts traces;
- the *loop*, which pulls up to `n` batches from a `tf.data` iterator inside one graph `while_loop` and calls
  the step on each: many steps per Python call, the same numbers as one step per call.

A batch whose spec the compiled signature does not accept (another dtype, another rank) is a *retrace*: the
step is rebuilt for the most specific spec that accepts both, the count goes up, and listeners (e.g. a
retrace guard) are told the old and the new signature.

Example:
    >>> steps = StepFunctions(trainer)
    >>> n, logs = steps.run("train", iter(dataset), 100)
    >>> steps.trace_counts
    {'train': 1, 'test': 0, 'predict': 0}
"""

from __future__ import annotations

import threading
from typing import Callable

import tensorflow as tf
from keras import tree
from keras.src.backend.tensorflow.trainer import reduce_per_replica

from safetrain import distributed, faults

__all__ = ["StepFunctions", "KINDS", "TraceEvent", "gradient_registry"]

KINDS = ("train", "test", "predict")
_CUSTOM_GRADIENT_PREFIX = "CustomGradient-"


def gradient_registry() -> dict | None:
    """TensorFlow's global gradient registry (name -> gradient function), or None if TF moved it.

    In graph mode every `tf.custom_gradient` call (Keras's optimizer uses one to sum gradients across
    replicas) registers a gradient function under a fresh name, and that function's closure holds the
    traced graph. Nothing ever removes those entries, so each traced train step stays alive forever.
    """
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


class TraceEvent:
    """What a listener learns when a step is traced: which step, the previous and the new signature."""

    __slots__ = ("kind", "count", "old_spec", "new_spec")

    def __init__(self, kind: str, count: int, old_spec, new_spec) -> None:
        self.kind, self.count, self.old_spec, self.new_spec = kind, count, old_spec, new_spec

    def __repr__(self) -> str:
        return f"TraceEvent({self.kind!r}, count={self.count}, old={self.old_spec}, new={self.new_spec})"


def _drop_optionals(data):
    # tf.data carries Python `None` entries (e.g. a missing sample weight) as empty Optionals.
    return tree.map_structure(lambda v: None if isinstance(v, tf.experimental.Optional) else v, data)


def _accepts(compiled_spec, spec) -> bool:
    try:
        tf.nest.assert_same_structure(compiled_spec, spec)
    except (TypeError, ValueError):
        return False
    for c, s in zip(tf.nest.flatten(compiled_spec), tf.nest.flatten(spec)):
        if type(c) is not type(s):
            return False
        if hasattr(s, "is_subtype_of"):
            if not s.is_subtype_of(c):
                return False
        elif not c.is_compatible_with(s):
            return False
    return True


def _supertype(a, b):
    """Most specific spec accepting both `a` and `b`, or `b` when none exists (other structure or dtype)."""
    try:
        tf.nest.assert_same_structure(a, b)
        out = [x.most_specific_common_supertype([y]) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))]
    except (TypeError, ValueError, AttributeError):
        return b
    if any(o is None for o in out):
        return b
    return tf.nest.pack_sequence_as(a, out)


def _zeros(spec):
    if not isinstance(spec, tf.TensorSpec):
        raise TypeError("A step must return a (nested) structure of dense tensors; got an output of type "
                        f"{type(spec).__name__}.")
    shape = [0 if d is None else d for d in spec.shape.as_list()] if spec.shape.rank is not None else [0]
    if spec.dtype == tf.string:
        return tf.fill(shape, "")
    return tf.zeros(shape, spec.dtype)


def _reduce_per_replica(outputs, strategy, reduction: str):
    """Keras's reduction of per-replica step outputs ("auto": the mean over replicas; "concat" for predict).

    Across workers Keras's own "mean" reduces over axis 0 as well as over replicas, which fails on the
    scalar losses and metrics a train step returns (keras-team/keras#20585 family); the mean over replicas
    alone is what it computes on one worker, so that is what is computed here.
    """
    if reduction == "auto" and distributed.is_multi_worker(strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)
    return reduce_per_replica(outputs, strategy, reduction=reduction)


def _function(fn, **kwargs):
    """`tf.function(fn, **kwargs)` without TensorFlow's "frequent retracing" warning.

    That heuristic counts traces per code object across *all* instances, so every new trainer in a k-fold
    loop looks like a retrace of the previous one's function. Real retraces are counted per trainer in
    `trace_counts` (and enforced by `RetraceGuard`).
    """
    function = tf.function(fn, **kwargs)
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


def _output_specs(concrete):
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), concrete.structured_outputs)


class StepFunctions:
    """The trainer's compiled train/test/predict functions and their trace counts.

    `step_method(kind)` on the owner returns the Python callable to compile for that kind (a trainer's or
    a model's `train_step`, ...). Functions are built on first use and cached; `reset()` drops them all
    (an explicit rebuild, e.g. after re-hydration).
    """

    def __init__(self, owner, strategy: tf.distribute.Strategy | None = None, jit_compile: bool = False) -> None:
        self._owner = owner
        self.strategy = strategy or tf.distribute.get_strategy()
        self.jit_compile = bool(jit_compile)
        self.trace_counts: dict[str, int] = {k: 0 for k in KINDS}
        self.loop_trace_counts: dict[str, int] = {k: 0 for k in KINDS}
        self.signatures: dict[str, list] = {k: [] for k in KINDS}
        self.listeners: list[Callable[[TraceEvent], None]] = []
        self._steps: dict[str, tuple] = {}
        self._loops: dict[str, tf.types.experimental.GenericFunction] = {}
        self._concrete: dict[str, tuple] = {}
        self._n_cache: dict[int, tf.Tensor] = {}
        self._lock = threading.Lock()
        self.total_trace_counts: dict[str, int] = {k: 0 for k in KINDS}
        self.released_gradient_entries = 0
        self._stop_on_nonfinite = False

    @property
    def stop_on_nonfinite(self) -> bool:
        """When True, a training chunk stops right after the step whose loss (or any float scalar it
        returns) is NaN or infinite, so the caller knows exactly which step it was."""
        return self._stop_on_nonfinite

    @stop_on_nonfinite.setter
    def stop_on_nonfinite(self, value: bool) -> None:
        if bool(value) != self._stop_on_nonfinite:
            self._stop_on_nonfinite = bool(value)
            self._loops.pop("train", None)  # the check is part of the loop's graph
            self._concrete.pop("train", None)

    # -- building -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every compiled function (an explicit rebuild, e.g. after re-hydration).

        `trace_counts` and `signatures` start again for the new functions; `total_trace_counts` keeps
        counting over the trainer's life.
        """
        self._steps.clear()
        self._loops.clear()
        self._concrete.clear()
        self.trace_counts = {k: 0 for k in KINDS}
        self.loop_trace_counts = {k: 0 for k in KINDS}
        self.signatures = {k: [] for k in KINDS}

    def reset_kind(self, kind: str) -> None:
        """Forget the compiled functions of one kind (the next call traces them again, counted afresh)."""
        self._steps.pop(kind, None)
        self._loops.pop(kind, None)
        self._concrete.pop(kind, None)
        self.trace_counts[kind] = 0
        self.loop_trace_counts[kind] = 0
        self.signatures[kind] = []

    def run_step(self, kind: str, data, spec):
        """Run one step of `kind` on one batch (already a tensor structure) and return its outputs."""
        try:
            return self.step_function(kind, spec)(data)
        except tf.errors.OpError as error:
            translated = faults.translate(error)
            if translated is None:
                raise
            raise translated from None

    def _release_gradient_entries(self, before: set | None) -> None:
        # Gradients inside the step are taken during its own trace (by the tape), so the entries its
        # trace registered are not needed afterwards; dropping them lets the graph go with the model.
        registry = gradient_registry()
        if registry is None or before is None:
            return
        for name in [k for k in registry if k not in before and str(k).startswith(_CUSTOM_GRADIENT_PREFIX)]:
            registry.pop(name, None)
            self.released_gradient_entries += 1

    def _record_trace(self, kind: str, spec) -> None:
        with self._lock:
            self.trace_counts[kind] += 1
            self.total_trace_counts[kind] += 1
            old = self.signatures[kind][-1] if self.signatures[kind] else None
            self.signatures[kind].append(spec)
            event = TraceEvent(kind, self.trace_counts[kind], old, spec)
        for listener in list(self.listeners):
            listener(event)

    def _make_step(self, kind: str, spec):
        method = self._owner.step_method(kind)
        strategy = self.strategy
        reduction = "concat" if kind == "predict" else "auto"

        def one_step(data):
            self._record_trace(kind, spec)  # Python side effect: runs once per trace, never per step
            registry = gradient_registry()
            before = set(registry) if registry is not None else None
            if getattr(self._owner, "check_inputs", False):
                from safetrain.checks import finite_guard
                data = finite_guard(data)
            try:
                outputs = strategy.run(lambda d: method(_drop_optionals(d)), args=(data,))
                return _reduce_per_replica(outputs, strategy, reduction)
            finally:
                self._release_gradient_entries(before)

        one_step.__name__ = f"safetrain_{kind}_step"
        if not self._distributed(spec):
            return _function(one_step, input_signature=[spec], jit_compile=self.jit_compile,
                             autograph=False, reduce_retracing=False)
        # Distributed values (one tensor per replica) have no relaxable input signature; relax on retrace.
        return _function(one_step, jit_compile=self.jit_compile, autograph=False, reduce_retracing=True)

    def step_function(self, kind: str, spec):
        """The compiled step for `kind` that accepts batches of `spec`, building or widening it if needed."""
        current = self._steps.get(kind)
        if current is not None and (spec is current[2] or _accepts(current[0], spec)):
            if spec is not current[2]:
                self._steps[kind] = (current[0], current[1], spec)  # next call with this spec: O(1)
            return current[1]
        new_spec = spec if current is None else _supertype(current[0], spec)
        fn = self._make_step(kind, new_spec)
        self._steps[kind] = (new_spec, fn, spec)  # (compiled spec, function, last spec it accepted)
        self._loops.pop(kind, None)  # the loop's graph holds the old step
        return fn

    def _make_loop(self, kind: str, step, spec):
        if self._distributed(spec):
            return self._make_distributed_loop(kind, step)
        if kind == "predict":
            return self._make_predict_loop(step, spec)
        watch = kind == "train" and self._stop_on_nonfinite

        def finite(outputs):
            checks = [tf.reduce_all(tf.math.is_finite(o)) for o in tf.nest.flatten(outputs)
                      if o.dtype.is_floating and o.shape.rank == 0]
            return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)

        def loop(iterator, n):
            # Single-device (and default-strategy) inputs: the step's output spec comes from its concrete
            # function, so the loop carries plain tensors (zeros until the first step), one `cond` per step.
            # Measured faster than carrying the outputs as an Optional (Keras's pattern, which distributed
            # inputs would need; those take `_make_distributed_loop`): safe/floor 0.95 vs 0.80 on the MLP.
            self.loop_trace_counts[kind] += 1
            out_specs = _output_specs(step.get_concrete_function(spec))
            init = tf.nest.map_structure(_zeros, out_specs)
            invariants = (tf.TensorShape([]), tf.TensorShape([]),
                          tf.nest.map_structure(lambda s: s.shape, out_specs))

            def cond(i, done, outputs):
                return tf.logical_and(i < n, tf.logical_not(done))

            def body(i, done, outputs):
                nxt = iterator.get_next_as_optional()

                def run():
                    new = step(nxt.get_value())
                    return i + 1, tf.logical_not(finite(new)) if watch else tf.constant(False), new

                return tf.cond(nxt.has_value(), run, lambda: (i, tf.constant(True), outputs))

            i, _, outputs = tf.while_loop(cond, body, (tf.constant(0), tf.constant(False), init),
                                          shape_invariants=invariants)
            return i, outputs

        loop.__name__ = f"safetrain_{kind}_loop"
        return _function(loop, autograph=False, reduce_retracing=True)

    def _make_distributed_loop(self, kind: str, step):
        """Under a multi-replica strategy the step may not sit inside a `tf.cond`: the optimizer's cross-replica
        merge there leaves unfed placeholders (keras-team/keras#19246; Keras's own steps_per_execution > 1
        fails the same way under MirroredStrategy here). So: `n - 1` steps in a counted loop, then one more
        whose outputs are returned, when the caller knows that many batches are left (`exact`); else one
        step per call, the end of the data showing as OutOfRangeError."""
        def loop(iterator, n):
            self.loop_trace_counts[kind] += 1

            def body(i):
                step(iterator.get_next())
                return i + 1

            tf.while_loop(lambda i: i < n - 1, body, [tf.constant(0)])
            return n, step(iterator.get_next())

        loop.__name__ = f"safetrain_{kind}_distributed_loop"
        return _function(loop, autograph=False, reduce_retracing=True)

    @staticmethod
    def _distributed(spec) -> bool:
        return not all(isinstance(s, (tf.TensorSpec, tf.RaggedTensorSpec, tf.SparseTensorSpec, tf.OptionalSpec))
                       for s in tf.nest.flatten(spec))

    def _make_predict_loop(self, step, spec):
        def loop(iterator, n):
            self.loop_trace_counts["predict"] += 1
            out_specs = _output_specs(step.get_concrete_function(spec))
            arrays = tf.nest.map_structure(
                lambda s: tf.TensorArray(s.dtype, size=0, dynamic_size=True, infer_shape=False,
                                         element_shape=s.shape), out_specs)

            def cond(i, done, arrays):
                return tf.logical_and(i < n, tf.logical_not(done))

            def body(i, done, arrays):
                nxt = iterator.get_next_as_optional()

                def run():
                    out = step(nxt.get_value())
                    return i + 1, tf.constant(False), tf.nest.map_structure(lambda a, o: a.write(i, o), arrays, out)

                return tf.cond(nxt.has_value(), run, lambda: (i, tf.constant(True), arrays))

            i, _, arrays = tf.while_loop(cond, body, (tf.constant(0), tf.constant(False), arrays))
            outputs = tf.nest.map_structure(
                lambda a, s: tf.cond(i > 0, a.concat, lambda: _zeros(s)), arrays, out_specs)
            return i, outputs

        loop.__name__ = "safetrain_predict_loop"
        return _function(loop, autograph=False, reduce_retracing=True)

    # -- running --------------------------------------------------------------------------------------
    def _n(self, n: int) -> tf.Tensor:
        t = self._n_cache.get(n)
        if t is None:
            if len(self._n_cache) > 64:
                self._n_cache.clear()
            t = self._n_cache[n] = tf.constant(n, tf.int32)
        return t

    def chunk_limit(self, kind: str, spec, exact: bool) -> int | None:
        """The most steps one call of `kind` may run on batches of `spec` (None: no limit).

        Distributed loops run a fixed count (see `_make_distributed_loop`), so without a trusted count of
        the batches left (`exact`), for predict (per-step outputs) and when every step is checked for a
        non-finite loss, they run one step per call.
        """
        if not self._distributed(spec):
            return None
        if not exact or kind == "predict" or (kind == "train" and self._stop_on_nonfinite):
            return 1
        return None

    def run(self, kind: str, iterator, n: int, spec=None, exact: bool = False):
        """Run up to `n` steps of `kind` on batches from `iterator`; returns `(steps_run, outputs)`.

        `steps_run < n` means the iterator is exhausted. For "train"/"test", `outputs` are the last step's
        (zeros when no step ran); for "predict", the outputs of all steps, concatenated along the batch.
        """
        from safetrain.data import relax_spec

        spec = relax_spec(iterator.element_spec) if spec is None else spec
        step = self.step_function(kind, spec)
        loop = self._loops.get(kind)
        if loop is None:
            loop = self._loops[kind] = self._make_loop(kind, step, self._steps[kind][0])
            self._concrete.pop(kind, None)
        per_replica = self._distributed(self._steps[kind][0])
        if per_replica:
            n = min(n, self.chunk_limit(kind, self._steps[kind][0], exact) or n)
        try:
            if not per_replica:
                # Calling the traced concrete function skips tf.function's per-call dispatch (argument
                # binding, trace-type lookup): measurable at a few steps per call. It is keyed on the spec
                # object the caller passes (one per data source), and falls back to the dispatching call on
                # any mismatch. A distributed iterator must go through the dispatch.
                cached = self._concrete.get(kind)
                if cached is not None and cached[0] is spec:
                    try:
                        steps_run, outputs = cached[1](iterator, self._n(n))
                        return int(steps_run), outputs
                    except (TypeError, ValueError):
                        self._concrete.pop(kind, None)
            steps_run, outputs = loop(iterator, self._n(n))
            if not per_replica:
                self._concrete[kind] = (spec, loop.get_concrete_function(iterator, self._n(n)))
            return int(steps_run), outputs
        except tf.errors.OpError as error:
            if per_replica and isinstance(error, tf.errors.OutOfRangeError):
                return 0, None  # a distributed loop's fixed count of steps met the end of the data
            translated = faults.translate(error)
            if translated is None:
                raise
            raise translated from None


class ChunkSizer:
    """How many steps to run per call: a fixed `steps_per_execution`, or "auto".

    "auto" starts small and grows the chunk until one call takes about `target_seconds`, so that Python
    overhead is paid once per chunk while the progress bar still moves a few times a second. Per-call
    timing never changes the numbers: the same steps run in the same order either way.
    """

    def __init__(self, steps_per_execution: int | str = "auto", target_seconds: float = 0.25,
                 start: int = 8, max_steps: int = 4096, agree: Callable[[int], int] | None = None) -> None:
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
