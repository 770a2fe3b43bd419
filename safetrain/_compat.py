"""Every private Keras / TensorFlow name safetrain uses, in one place, each with why and its fallback.

Nothing else in safetrain imports `keras.src` or `tensorflow.python` or reads a Keras object's private
attributes; `tests/test_compat.py` checks each name below against the installed versions, so an upgrade
that moves one fails there, loudly, rather than somewhere in a training run.

Example:
    >>> from safetrain import _compat
    >>> _compat.gradient_registry() is not None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import (
    TensorFlowTrainer,  # the default steps, to spot overrides
    potentially_ragged_concat,  # predict's concat of ragged pieces
    reduce_per_replica,  # Keras's reduction of per-replica outputs
)

try:
    from keras.src.losses.loss import unscale_loss_for_distribution  # the loss tracker sees the unscaled loss
except ImportError:  # Keras < 3.8: the same few lines, as Keras 3.8+ has them

    def unscale_loss_for_distribution(value):
        """Multiply a per-replica-scaled loss back by the number of replicas (TensorFlow backend)."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = keras.ops.multiply(value, keras.ops.cast(replicas, value.dtype))
        return value


from keras.src.trainers.data_adapters import (
    array_slicing,  # Keras's array slicing (sparse, ragged, pandas)
    data_adapter_utils,  # pack_x_y_sample_weight
    get_data_adapter,  # datasets, generators, PyDataset as in fit
)
from keras.src.trainers.data_adapters.array_data_adapter import can_convert_arrays  # what counts as arrays
from keras.src.utils.python_utils import pythonify_logs  # epoch logs as Python floats, as model.fit gives


def _keras_version() -> tuple[int, int]:
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in keras.version().split(".")[:2])
    return major, minor


#: Since Keras 3.11 a chunk of `steps_per_execution` steps reports `begin + steps_per_execution - 1` to
#: `on_*_batch_end`; before, it reported `begin` (the epoch iterator yielded one step number). A public
#: behaviour, but one only the version tells.
BATCH_END_IS_LAST_STEP = _keras_version() >= (3, 11)

__all__ = [
    "TensorFlowTrainer",
    "potentially_ragged_concat",
    "reduce_per_replica",
    "unscale_loss_for_distribution",
    "array_slicing",
    "data_adapter_utils",
    "get_data_adapter",
    "can_convert_arrays",
    "pythonify_logs",
    "gradient_registry",
    "tf_global_seed",
    "advise_random_access",
    "function_op_seeds",
    "clear_kernel_cache",
    "compute_output_spec",
    "global_seed_state",
    "drop_global_seed_state",
    "symbolic_build",
    "compile_config",
    "compile_token",
    "is_trainer_model",
    "compiled_loss",
    "loss_tracker",
    "call_has_training_arg",
    "model_strategy",
    "flatten_layers",
    "initial_epoch",
    "flatten_metrics_in_order",
    "history_of",
    "model_inputs",
    "compute_loss",
    "chief_worker_only",
    "input_is_optional",
    "none_spec",
    "omit_retracing_warning",
    "python_functions_made",
    "CUSTOM_GRADIENT_PREFIX",
    "BATCH_END_IS_LAST_STEP",
]

CUSTOM_GRADIENT_PREFIX = "CustomGradient-"
# Graphs of control flow inside a traced function (their ops belong to that function and die with it); a
# nested `tf.function`'s graph is a plain FuncGraph and outlives the trace that first called it.
_CONTROL_FLOW_GRAPHS = ("CondBranchFuncGraph", "WhileCondFuncGraph", "WhileBodyFuncGraph")


# -- TensorFlow ----------------------------------------------------------------------------------------


def gradient_registry() -> dict | None:
    """TensorFlow's global gradient registry (name -> gradient function), or None if TF moved it.

    In graph mode every `tf.custom_gradient` call (Keras's optimizer uses one to sum gradients across
    replicas) registers a gradient function under a fresh name, and that function's closure holds the
    traced graph. Nothing ever removes those entries, so each traced train step stays alive forever.
    """
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def custom_gradients_of(graph) -> set[str]:
    """Names of the custom gradients that ops of `graph` (and of its cond/while branches) use."""
    names: set[str] = set()
    pending, seen = [graph], set()
    while pending:
        g = pending.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        for op in g.get_operations():
            try:
                names.add(op.get_attr("_gradient_op_type").decode())
            except (ValueError, AttributeError):
                pass
        for function in getattr(g, "_functions", {}).values():
            sub = getattr(function, "graph", None)
            if sub is not None and type(sub).__name__ in _CONTROL_FLOW_GRAPHS:
                pending.append(sub)
    return names


