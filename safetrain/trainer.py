"""`SafeTrainer`: a drop-in replacement for `model.fit` / `evaluate` / `predict` with one compiled step.

    history = SafeTrainer(model).fit(x, y, epochs=10, validation_data=(xv, yv), callbacks=[...])

The loop is short on purpose: read `fit` and you have the whole of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import inspect
import json
import random
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import tree
from keras.callbacks import CallbackList
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.backend.tensorflow.trainer import potentially_ragged_concat
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.utils.python_utils import pythonify_logs

from safetrain import checks
from safetrain import data as data_module
from safetrain import distributed
from safetrain import faults
from safetrain import hooks
from safetrain import memory
from safetrain.checkpoint import CheckpointMismatch
from safetrain.errors import ConfigurationError, OutOfMemory, OutOfMemoryWarning
from safetrain.policies import Policy, PolicyList
from safetrain.progress import ProgressBar
from safetrain.snapshot import Snapshot, check_rebuildable
from safetrain.snapshot import signature as snapshot_signature
from safetrain.steps import ChunkSizer, StepFunctions

__all__ = ["SafeTrainer"]

_BATCH_HOOKS = {
    "train": ("on_batch_begin", "on_batch_end", "on_train_batch_begin", "on_train_batch_end"),
    "test": ("on_test_batch_begin", "on_test_batch_end"),
    "predict": ("on_predict_batch_begin", "on_predict_batch_end"),
}


def _is_default(method) -> bool:
    return getattr(method, "_is_default", False)


def _needs_batch_hooks(callbacks: Iterable[keras.callbacks.Callback], kind: str) -> bool:
    """True when some callback overrides a per-batch hook of `kind` (then every step is reported)."""
    for cb in callbacks:
        if getattr(cb, "chunk_safe", False):
            continue
        if any(not _is_default(getattr(cb, hook)) for hook in _BATCH_HOOKS[kind]):
            return True
    return False


def _reject_unknown(kwargs: Mapping, method: Callable, what: str) -> None:
    if not kwargs:
        return
    known = [p for p in inspect.signature(method).parameters if p not in ("self", "kwargs")]
    parts = []
    for k in kwargs:
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"`{k}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise TypeError(f"{what}() got unknown keyword argument(s) {', '.join(parts)}; "
                    f"accepted: {', '.join(known)}.")


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer{' or None' if allow_none else ''}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _resolve_verbose(verbose) -> int:
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2, got {verbose!r}.")
    return int(verbose)


_TRAINERS_STARTED = 0


def _release_previous_models() -> None:
    """Free what models trained earlier in this process left behind, when a new trainer starts.

    Two things outlive a model trained in a loop (k-fold, hyperparameter search), measured per small model:
    - the model itself, for a while: Keras models are reference cycles, and with TensorFlow's ~300k
      long-lived objects Python's full collection runs rarely (7.8 MiB per fold in examples/kfold_loop.py
      without it). A full `gc.collect()` costs about 0.13 s, once per trainer after the first;
    - TensorFlow's eager kernel cache entries (about 0.7 MiB): they are keyed on op attributes that include
      each model's unique variable names. `clear_session` clears that cache too; it is only a cache.
    """
    global _TRAINERS_STARTED
    _TRAINERS_STARTED += 1
    if _TRAINERS_STARTED > 1:
        gc.collect()
    from tensorflow.python.eager import context

    ctx = context.context()
    if hasattr(ctx, "clear_kernel_cache"):
        ctx.clear_kernel_cache()


def _error_line(message: str) -> str:
    """The line of a TensorFlow error that says what went wrong (not its traceback or node names)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    skip = ("File ", "[[", "Detected at node", "Graph execution error", "Traceback (most recent", "[Op:")
    useful = [ln for ln in lines if not ln.startswith(skip) and "(most recent call last)" not in ln]
    line = useful[-1] if useful else (lines[0] if lines else "")
    return line.split("[[")[0].strip()


def _all_finite(logs) -> bool:
    """True when every float scalar in a step's outputs is finite (one device read per chunk)."""
    values = [v for v in tree.flatten(logs) if hasattr(v, "dtype") and v.dtype.is_floating and v.shape.rank == 0]
    return bool(np.all(np.isfinite([float(v) for v in values]))) if values else True


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _describe_mismatch(saved: Mapping | None, expected: Mapping) -> str:
    if not saved:
        return "The checkpoint has no model signature; it was not written by safetrain's Checkpoint."
    for group in ("layers", "model", "optimizer", "metrics"):
        a, b = saved.get(group, []), expected[group]
        if a != b:
            if len(a) != len(b):
                detail = f"{len(a)} entries in the checkpoint, {len(b)} in this model"
            else:
                i = next(i for i, (u, v) in enumerate(zip(a, b)) if u != v)
                detail = f"entry {i} is {a[i]} in the checkpoint, {b[i]} in this model"
            return (f"This checkpoint was written for another model: its {group} differ ({detail}). Point "
                    "Checkpoint at a new directory for a new model, or delete the old checkpoints.")
    return "This checkpoint was written for another model."


def _first_tensor(x):
    return next(t for t in tree.flatten(x) if t is not None)


