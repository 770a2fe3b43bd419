"""Compiled steps: one `CompiledStep` per kind ("train", "test", "predict"), traced once for a fixed input spec.

A `CompiledStep` owns everything about its kind: the spec it was compiled for, the step `tf.function` (which
runs the trainer's `train_step`/`test_step`/`predict_step` through `strategy.run`; its Python body runs only
while tracing, which is how traces are counted), the *loop* that pulls up to `n` batches from a `tf.data`
iterator inside one graph `while_loop` (many steps per Python call, the same numbers as one step per call),
and the concrete-function fast path. `reset()` drops all of them together.

A batch whose spec the compiled signature does not accept (another dtype, another rank) is a *retrace*: the
step is rebuilt for the most specific spec that accepts both, the count goes up, and listeners (e.g. a
retrace guard) are told the old and the new signature.

Example:
    >>> steps = Steps(trainer.step_method, strategy)
    >>> n, logs = steps["train"].run(iter(dataset), 100, spec)
    >>> steps.trace_counts
    {'train': 1, 'test': 0, 'predict': 0}
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from keras import tree

from safetrain import _compat, distributed, preemption
from safetrain.checks import finite_guard
from safetrain.data import relax_spec
from safetrain.graph_loops import all_finite, function, make_distributed_loop, make_loop, make_predict_loop

__all__ = ["Steps", "CompiledStep", "KINDS", "TraceEvent"]

KINDS = ("train", "test", "predict")

#: A step runs its first passes one compiled call per step while they add up to no more than this many steps;
#: the graph loop is traced only for a longer pass, or once these are done. Tracing the loop costs about
#: 0.11 s (an 8-16-1 model; more for bigger steps), a step called from Python about 1 ms more than one in the
#: loop: a fresh trainer's 8-step fit takes 0.1 s less, a 100-step one is unchanged (its loop traced at once).
STEPWISE_STEPS = 32


class TraceEvent:
    """What a listener learns when a step is traced: which step, the previous and the new signature.

    `relaxations`: how many of the step's `count` traces only relaxed a fixed batch size to `None` (a step
    traced for `model.fit`'s fixed batch size meeting batches of another size; at most one per step).
    """

    __slots__ = ("kind", "count", "old_spec", "new_spec", "relaxations")

    def __init__(self, kind: str, count: int, old_spec, new_spec, relaxations: int = 0) -> None:
        self.kind, self.count, self.old_spec, self.new_spec = kind, count, old_spec, new_spec
        self.relaxations = relaxations

    def __repr__(self) -> str:
        return f"TraceEvent({self.kind!r}, count={self.count}, old={self.old_spec}, new={self.new_spec})"


# -- specs ------------------------------------------------------------------------------------------------


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


def _rank(spec):
    shape = getattr(spec, "shape", None)
    return None if shape is None else shape.rank


def _supertype(a, b):
    """Most specific spec accepting both `a` and `b`, or `b` when none exists (other structure or dtype) or
    when it would lose a rank (most layers need a known rank: the step is traced afresh for `b` instead)."""
    try:
        tf.nest.assert_same_structure(a, b)
        if any(_rank(x) != _rank(y) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))):
            return b
        out = [x.most_specific_common_supertype([y]) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))]
    except (TypeError, ValueError, AttributeError):
        return b
    if any(o is None for o in out):
        return b
    return tf.nest.pack_sequence_as(a, out)


def is_distributed(spec) -> bool:
    """True for the element spec of a distributed iterator (per-replica values)."""
    return not all(
        isinstance(s, (tf.TensorSpec, tf.RaggedTensorSpec, tf.SparseTensorSpec, tf.OptionalSpec))
        for s in tf.nest.flatten(spec)
    )


def _reduce_per_replica(outputs, strategy, reduction: str):
    """Keras's reduction of per-replica step outputs ("auto": the mean over replicas; "concat" for predict).

    Across workers Keras's own "mean" reduces over axis 0 as well as over replicas, which fails on the
    scalar losses and metrics a train step returns (keras-team/keras#20585 family); the mean over replicas
    alone is what it computes on one worker, so that is what is computed here.
    """
    if reduction == "auto" and distributed.is_multi_worker(strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)
    return _compat.reduce_per_replica(outputs, strategy, reduction=reduction)


# -- one kind's compiled step -----------------------------------------------------------------------------


class CompiledStep:
    """The compiled step of one kind: its spec, `tf.function`, trace counts, chunked loop and fast path.

    Args:
        kind: "train", "test" or "predict".
        method: returns the Python step to compile (called at each build: a trainer's or model's
            `train_step`, a microbatched step, ...).
        strategy: the distribution strategy the step runs under.
        jit_compile: compile the step with XLA.
        check_inputs: fail inside the step on NaN/Inf in float inputs.
        on_trace: called with a `TraceEvent` on every trace.
    """

    def __init__(
        self,
        kind: str,
        method: Callable[[], Callable],
        strategy: tf.distribute.Strategy,
        jit_compile: bool = False,
        check_inputs: bool = False,
        on_trace: Callable[[TraceEvent], None] = lambda event: None,
    ) -> None:
        self.kind = kind
        self.method = method
        self.strategy = strategy
        self.jit_compile = jit_compile
        self.check_inputs = check_inputs
        self.on_trace = on_trace
        self.total_traces = 0  # over the object's life; `traces` restarts with `reset()`
        self.released_gradient_entries = 0
        self.watch_nonfinite = False
        self.reset()

    def reset(self) -> None:
        """Forget the compiled function, its loop and fast path (the next call traces again, counted afresh)."""
        self.spec = None  # the spec the function was compiled for
        self.function = None
        self.traces = 0
        self._initializing = None  # the spec of a first trace that created variables
        self.loop_traces = 0
        self.signatures: list = []
        self.batch_relaxations = 0  # traces that only relaxed a fixed batch size (see `TraceEvent`)
        self._last_spec = None  # the last spec object accepted: O(1) acceptance for the next call
        self._loop = None
        self._fast: tuple | None = None  # (spec object, concrete loop function)
        self._step_fast: tuple | None = None  # (spec, concrete step function)
        self._composite: bool | None = None  # does the step return ragged/sparse tensors (None: not known)
        self.stepwise_steps = 0  # steps run one call each before the loop was traced
        self._past_end = None  # the step called on `iterator.get_next()` (see `run_past_end`)

    def set_watch_nonfinite(self, watch: bool) -> None:
        """Stop training chunks right after a step with a NaN/Inf loss (the check is part of the loop)."""
        if bool(watch) != self.watch_nonfinite:
            self.watch_nonfinite = bool(watch)
            self._loop = self._fast = None

    # -- building -----------------------------------------------------------------------------------------
    def _record_trace(self, spec, created_variables: bool) -> None:
        # A step that creates variables in its first trace (a model Keras builds when the step is traced: a
        # GAN, a VAE) is traced by TensorFlow a second time, without creating them; that second trace of the
        # same spec is part of the first call, not a retrace.
        if self._initializing is not None and self._initializing == spec:
            self._initializing = None
            return
        self._initializing = spec if created_variables else None
        self.traces += 1
        self.total_traces += 1
        old = self.signatures[-1] if self.signatures else None
        self.signatures.append(spec)
        if old is not None and relax_spec(old) == relax_spec(spec):
            self.batch_relaxations += 1
        self.on_trace(TraceEvent(self.kind, self.traces, old, spec, self.batch_relaxations))

    def _release_gradient_entries(self, before: set | None) -> None:
        # Gradients inside the step are taken during its own trace (by the tape), so the custom-gradient
        # entries this trace registered are not needed afterwards; dropping them lets the graph go with the
        # model. Only entries that this graph's own ops use go: one a nested tf.function (which outlives
        # this trace) or another thread registered meanwhile stays.
        registry = _compat.gradient_registry()
        if registry is None or before is None:
            return
        new = {k for k in registry if k not in before and str(k).startswith(_compat.CUSTOM_GRADIENT_PREFIX)}
        if not new:
            return
        for name in new & _compat.custom_gradients_of(_compat.current_graph()):
            registry.pop(name, None)
            self.released_gradient_entries += 1

    def _build(self, spec):
        method = self.method()
        strategy = self.strategy
        reduction = "concat" if self.kind == "predict" else "auto"
        check_inputs = self.check_inputs

        def one_step(data):
            registry = _compat.gradient_registry()
            before = set(registry) if registry is not None else None
            created = []

            def count_created(next_creator, **kwargs):
                created.append(kwargs.get("name"))
                return next_creator(**kwargs)

            if check_inputs:
                data = finite_guard(data)
            try:
                with tf.variable_creator_scope(count_created):
                    outputs = strategy.run(lambda d: method(_drop_optionals(d)), args=(data,))
                outputs = _reduce_per_replica(outputs, strategy, reduction)
            finally:
                self._release_gradient_entries(before)
            self._record_trace(spec, bool(created))  # Python side effect: runs once per trace, never per step
            return outputs

        one_step.__name__ = f"safetrain_{self.kind}_step"
        if not is_distributed(spec):
            return function(
                one_step, input_signature=[spec], jit_compile=self.jit_compile, autograph=False, reduce_retracing=False
            )
        # Distributed values (one tensor per replica) have no relaxable input signature; relax on retrace.
        return function(one_step, jit_compile=self.jit_compile, autograph=False, reduce_retracing=True)

    def function_for(self, spec):
        """The compiled step that accepts batches of `spec`, building or widening it if needed."""
        if self.function is not None and (spec is self._last_spec or _accepts(self.spec, spec)):
            self._last_spec = spec
            return self.function
        self.spec = spec if self.function is None else _supertype(self.spec, spec)
        self.function = self._build(self.spec)
        self._last_spec = spec
        self._loop = self._fast = self._step_fast = self._past_end = None  # their graphs hold the old step
        self._composite = None
        return self.function

    def _loopfunction(self):
        if self._loop is None:

            def counted():
                self.loop_traces += 1

            if is_distributed(self.spec):
                self._loop = make_distributed_loop(self.function, counted)
            elif self.kind == "predict":
                self._loop = make_predict_loop(self.function, self.spec, counted)
            else:
                train = self.kind == "train"
                stop = preemption.stop_flag() if train else None  # a signal ends the chunk at the next step
                self._loop = make_loop(self.function, self.spec, train and self.watch_nonfinite, counted, stop)
            self._fast = None
        return self._loop

    @property
    def stops_early(self) -> bool:
        """Whether a stop request (`preemption.stop_flag`) ends this step's chunks at the next step: the
        single-device loops read it; distributed loops run their fixed count."""
        return self.spec is not None and not is_distributed(self.spec)

    # -- running ------------------------------------------------------------------------------------------
    def chunk_limit(self, spec, exact: bool) -> int | None:
        """The most steps one call may run on batches of `spec` (None: no limit).

        Distributed loops run a fixed count (see `make_distributed_loop`), so without a trusted count of
        the batches left (`exact`), for predict (per-step outputs) and when every step is checked for a
        non-finite loss, they run one step per call.
        """
        if not is_distributed(spec):
            return None
        if not exact or self.kind == "predict" or (self.kind == "train" and self.watch_nonfinite):
            return 1
        return None

    def run_step(self, data, spec):
        """Run one step on one batch (already a tensor structure) and return its outputs.

        Calls with an equal spec call the traced concrete function directly, skipping `tf.function`'s
        per-call dispatch: for `train_on_batch` in a loop that is a third of the time per call.
        """
        fast = self._step_fast
        if fast is not None and fast[0] == spec:
            try:
                return fast[1](data)
            except (TypeError, ValueError):
                self._step_fast = None
        function = self.function_for(spec)
        outputs = function(data)
        if not is_distributed(self.spec):
            self._step_fast = (spec, function.get_concrete_function(self.spec))
        return outputs

    def run(self, iterator, n: int, spec=None, remaining: int | None = None):
        """Run up to `n` steps on batches from `iterator`; returns `(steps_run, outputs)`.

        `remaining`: the steps left in this pass, when known. `steps_run < n` means the iterator is exhausted.
        For "train"/"test", `outputs` are the last step's (zeros when no step ran); for "predict", the
        outputs of all steps, concatenated along the batch.
        """
        spec = relax_spec(iterator.element_spec) if spec is None else spec
        exact = remaining is not None
        self.function_for(spec)
        if self._composite_outputs():
            return self._run_stepwise(iterator, n)
        if (
            self._loop is None
            and remaining is not None
            and not is_distributed(self.spec)
            and self.stepwise_steps + remaining <= STEPWISE_STEPS
        ):
            ran, outputs = self._run_stepwise(iterator, n, self.kind == "train" and self.watch_nonfinite)
            self.stepwise_steps += ran
            return ran, outputs
        loop = self._loopfunction()
        count = _count(n)
        if is_distributed(self.spec):
            n = min(n, self.chunk_limit(self.spec, exact) or n)
            try:
                steps_run, outputs = loop(iterator, _count(n))  # a distributed iterator needs the dispatch
            except tf.errors.OutOfRangeError:
                return 0, None  # the loop's fixed count of steps met the end of the data
            return int(steps_run), outputs
        # Calling the traced concrete function skips tf.function's per-call dispatch (argument binding,
        # trace-type lookup): measurable at a few steps per call. It is keyed on the spec object the caller
        # passes (one per data source), and falls back to the dispatching call on any mismatch.
        if self._fast is not None and self._fast[0] is spec:
            try:
                steps_run, outputs = self._fast[1](iterator, count)
                return int(steps_run), outputs
            except (TypeError, ValueError):
                self._fast = None
        steps_run, outputs = loop(iterator, count)
        self._fast = (spec, loop.get_concrete_function(iterator, count))
        return int(steps_run), outputs

    def run_past_end(self, iterator):
        """The call `model.fit` makes after the last batch of data of unknown length; returns `(steps_run, outputs)`.

        Keras (with `steps_per_execution=1`) finds the end of such data by calling its step on
        `iterator.get_next()` once more. TensorFlow runs the step's ops that do not wait for the batch before
        the missing batch stops the call: seed generators (dropout) move on, and Keras's optimizer counts one
        more iteration, every epoch (measured: 15 iterations for 3 epochs of 4 batches; seed counters 15). The
        same call here moves what does not wait for the batch in this step (the loop adds the iteration that
        SafeTrainer's own `train_step` holds back). The step itself is not traced again (the wrapper calls its
        traced function). When the iterator did have another batch, that step ran, as it does in Keras.
        """
        if self._past_end is None:
            step = self.function
            self._past_end = function(lambda it: step(it.get_next()), autograph=False)
        try:
            return 1, self._past_end(iterator)
        except tf.errors.OutOfRangeError:
            return 0, None

    def _composite_outputs(self) -> bool:
        """True when the step returns ragged or sparse tensors, which the graph loops cannot carry."""
        if self._composite is None:
            if is_distributed(self.spec):
                self._composite = False
            else:
                assert self.function is not None
                outputs = self.function.get_concrete_function(self.spec).structured_outputs
                self._composite = any(
                    isinstance(t, (tf.RaggedTensor, tf.SparseTensor)) for t in tf.nest.flatten(outputs)
                )
        return self._composite

    def _run_stepwise(self, iterator, n: int, watch_nonfinite: bool = False):
        """Up to `n` steps, one compiled call each (for steps with ragged or sparse outputs, and the first steps
        of a step, see `STEPWISE_STEPS`); for "predict" the outputs of all steps concatenated, as the graph
        loop gives them. With `watch_nonfinite`, it stops right after a step with a NaN/Inf loss, as the loop."""
        outputs: Any = None
        kept: list = []
        steps_run = 0
        assert self.function is not None
        for _ in range(n):
            if self.kind == "train" and preemption.stop_requested():
                break  # a signal: training stops at this step boundary
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                break
            outputs = self.run_step(batch.get_value(), self.spec)
            steps_run += 1
            if self.kind == "predict":
                kept.append(outputs)
            if watch_nonfinite and not bool(all_finite(outputs)):
                break
        if self.kind == "predict" and kept:
            outputs = tf.nest.map_structure(_concat_batches, *kept) if len(kept) > 1 else kept[0]
        return steps_run, outputs


def _concat_batches(*parts):
    if isinstance(parts[0], tf.SparseTensor):
        return tf.sparse.concat(0, list(parts))
    return tf.concat(list(parts), axis=0)


_COUNTS: dict[int, tf.Tensor] = {}


def _count(n: int) -> tf.Tensor:
    """`n` as an int32 tensor, cached: a new Python int per call would cost a host-to-device constant."""
    t = _COUNTS.get(n)
    if t is None:
        if len(_COUNTS) > 64:
            _COUNTS.clear()
        t = _COUNTS[n] = tf.constant(n, tf.int32)
    return t


class Steps:
    """A trainer's three compiled steps, with their trace counts and trace listeners.

    Example:
        >>> trainer.steps.trace_counts
        {'train': 1, 'test': 1, 'predict': 0}
        >>> trainer.steps.listeners.append(print)     # told of every trace (a TraceEvent)
    """

    def __init__(
        self,
        method_for: Callable[[str], Callable],
        strategy: tf.distribute.Strategy | None = None,
        jit_compile: bool = False,
        check_inputs: bool = False,
    ) -> None:
        self.strategy = strategy or tf.distribute.get_strategy()
        self.jit_compile = bool(jit_compile)
        self.listeners: list[Callable[[TraceEvent], None]] = []
        self.kinds = {
            kind: CompiledStep(
                kind, functools.partial(method_for, kind), self.strategy, self.jit_compile, check_inputs, self._on_trace
            )
            for kind in KINDS
        }

    def __getitem__(self, kind: str) -> CompiledStep:
        return self.kinds[kind]

    def _on_trace(self, event: TraceEvent) -> None:
        for listener in list(self.listeners):
            listener(event)

    def reset(self, kind: str | None = None) -> None:
        """Forget the compiled functions of `kind` (all kinds when None): an explicit rebuild, e.g. after
        re-hydration. Trace counts start again; `total_trace_counts` keeps counting."""
        for k in KINDS if kind is None else (kind,):
            self.kinds[k].reset()

    @property
    def trace_counts(self) -> dict[str, int]:
        return {k: s.traces for k, s in self.kinds.items()}

    @property
    def total_trace_counts(self) -> dict[str, int]:
        return {k: s.total_traces for k, s in self.kinds.items()}

    @property
    def loop_trace_counts(self) -> dict[str, int]:
        return {k: s.loop_traces for k, s in self.kinds.items()}

    @property
    def signatures(self) -> dict[str, list]:
        return {k: s.signatures for k, s in self.kinds.items()}

    @property
    def released_gradient_entries(self) -> int:
        return sum(s.released_gradient_entries for s in self.kinds.values())