def tf_global_seed() -> int | None:
    """The seed `tf.random.set_seed` (or `keras.utils.set_random_seed`) set, None if none; read without
    drawing from TensorFlow's op-seed counter (`tf.compat.v1.get_seed` would draw, changing later ops)."""
    from tensorflow.python.eager import context

    return context.global_seed()


def function_op_seeds(global_seed: int) -> tuple[int, int]:
    """The (seed, seed2) TensorFlow gives the first unseeded random op traced in a `tf.function` or
    `tf.data` function under the global seed `global_seed` (op seeds count from 0 per graph).

    Keras's array adapter shuffles with `tf.random.shuffle` in such a function; with these seeds the
    same permutation can be made without setting the global seed (tested against Keras's adapter).
    """
    maxint32 = 2**31 - 1
    seeds = (global_seed % maxint32, 0)
    return (0, maxint32) if seeds == (0, 0) else seeds


def advise_random_access(array) -> bool:
    """Tell the kernel a memory-mapped NumPy array will be read at random (`MADV_RANDOM`): no readahead.

    A shuffled pass reads rows scattered over the file; with the default readahead each 4 KiB row pulls in
    up to megabytes (measured: 352 MiB read from disk per batch of 256 rows of a 28 GiB file, 0.5 MiB with
    the advice). Uses the `mmap` object NumPy keeps on the memmap (`_mmap`); False where there is none or
    the platform has no `madvise`.
    """
    import mmap

    base = array
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    handle = getattr(base, "_mmap", None) if base is not None else None
    if handle is None or not hasattr(handle, "madvise") or not hasattr(mmap, "MADV_RANDOM"):
        return False
    handle.madvise(mmap.MADV_RANDOM)
    return True


def current_graph():
    """The graph being traced now (a FuncGraph inside `tf.function`)."""
    return tf.compat.v1.get_default_graph()


def clear_kernel_cache() -> None:
    """Drop TensorFlow's eager kernel cache (keyed on op attributes, variable names included)."""
    from tensorflow.python.eager import context

    ctx = context.context()
    if hasattr(ctx, "clear_kernel_cache"):
        ctx.clear_kernel_cache()


@contextlib.contextmanager
def python_functions_made() -> Iterator[list]:
    """The Python functions that `tf.numpy_function`, `tf.py_function` or `Dataset.from_generator` register in
    the block, taken off the graph TensorFlow ties them to: yields a list, filled when the block ends.

    TensorFlow keeps each such function alive as long as the outermost graph (`Graph._py_funcs_used_in_graph`),
    and a `tf.data` pipeline built eagerly has the process's global graph as its outermost one: every
    pipeline built on a Python function keeps that function, and all its closure holds, for good (measured: a
    shuffled fit over 2M rows kept each epoch's 16 MiB order, +16 MiB per epoch). The dataset should hold
    them instead (`tf.data`'s iterators hold their dataset for this reason), so they go with it.
    """
    graph = tf.compat.v1.get_default_graph()
    while getattr(graph, "outer_graph", None) is not None:  # a FuncGraph: TensorFlow walks out the same way
        graph = graph.outer_graph
    before = getattr(graph, "_py_funcs_used_in_graph", None)
    known = {id(f) for f in before} if before else set()
    made: list = []
    try:
        yield made
    finally:
        held = getattr(graph, "_py_funcs_used_in_graph", None)
        if held:
            made.extend(f for f in held if id(f) not in known)
            if made:
                mine = {id(f) for f in made}
                held[:] = [f for f in held if id(f) not in mine]


def omit_retracing_warning(function) -> None:
    """Silence TensorFlow's "frequent retracing" heuristic for one function (it counts traces of a code
    object across all instances, so every new trainer in a k-fold loop looks like a retrace)."""
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True