def _check_model_strategy(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """A model whose variables exist already must have made them under `strategy`."""
    own = getattr(model, "_distribute_strategy", None)
    if own is not None and own is not strategy:
        raise ConfigurationError(f"`strategy`: the model was built under another strategy ({type(own).__name__}); "
                                 "pass that one, or a model factory, which SafeTrainer calls inside `strategy`.")
    if own is None and model.variables and strategy.num_replicas_in_sync > 1:
        raise ConfigurationError(f"`strategy`: the model's variables were made outside {type(strategy).__name__}'s "
                                 "scope. Build and compile it inside `with strategy.scope():`, or pass a factory "
                                 "(a function returning the compiled model), which SafeTrainer calls in the scope.")


def _worker_failures(method):
    """Run `method` so that, in a multi-worker run, a dead peer surfaces as `WorkerFailure`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with distributed.worker_failures(self.strategy):
            return method(self, *args, **kwargs)
    return wrapper


class SafeTrainer:
    """Train a Keras model with one compiled step per kind, memory telemetry and policies.

    Args:
        model: a `keras.Model`, or a zero-argument callable returning one (a factory; re-hydration can
            then rebuild models whose config does not round-trip).
        optimizer, loss, metrics: override the model's compiled ones (all three are optional when the
            model was compiled; an uncompiled model needs at least `optimizer` and `loss` to train).
        policies: `safetrain.Policy` instances, applied in the order given.
        strategy: a `tf.distribute.Strategy`; default: the one the model was built under, if any. A model
            (not a factory) passed with it must have been built inside its scope.
        steps_per_execution: steps per compiled call: an int as in Keras, or "auto" (the default): many
            steps per call when no callback needs per-batch hooks, one per call otherwise.
        jit_compile: compile the steps with XLA.
        memory_logs: add `rss_mb` (and `device_mb`, `device_peak_mb` on GPU) to every epoch's logs, so that
            History, CSVLogger and TensorBoard record them. `trainer.memory` is kept either way.
        custom_objects: classes and functions re-hydration needs to rebuild the model from its config (as
            for `keras.models.load_model`); the classes of the model's own layers are found automatically.
        microbatch_size: split every training batch into microbatches of this many samples and accumulate
            their gradients into one update (the same update, up to summation order, for losses averaged
            over the batch). None: whole batches.
        oom_recovery: when a training step runs out of memory (`tf.errors.ResourceExhaustedError`), drop
            it, retry that batch in microbatches, halving until it fits, and keep that size for the rest of
            the run (see `trainer.oom_events`).
        check_inputs: refuse NaN/Inf in float inputs: arrays are scanned before training (naming the first
            bad sample), other inputs are checked inside each step (naming the batch).

    Example:
        >>> model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        >>> history = SafeTrainer(model).fit(x, y, epochs=5, validation_split=0.2)
        >>> history.history["rss_mb"]          # resident memory after each epoch
        >>> trainer.trace_counts               # {'train': 1, 'test': 1, 'predict': 0}
    """

    def __init__(self, model: keras.Model | Callable[[], keras.Model], *, optimizer=None, loss=None,
                 metrics=None, policies: Sequence[Policy] = (), strategy: tf.distribute.Strategy | None = None,
                 steps_per_execution: int | str = "auto", jit_compile: bool = False,
                 memory_logs: bool = True, custom_objects: Mapping[str, Any] | None = None,
                 microbatch_size: int | None = None, oom_recovery: bool = True,
                 check_inputs: bool = False) -> None:
        if steps_per_execution != "auto":
            _check_int("steps_per_execution", steps_per_execution, 1)
        _check_int("microbatch_size", microbatch_size, 1, allow_none=True)
        if not isinstance(jit_compile, bool):
            raise TypeError(f"`jit_compile` must be a bool, got {jit_compile!r}.")
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"`strategy` must be a tf.distribute.Strategy or None, got {type(strategy).__name__}.")
        self.policies = PolicyList(policies)
        _release_previous_models()
        self._factory = None
        if isinstance(model, keras.Model):
            built = model
        elif callable(model) and not isinstance(model, keras.layers.Layer):
            self._factory = model
            built = self._call_factory(strategy)
        else:
            raise TypeError("`model` must be a keras.Model or a zero-argument callable returning one, "
                            f"got {type(model).__name__}.")
        self.model: keras.Model = built
        if isinstance(model, keras.Model) and strategy is not None:
            _check_model_strategy(model, strategy)
        self.strategy: tf.distribute.Strategy = strategy or built.distribute_strategy
        self.steps_per_execution = steps_per_execution
        self.jit_compile = jit_compile
        self.memory_logs = bool(memory_logs)
        self._overrides = {"optimizer": optimizer, "loss": loss, "metrics": metrics}
        self._configure()
        if getattr(built, "run_eagerly", False):
            warnings.warn("The model was compiled with run_eagerly=True; SafeTrainer always compiles its steps "
                          "(one trace each), so run_eagerly is ignored; to step through eagerly, use model.fit.",
                          UserWarning, stacklevel=2)
        self.custom_objects = dict(custom_objects or {})
        self.memory = memory.MemoryLog()
        self.steps = StepFunctions(self, self.strategy, jit_compile)
        self.is_chief = distributed.is_chief(self.strategy)  # False on every worker but one
        self.data_seed: int | None = None
        self.epoch = 0
        self.rehydrations = 0
        self.last_rehydration_seconds: float | None = None
        self._global_step = 0
        self._train_spec = None
        self._callbacks: CallbackList | None = None
        self._progress_bar: ProgressBar | None = None
        self._train_batches: data_module.Batches | None = None
        self._train_epochs: data_module.EpochIterator | None = None
        self._pending_resume: dict | None = None
        self.oom_recovery = bool(oom_recovery)
        self.check_inputs = bool(check_inputs)
        self.oom_events: list[dict] = []
        self.microbatch_size: int | None = None
        self._micro_var: tf.Variable | None = None
        self._simulated_oom_above: int | None = None
        if microbatch_size is not None:
            self._set_microbatch(int(microbatch_size))
        self._rebuildable_checked = False

    # -- model and compile configuration -------------------------------------------------------------
    def _call_factory(self, strategy=None) -> keras.Model:
        if strategy is not None:
            with strategy.scope():
                built = self._factory()
        else:
            built = self._factory()
        if not isinstance(built, keras.Model):
            raise TypeError(f"The model factory {getattr(self._factory, '__name__', self._factory)!r} must "
                            f"return a keras.Model, but returned {type(built).__name__}.")
        return built

    def _configure(self) -> None:
        """Compile the model with the trainer's overrides merged over its own compile arguments."""
        model = self.model
        o = self._overrides
        if all(v is None for v in o.values()):
            return
        previous = getattr(model, "_compile_config", None)
        previous = dict(previous.config) if previous is not None and model.compiled else {}
        optimizer = o["optimizer"] if o["optimizer"] is not None else (
            model.optimizer if model.compiled else None)
        if optimizer is None:
            raise ConfigurationError("SafeTrainer needs an optimizer: the model was not compiled with one "
                                     "and no `optimizer=` was given.")
        kwargs = {k: previous[k] for k in ("loss_weights", "weighted_metrics") if previous.get(k) is not None}
        loss = o["loss"] if o["loss"] is not None else previous.get("loss")
        metrics = o["metrics"] if o["metrics"] is not None else previous.get("metrics")
        with self.strategy.scope():
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=False, **kwargs)

    def _has_custom(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(SafeTrainer, name) or \
            getattr(type(self.model), name) is not getattr(TensorFlowTrainer, name)

    def _require_training_config(self, what: str) -> None:
        model = self.model
        missing = []
        if not model.compiled or model.optimizer is None:
            if what == "fit":
                missing.append("an optimizer (`optimizer=`)")
        if what in ("fit", "evaluate") and not self._has_custom("train_step" if what == "fit" else "test_step") \
                and not self._has_custom("compute_loss") and getattr(model, "_compile_loss", None) is None:
            missing.append("a loss (`loss=`)")
        if missing:
            raise ConfigurationError(f"SafeTrainer.{what}() needs {' and '.join(missing)}: compile the model "
                                     f"or pass them to SafeTrainer(model, ...).")

    def step_method(self, kind: str) -> Callable:
        """The Python step to compile for `kind`: the trainer's override, else the model's, else ours."""
        name = f"{kind}_step"
        if kind == "train" and self.microbatch_size is not None:
            if self._has_custom("train_step"):
                raise ConfigurationError("microbatching (microbatch_size=, or recovery from running out of memory) "
                                         "needs SafeTrainer's own train_step; this model or trainer overrides it.")
            return self._train_step_microbatched
        if getattr(type(self), name) is not getattr(SafeTrainer, name):
            return getattr(self, name)
        if getattr(type(self.model), name) is not getattr(TensorFlowTrainer, name):
            return getattr(self.model, name)
        return getattr(self, name)

    def _build(self, spec, training: bool = True) -> None:
        """Create every variable eagerly (model, metrics, loss trackers, optimizer) before the first trace.

        An optimizer built inside a trace leaves functions alive after its model is gone. `predict` only
        needs the model's own variables (its data has no targets to build metrics from).
        """
        model = self.model
        spec = tree.map_structure(lambda s: None if isinstance(s, tf.OptionalSpec) else s, spec)
        with self.strategy.scope():
            if training and model.compiled:
                model._symbolic_build(data_batch=spec)
                if model.optimizer is not None and not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
            elif not model.built:
                x, _, _ = keras.utils.unpack_x_y_sample_weight(spec)
                symbolic = tree.map_structure(
                    lambda s: None if s is None else keras.KerasTensor(s.shape, s.dtype.name), x)
                keras.src.backend.compute_output_spec(model, symbolic, training=False)

    # -- Keras-compatible surface for custom steps (code written for a Model moves over unchanged) ----
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def optimizer(self):
        return self.model.optimizer

    @property
    def metrics(self) -> list:
        return self.model.metrics

    @property
    def trainable_variables(self) -> list:
        return self.model.trainable_variables

    @property
    def trainable_weights(self) -> list:
        return self.model.trainable_weights

    @property
    def losses(self) -> list:
        return self.model.losses

    def get_metrics_result(self) -> dict:
        return self.model.get_metrics_result()

    @property
    def trace_counts(self) -> dict[str, int]:
        """How often each step was traced: `{"train": n, "test": n, "predict": n}`."""
        return dict(self.steps.trace_counts)

    # -- actions policies ask for ---------------------------------------------------------------------
    def _counters(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self._global_step, "data_seed": self.data_seed,
                "microbatch_size": self.microbatch_size}

    def _set_counters(self, counters: Mapping[str, Any]) -> None:
        self.epoch = counters["epoch"]
        self._global_step = counters["global_step"]
        self.data_seed = counters["data_seed"]
        if counters.get("microbatch_size") and counters["microbatch_size"] != self.microbatch_size:
            self._set_microbatch(int(counters["microbatch_size"]))
        if self._train_batches is not None and self.data_seed is not None:
            self._train_batches.seed = self.data_seed

    def training_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything a checkpoint holds: every variable value (as arrays) and, as JSON-able metadata, the
        counters, the data position, the History so far and the model's signature."""
        snapshot = Snapshot.take(self, structure=False)
        history = self._callbacks._history if self._callbacks is not None else None
        meta = {
            "counters": snapshot.counters,
            "position": self._train_epochs.position if self._train_epochs is not None else None,
            "history": None if history is None else {"epoch": list(getattr(history, "epoch", [])),
                                                     "history": {k: list(v) for k, v in history.history.items()}},
            "signature": snapshot_signature(self.model),
        }
        return snapshot.arrays(), json.loads(json.dumps(meta, default=_jsonable))

    def resume(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Load a checkpoint's state into this trainer; the running (or next) `fit` continues from its position.

        Raises `CheckpointMismatch` when the checkpoint was written for another model.
        """
        expected = json.loads(json.dumps(snapshot_signature(self.model)))
        saved = meta.get("signature")
        if saved != expected:
            raise CheckpointMismatch(_describe_mismatch(saved, expected))
        Snapshot.from_arrays(dict(arrays), dict(meta["counters"])).restore_values(self)
        self._pending_resume = dict(meta)

    def check_rehydratable(self) -> None:
        """Raise `ConfigurationError` now (before training) if `rehydrate()` could not rebuild the model."""
        if not self._rebuildable_checked:
            check_rebuildable(self)
            self._rebuildable_checked = True

    def rehydrate(self) -> Snapshot:
        """Clear the Keras session without losing the run: snapshot, clear, rebuild, restore, recompile.

        Every model, optimizer and metric variable, Keras's global seed state and the trainer's counters
        come back, so training continues exactly as if nothing happened; callbacks are re-pointed to the
        new model (EarlyStopping, ModelCheckpoint, ... keep their own state). Layers' `release_memory`
        hooks run before the session is cleared and `after_rehydrate` hooks after the restore.

        Example:
            >>> trainer.fit(x, y, epochs=3)
            >>> trainer.rehydrate()     # trainer.model is a new object in exactly the same state
            >>> trainer.fit(x, y, epochs=6, initial_epoch=3)
        """
        self.check_rehydratable()
        t0 = time.perf_counter()
        snapshot = Snapshot.take(self)
        hooks.release_memory(self.model)
        stop_training = bool(getattr(self.model, "stop_training", False))
        self.steps.reset()
        self.model = None
        keras.backend.clear_session()
        model = snapshot.restore(self)
        model.stop_training = stop_training
        if self._callbacks is not None:
            self._callbacks.set_model(model)
        if self._progress_bar is not None:
            self._progress_bar.set_model(model)
        gc.collect()  # the old model is unreachable only now that callbacks point at the new one
        self.rehydrations += 1
        self.last_rehydration_seconds = time.perf_counter() - t0
        return snapshot

    def reset_states(self) -> int:
        """Reset every stateful layer (stateful RNNs, layers with a `reset_state` hook); returns how many."""
        return hooks.reset_states(self.model)

    def release_memory(self) -> int:
        """Ask every layer with a `release_memory` hook to drop its caches; returns how many were asked."""
        return hooks.release_memory(self.model)

    # -- the overridable steps -------------------------------------------------------------------------
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training: bool = True):
        """Total loss of a batch (compiled loss + `model.losses`); override for a custom objective."""
        model = self.model
        if hasattr(model, "_compute_loss"):
            return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)

    def compute_metrics(self, x, y, y_pred, sample_weight=None) -> dict:
        """Update the compiled metrics and return every metric's result (`model.compute_metrics`)."""
        return self.model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _track_loss(self, loss, x) -> None:
        tracker = getattr(self.model, "_loss_tracker", None)
        if tracker is not None:
            tracker.update_state(unscale_loss_for_distribution(loss),
                                 sample_weight=tf.shape(_first_tensor(x))[0])

    def _forward(self, x, training: bool):
        model = self.model
        if getattr(model, "_call_has_training_arg", True):
            return model(x, training=training)
        return model(x)

    def train_step(self, data) -> dict:
        """One optimizer step on one batch; returns the logs. Same computation as Keras's `train_step`."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self._forward(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            loss = self._fault_point(loss, tf.shape(_first_tensor(x))[0])
            scaled = model.optimizer.scale_loss(loss) if model.optimizer is not None else loss
        trainable = model.trainable_weights
        gradients = tape.gradient(scaled, trainable) if trainable else []
        # Every state change waits for the whole forward and backward pass (TensorFlow orders stateful ops
        # only per variable, so `iterations += 1` could otherwise run first): a step that fails part-way,
        # e.g. out of memory, leaves nothing to undo. Keras tracks the loss before the gradient; same values.
        with tf.control_dependencies([g for g in gradients if g is not None] + [loss]):
            if trainable:
                model.optimizer.apply_gradients(zip(gradients, trainable))
            else:
                warnings.warn("The model does not have any trainable weights.")
            self._track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _fault_point(self, loss, size):
        if self._simulated_oom_above is None:
            return loss
        # Multiplied, not added: the gradients then depend on the check, so it runs before any update.
        return loss * (1.0 + tf.cast(faults.check(size, self._simulated_oom_above), loss.dtype))

    def _set_microbatch(self, size: int) -> None:
        """Use microbatches of `size` samples from the next step on (the first time: rebuild the train step)."""
        if self._micro_var is None:
            self._micro_var = tf.Variable(size, dtype=tf.int32, trainable=False, name="safetrain_microbatch")
        else:
            self._micro_var.assign(size)
        if self.microbatch_size is None:
            self.steps.reset_kind("train")
        self.microbatch_size = size

    def _train_step_microbatched(self, data) -> dict:
        """`train_step` on microbatches: gradients of each slice, weighted by its share of the batch, summed
        into one optimizer update; metrics then see the whole batch, as in the one-piece step."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = tf.shape(_first_tensor(x))[0]
        size = tf.minimum(self._micro_var.read_value(), batch)
        count = (batch + size - 1) // size
        trainable = model.trainable_weights

        def piece(i):
            start = i * size
            length = tf.minimum(size, batch - start)
            cut = lambda t: None if t is None else t[start:start + length]  # noqa: E731
            xs, ys, sws = (tree.map_structure(cut, v) if v is not None else None for v in (x, y, sample_weight))
            with tf.GradientTape() as tape:
                y_pred = self._forward(xs, training=True)
                loss = self.compute_loss(x=xs, y=ys, y_pred=y_pred, sample_weight=sws, training=True)
                loss = self._fault_point(loss, length)
                share = loss * tf.cast(length, loss.dtype) / tf.cast(batch, loss.dtype)
                scaled = model.optimizer.scale_loss(share)
            return share, tape.gradient(scaled, trainable), y_pred

        loss, grads, y_pred = piece(tf.constant(0))
        connected = [g is not None for g in grads]
        arrays = tree.map_structure(
            lambda t: tf.TensorArray(t.dtype, size=count, infer_shape=False, element_shape=[None] + t.shape[1:])
            .write(0, t), y_pred)

        def body(i, loss, grads, arrays):
            share, g, y_pred = piece(i)
            grads = [a + b for a, b in zip(grads, (gi for gi, c in zip(g, connected) if c))]
            arrays = tree.map_structure(lambda a, t: a.write(i, t), arrays, y_pred)
            return i + 1, loss + share, grads, arrays

        _, loss, summed, arrays = tf.while_loop(
            lambda i, *_: i < count, body, (tf.constant(1), loss, [g for g in grads if g is not None], arrays))
        summed = list(summed)
        y_pred = tree.map_structure(lambda a, t: tf.ensure_shape(a.concat(), [None] + t.shape[1:]), arrays, y_pred)
        with tf.control_dependencies(summed + [loss]):  # as in train_step: no state changes before this
            parts = iter(summed)
            model.optimizer.apply_gradients(zip([next(parts) if c else None for c in connected], trainable))
            self._track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _recover_from_oom(self, epochs: data_module.EpochIterator, iterations_before: int, error) -> tuple:
        """A chunk ran out of memory: keep the steps it completed, retry the failed batch in halving
        microbatches, keep the size that fits. Returns `(steps, outputs)` as a chunk would."""
        if self._has_custom("train_step") and self.microbatch_size is None:
            raise OutOfMemory("A training step ran out of memory, and it cannot be split into microbatches "
                              "because the model or trainer overrides train_step; use a smaller batch_size.") \
                from error
        completed = self._iterations() - iterations_before
        epochs.advance(completed, completed)
        epochs.reposition()  # the failed batch is next again
        batch = epochs.iterator.get_next()
        size = int(tf.shape(_first_tensor(keras.utils.unpack_x_y_sample_weight(batch)[0]))[0])
        old = self.microbatch_size or size
        step = epochs.steps_done
        new = min(old, size) // 2
        while True:
            if new < 1:
                raise OutOfMemory(f"Out of memory at epoch index {self.epoch}, batch {step}, even with microbatches "
                                  f"of 1 sample (batch of {size}); the model does not fit.") from error
            self._set_microbatch(new)
            try:
                outputs = self.steps.run_step("train", batch, epochs.element_spec)
                break
            except tf.errors.ResourceExhaustedError:
                new //= 2
        event = {"epoch": self.epoch, "step": step, "global_step": self._global_step + completed + 1,
                 "batch_size": size, "old_microbatch_size": old, "new_microbatch_size": new}
        self.oom_events.append(event)
        warnings.warn(f"Out of memory at epoch index {self.epoch}, batch {step} (a batch of {size}): retried in "
                      f"microbatches of {new} (was {old}); keeping that size for the rest of the run.",
                      OutOfMemoryWarning, stacklevel=3)
        epochs.advance(1, 1)
        return completed + 1, outputs

    def test_step(self, data) -> dict:
        """Loss and metrics of one batch, without training."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self._forward(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        self._track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, data):
        """The model's outputs for one batch."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._forward(x, training=False)

    # -- loops ---------------------------------------------------------------------------------------
    def _batches(self, x, y, sample_weight, *, batch_size, shuffle, class_weight=None, steps=None, what):
        if self.data_seed is None:
            # Drawn from Python's RNG, so `keras.utils.set_random_seed` makes the shuffle order reproducible.
            self.data_seed = random.randrange(2**31)
        return data_module.as_batches(x, y, sample_weight, batch_size=batch_size, shuffle=shuffle,
                                      class_weight=class_weight, steps=steps, seed=self.data_seed, what=what)

    def _run(self, kind: str, epochs: data_module.EpochIterator, callbacks: CallbackList, batch_hooks: bool,
             chunks: ChunkSizer, progress: ProgressBar | None, on_output: Callable | None = None):
        """Run one epoch of `kind` (or one evaluation / prediction pass); returns the last step's logs.

        `self.model` is read afresh after every call: a policy may have re-hydrated it.
        """
        begin_hook = getattr(callbacks, f"on_{kind}_batch_begin")
        end_hook = getattr(callbacks, f"on_{kind}_batch_end")
        batch_policies = kind == "train" and self.policies.wants_batches
        watch_nonfinite = kind == "train" and self.steps.stop_on_nonfinite
        counting = kind == "train" and getattr(self.model, "optimizer", None) is not None
        recover = counting and self.oom_recovery
        logs = None
        while True:
            remaining = epochs.remaining()
            if remaining == 0:
                break
            step = epochs.steps_done
            boundary = self.policies.steps_to_next_batch_hook(self._global_step) if batch_policies else None
            n = chunks.next(remaining, boundary)
            n = min(n, self.steps.chunk_limit(kind, epochs.element_spec, remaining is not None) or n)
            if batch_hooks:
                begin_hook(step)
            t0 = time.perf_counter()
            before = self._iterations() if counting else None
            try:
                ran, outputs = self.steps.run(kind, epochs.iterator, n, epochs.element_spec,
                                              exact=remaining is not None)
            except tf.errors.ResourceExhaustedError as error:
                if not recover:
                    raise
                ran, outputs = self._recover_from_oom(epochs, before, error)
                n, nonfinite = ran, watch_nonfinite and not _all_finite(outputs)
            except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.FailedPreconditionError,
                    tf.errors.CancelledError) as error:
                if isinstance(error, distributed.COLLECTIVE_ERRORS) and distributed.is_multi_worker(self.strategy):
                    raise  # a peer failed, not this data: `fit` reports it as WorkerFailure
                raise self._step_error(kind, epochs, before, n, error) from error
            else:
                chunks.observe(ran, n, time.perf_counter() - t0)
                # A chunk cut short by a non-finite loss did not run out of data.
                nonfinite = watch_nonfinite and ran > 0 and not _all_finite(outputs)
                epochs.advance(ran, ran if nonfinite else n)
            if ran:
                last = step + ran - 1
                if kind == "predict":
                    on_output(outputs)
                    if batch_hooks:
                        end_hook(last, {"outputs": outputs})
                else:
                    logs = outputs
                    if batch_hooks:
                        end_hook(last, logs)
                if progress is not None:
                    getattr(progress, f"on_{kind}_batch_end")(last, logs)
                if kind == "train":
                    self._global_step += ran
                    if nonfinite:
                        self.policies.on_nonfinite_loss(self, self.epoch, last, pythonify_logs(logs))
                        break
                    if batch_policies:
                        self.policies.on_batch_end(self, self._global_step)
            if ran < n:
                break
            if kind == "train" and self.model.stop_training:
                break
            if kind == "test" and getattr(self.model, "stop_evaluating", False):
                break
            if kind == "predict" and getattr(self.model, "stop_predicting", False):
                break
        return logs

    def _iterations(self) -> int:
        # `.numpy()`: under a distribution strategy the variable is a MirroredVariable, which int() refuses.
        return int(self.model.optimizer.iterations.numpy())

    def _check_data(self, batches: data_module.Batches, x, y, sample_weight, what: str) -> None:
        """Refuse, before any step, data that does not fit the model (see `safetrain.checks`)."""
        x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(batches.element_spec)
        checks.check_against_model(self.model, x_spec, what)
        if batches.kind == "arrays":
            checks.check_sparse_labels(self.model, y, what)
            if self.check_inputs:
                checks.check_finite_arrays({"x": x, "y": y, "sample_weight": sample_weight}, what,
                                           batches.batch_size if not batches.shuffle else None)

    def _step_error(self, kind: str, epochs: data_module.EpochIterator, iterations_before: int | None,
                    n: int, error: Exception) -> Exception:
        """A step failed on its data: say where (epoch, batch) and why, keeping the original as the cause."""
        start = epochs.steps_done
        if kind == "train" and iterations_before is not None:
            where = f"batch {start + self._iterations() - iterations_before}"
        else:
            where = f"batch {start}" if n == 1 else f"batches {start}-{start + n - 1}"
        cause = _error_line(str(getattr(error, "message", error))) or type(error).__name__
        what = {"train": "fit", "test": "evaluate", "predict": "predict"}[kind]
        epoch = f"epoch index {self.epoch}, " if kind == "train" else ""
        return checks.DataError(f"{what}: {epoch}{where} failed: {cause}")

    def _metrics_or_logs(self, logs) -> dict:
        """Epoch logs: the model's metric results when the step returned them (as Keras does), else the
        last step's logs (custom steps returning other keys)."""
        metric_logs = self.model.get_metrics_result()
        if isinstance(logs, dict) and set(logs) == set(metric_logs):
            return metric_logs
        return logs if logs is not None else {}

    @_worker_failures
    def fit(self, x=None, y=None, batch_size: int | None = None, epochs: int = 1, verbose: int | str = "auto",
            callbacks: Sequence[keras.callbacks.Callback] | None = None, validation_split: float = 0.0,
            validation_data=None, shuffle: bool | str = True, class_weight: dict | None = None,
            sample_weight=None, initial_epoch: int = 0, steps_per_epoch: int | None = None,
            validation_steps: int | None = None, validation_batch_size: int | None = None,
            validation_freq: int | Sequence[int] = 1, **kwargs) -> keras.callbacks.History:
        """Train for `epochs` epochs, with the arguments and semantics of `keras.Model.fit`.

        Returns the `keras.callbacks.History`; every epoch's logs also carry `rss_mb` (and `device_mb`,
        `device_peak_mb` on GPU). Bad arguments raise `ValueError`/`TypeError` before any step runs.

        Example:
            >>> history = SafeTrainer(model).fit(x, y, batch_size=64, epochs=10, validation_split=0.1,
            ...                                  callbacks=[keras.callbacks.EarlyStopping(patience=2)])
        """
        _reject_unknown(kwargs, self.fit, "fit")
        _check_int("epochs", epochs, 0)
        _check_int("initial_epoch", initial_epoch, 0)
        if epochs < initial_epoch:
            raise ValueError(f"`epochs` ({epochs}) must be >= `initial_epoch` ({initial_epoch}): `epochs` is "
                             "the index of the last epoch, not a count of epochs to add.")
        _check_int("steps_per_epoch", steps_per_epoch, 1, allow_none=True)
        _check_int("validation_steps", validation_steps, 1, allow_none=True)
        _check_int("validation_batch_size", validation_batch_size, 1, allow_none=True)
        if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
            _check_int("validation_freq", validation_freq, 1)
        elif not (isinstance(validation_freq, (list, tuple)) and all(isinstance(v, int) for v in validation_freq)):
            raise TypeError(f"`validation_freq` must be an int or a list of epoch numbers, got {validation_freq!r}.")
        verbose = _resolve_verbose(verbose)
        self._require_training_config("fit")
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = data_module.split_validation(x, y, sample_weight,
                                                                                 validation_split)
        train = self._batches(x, y, sample_weight, batch_size=batch_size, shuffle=shuffle,
                              class_weight=class_weight, steps=steps_per_epoch, what="fit")
        self._check_data(train, x, y, sample_weight, "fit")
        val = None
        if validation_data is not None:
            vx, vy, vsw = data_module.unpack_validation_data(validation_data)
            val = data_module.as_batches(vx, vy, vsw, batch_size=validation_batch_size or (
                batch_size if data_module.kind_of(vx) == "arrays" else None), shuffle=False,
                steps=validation_steps, what="fit (validation_data)")
            self._check_data(val, vx, vy, vsw, "fit (validation_data)")
        self._build(train.element_spec)
        self._train_spec = train.element_spec
        self._train_batches = train
        return self._fit_loop(train, val, epochs=epochs, initial_epoch=initial_epoch, verbose=verbose,
                              callbacks=callbacks, steps_per_epoch=steps_per_epoch,
                              validation_steps=validation_steps, validation_freq=validation_freq)

    def _fit_loop(self, train, val, *, epochs, initial_epoch, verbose, callbacks, steps_per_epoch,
                  validation_steps, validation_freq) -> keras.callbacks.History:
        train_epochs = self._train_epochs = data_module.EpochIterator(train, steps_per_epoch, self.strategy)
        callbacks, cleanup = distributed.callbacks_for_worker(self.strategy, callbacks)
        callbacks = CallbackList(callbacks, add_history=True, add_progbar=False, verbose=verbose,
                                 epochs=epochs, steps=steps_per_epoch or train.num_batches, model=self.model)
        progress = self._progress(verbose, callbacks.params)
        hooks_needed = _needs_batch_hooks(callbacks.callbacks, "train")
        chunks = self._chunk_sizer(hooks_needed)
        test_hooks = _needs_batch_hooks(callbacks.callbacks, "test")
        test_chunks = self._chunk_sizer(test_hooks)
        self.model.stop_training = False
        self.epochs_target = epochs
        self._callbacks, self._progress_bar = callbacks, progress
        training_logs = None
        try:
            callbacks.on_train_begin()
            if progress is not None:
                progress.on_train_begin()
            self.policies.on_train_begin(self)
            initial_epoch = self.model._initial_epoch or initial_epoch
            position = None
            if self._pending_resume is not None:  # a policy loaded a checkpoint: continue where it was
                resumed, self._pending_resume = self._pending_resume, None
                initial_epoch, position = self.epoch, resumed.get("position")
                self._restore_history(callbacks, resumed.get("history"))
            for epoch in range(initial_epoch, epochs):
                self.epoch = epoch
                mid_epoch = position is not None and position["epoch_steps"] > 0
                if not mid_epoch:  # a resumed half epoch keeps its restored metric state
                    self.model.reset_metrics()
                callbacks.on_epoch_begin(epoch)
                if progress is not None:
                    progress.on_epoch_begin(epoch)
                self.policies.on_epoch_begin(self, epoch)
                if position is not None and position["pass_batches"] > 0:
                    train_epochs.resume(epoch, position)
                else:
                    train_epochs.start(epoch)
                position = None
                logs = self._run("train", train_epochs, callbacks, hooks_needed, chunks, progress)
                steps_done = train_epochs.steps_done
                train_epochs.finish()
                if steps_done == 0 and epoch == initial_epoch and train_epochs.num_batches in (None, 0):
                    raise ValueError("fit: `x` yielded no batches; there is nothing to train on.")
                epoch_logs = dict(self._metrics_or_logs(logs))
                if val is not None and self._should_eval(epoch, validation_freq):
                    val_logs = self._test_pass(val, validation_steps, callbacks, test_hooks, test_chunks, None)
                    epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
                epoch_logs = pythonify_logs(epoch_logs)
                if self.microbatch_size is not None:
                    epoch_logs["microbatch_size"] = self.microbatch_size
                sample = self.sample_memory(epoch)
                self.memory.append(sample)
                if self.memory_logs:
                    epoch_logs.update(sample.as_logs())
                callbacks.on_epoch_end(epoch, epoch_logs)
                if progress is not None:
                    progress.on_epoch_end(epoch, epoch_logs)
                self.epoch = epoch + 1  # a snapshot taken now resumes at the next epoch
                self.policies.on_epoch_end(self, epoch, epoch_logs, sample)
                training_logs = epoch_logs
                if self.model.stop_training:
                    break
            if isinstance(self.model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
                self.model.optimizer.finalize_variable_values(self.model.trainable_weights)
            self.policies.on_train_end(self)
            callbacks.on_train_end(logs=training_logs)
        finally:
            if progress is not None:
                progress.on_train_end()
            self._callbacks = self._progress_bar = self._train_epochs = None
            cleanup()
        return self.model.history

    @staticmethod
    def _restore_history(callbacks: CallbackList, saved: Mapping | None) -> None:
        history = callbacks._history
        if saved is None or history is None:
            return
        history.epoch = list(saved["epoch"])
        history.history = {k: list(v) for k, v in saved["history"].items()}

    def _chunk_sizer(self, hooks_needed: bool) -> ChunkSizer:
        if hooks_needed and self.steps_per_execution == "auto":
            return ChunkSizer(1)
        agree = None
        if distributed.is_multi_worker(self.strategy):  # every worker must run the same chunks
            agree = functools.partial(distributed.min_across_workers, self.strategy)
        return ChunkSizer(self.steps_per_execution, agree=agree)

    def sample_memory(self, epoch: int | None = None) -> memory.MemorySample:
        """Read memory now; in a multi-worker run `rss_mb` is the largest over all workers (a collective:
        every worker calls it at the same point, which the trainer and policies do).

        Example:
            >>> trainer.sample_memory().rss_mb
            412.5
        """
        sample = memory.sample(epoch, self.trace_counts)
        if distributed.is_multi_worker(self.strategy):
            per_worker = distributed.per_worker_values(self.strategy, sample.rss_mb)
            sample = dataclasses.replace(sample, rss_mb=max(per_worker), worker_rss_mb=tuple(per_worker))
        return sample

    @staticmethod
    def _should_eval(epoch: int, validation_freq) -> bool:
        if isinstance(validation_freq, int):
            return (epoch + 1) % validation_freq == 0
        return (epoch + 1) in validation_freq

    def _progress(self, verbose: int, params: Mapping) -> ProgressBar | None:
        if not verbose or not self.is_chief:  # one progress bar per run, the chief's
            return None
        bar = ProgressBar(verbose)
        bar.set_params(dict(params))
        bar.set_model(self.model)
        return bar

    def _test_pass(self, batches, steps, callbacks, batch_hooks, chunks, progress) -> dict:
        self.model.reset_metrics()
        self.model.stop_evaluating = False
        callbacks.on_test_begin()
        if progress is not None:
            progress.on_test_begin()
        epochs = data_module.EpochIterator(batches, steps, self.strategy)
        epochs.start(0)
        try:
            logs = self._run("test", epochs, callbacks, batch_hooks, chunks, progress)
        finally:
            epochs.finish()
        logs = pythonify_logs(self._metrics_or_logs(logs))
        callbacks.on_test_end(logs)
        if progress is not None:
            progress.on_test_end(logs)
        return logs

    @_worker_failures
    def evaluate(self, x=None, y=None, batch_size: int | None = None, verbose: int | str = "auto",
                 sample_weight=None, steps: int | None = None, callbacks=None, return_dict: bool = False,
                 **kwargs):
        """Loss and metrics on data, with the arguments and return value of `keras.Model.evaluate`.

        Example:
            >>> loss, mae = trainer.evaluate(x_test, y_test)
            >>> trainer.evaluate(test_ds, return_dict=True)
            {'loss': 0.12, 'mae': 0.27}
        """
        _reject_unknown(kwargs, self.evaluate, "evaluate")
        _check_int("steps", steps, 1, allow_none=True)
        verbose = _resolve_verbose(verbose)
        self._require_training_config("evaluate")
        batches = data_module.as_batches(x, y, sample_weight, batch_size=batch_size, shuffle=False,
                                         steps=steps, what="evaluate")
        self._check_data(batches, x, y, sample_weight, "evaluate")
        self._build(batches.element_spec)
        callbacks = CallbackList(callbacks, add_progbar=False, verbose=verbose, epochs=1,
                                 steps=steps or batches.num_batches, model=self.model)
        batch_hooks = _needs_batch_hooks(callbacks.callbacks, "test")
        chunks = self._chunk_sizer(batch_hooks)
        progress = self._progress(verbose, callbacks.params)
        logs = self._test_pass(batches, steps, callbacks, batch_hooks, chunks, progress)
        if return_dict:
            return logs
        return self.model._flatten_metrics_in_order(logs)

    @_worker_failures
    def predict(self, x, batch_size: int | None = None, verbose: int | str = "auto", steps: int | None = None,
                callbacks=None, **kwargs):
        """The model's outputs on `x` as NumPy arrays (same structure as the model's outputs).

        Outputs are gathered on device per chunk of batches and copied once per chunk, so memory holds
        the result and no per-batch objects.

        Example:
            >>> probs = trainer.predict(x_test, batch_size=256)
        """
        _reject_unknown(kwargs, self.predict, "predict")
        _check_int("steps", steps, 1, allow_none=True)
        verbose = _resolve_verbose(verbose)
        batches = data_module.as_batches(x, None, None, batch_size=batch_size, shuffle=False, steps=steps,
                                         what="predict")
        self._build(batches.element_spec, training=False)
        callbacks = CallbackList(callbacks, add_progbar=False, verbose=verbose, epochs=1,
                                 steps=steps or batches.num_batches, model=self.model)
        batch_hooks = _needs_batch_hooks(callbacks.callbacks, "predict")
        chunks = self._chunk_sizer(batch_hooks)
        progress = self._progress(verbose, callbacks.params)
        pieces: list = []

        def keep(outputs):
            pieces.append(tree.map_structure(
                lambda t: t if isinstance(t, (tf.RaggedTensor, tf.SparseTensor)) else t.numpy(), outputs))

        self.model.stop_predicting = False
        callbacks.on_predict_begin()
        if progress is not None:
            progress.on_predict_begin()
        epochs = data_module.EpochIterator(batches, steps, self.strategy)
        epochs.start(0)
        try:
            self._run("predict", epochs, callbacks, batch_hooks, chunks, progress, on_output=keep)
        finally:
            epochs.finish()
        callbacks.on_predict_end()
        if progress is not None:
            progress.on_predict_end()
        if not pieces:
            raise ValueError("predict: `x` yielded no batches.")
        return tree.map_structure_up_to(pieces[0], lambda *parts: _concat(list(parts)), *pieces)


def _concat(parts: list):
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
            return np.concatenate(parts, axis=0)
        out = potentially_ragged_concat([tf.convert_to_tensor(p) for p in parts])
        return out.numpy() if hasattr(out, "numpy") and not isinstance(out, tf.RaggedTensor) else out
    return potentially_ragged_concat([tf.convert_to_tensor(p) if isinstance(p, np.ndarray) else p for p in parts])