# -- Keras ---------------------------------------------------------------------------------------------


def compute_output_spec(model, symbolic_inputs) -> Any:
    """Build a model by running it on symbolic inputs (Keras's own route in `Model.build`)."""
    return keras.src.backend.compute_output_spec(model, symbolic_inputs, training=False)


def symbolic_build(model, data_batch) -> None:
    """Create the model's, compiled metrics' and loss trackers' variables from an element spec, as Keras's
    `fit` does under a distribution strategy."""
    model._symbolic_build(data_batch=data_batch)


def global_seed_state():
    """The state variable of Keras's global seed generator (None before anything drew from it)."""
    from keras.src.backend.common import global_state

    generator = global_state.get_global_attribute("global_seed_generator")
    return None if generator is None else generator.state


def drop_global_seed_state() -> None:
    """Forget Keras's global seed generator (as before anything drew from it): what made it is undone."""
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("global_seed_generator", None)


def make_global_seed_state():
    """The global seed generator's state variable, creating the generator if needed."""
    from keras.src.random.seed_generator import global_seed_generator

    return global_seed_generator().state


def compile_token(model):
    """An object that changes whenever `model.compile` is called (its recorded compile arguments)."""
    return getattr(model, "_compile_config", None)


def is_trainer_model(obj) -> bool:
    """What Keras's own `fit` runs on: a Keras layer that is also a Keras trainer (every `keras.Model`,
    and `class M(Trainer, layers.Dense)` as Keras's tests write them)."""
    return isinstance(obj, keras.layers.Layer) and isinstance(obj, TensorFlowTrainer)


def compile_config(model) -> dict:
    """The arguments `model.compile` was called with ({} if never)."""
    config = getattr(model, "_compile_config", None)
    return dict(config.config) if config is not None and getattr(model, "compiled", False) else {}


def compiled_loss(model):
    """The model's compiled loss object, or None when compiled without a loss."""
    return getattr(model, "_compile_loss", None)


def loss_tracker(model):
    """The `Mean` metric that tracks the loss shown in logs (None for models without one)."""
    return getattr(model, "_loss_tracker", None)


def compute_loss(model, x, y, y_pred, sample_weight, training: bool):
    """`model.compute_loss` with the `training` argument where Keras takes it (its private wrapper)."""
    if hasattr(model, "_compute_loss"):
        return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)


def call_has_training_arg(model) -> bool:
    """Whether the model's `call` takes `training=`."""
    return bool(getattr(model, "_call_has_training_arg", True))


def model_strategy(model):
    """The distribution strategy the model's variables were made under (None: made outside any)."""
    return getattr(model, "_distribute_strategy", None)


def flatten_layers(model):
    """Every layer of the model, the model itself first, recursively."""
    return model._flatten_layers(include_self=True, recursive=True)


def initial_epoch(model) -> int | None:
    """The epoch BackupAndRestore asks `fit` to start from (None: no request)."""
    return getattr(model, "_initial_epoch", None)


def flatten_metrics_in_order(model, logs):
    """`evaluate`'s list return value, ordered as Keras orders it."""
    return model._flatten_metrics_in_order(logs)


def history_of(callbacks):
    """The History callback a `CallbackList(add_history=True)` made."""
    return getattr(callbacks, "_history", None)


def model_inputs(model):
    """The structure of a functional or Sequential model's inputs (None for subclassed models)."""
    struct = getattr(model, "_inputs_struct", None)
    if struct is None:
        struct = getattr(getattr(model, "_functional", None), "_inputs_struct", None)
    return struct


def input_is_optional(keras_tensor) -> bool:
    """Was this model input made with `keras.Input(..., optional=True)` (so that it may be fed None)?"""
    history = getattr(keras_tensor, "_keras_history", None)
    return bool(getattr(getattr(history, "operation", None), "optional", False))


def none_spec():
    """The element spec `tf.data` gives a `None` in a batch (an optional input fed None)."""
    from tensorflow.python.framework.none_tensor import NoneTensorSpec

    return NoneTensorSpec()


def chief_worker_only(callback) -> bool:
    """Whether a callback marks itself as one that only the chief worker runs."""
    return bool(getattr(callback, "_chief_worker_only", False))
