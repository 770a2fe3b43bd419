"""`SafeTrainer`: a drop-in replacement for `model.fit` / `evaluate` / `predict` with one compiled step.

    history = SafeTrainer(model).fit(x, y, epochs=10, validation_data=(xv, yv), callbacks=[...])

This module is the public surface: arguments are checked here, before any step; the Keras-facing step
methods (`train_step`, `test_step`, `predict_step`, `compute_loss`) live here, so a custom `train_step`
written for a `keras.Model` moves over unchanged; and so do the actions policies call (`rehydrate`,
`stop`, `restart`, `save_checkpoint`, `load_checkpoint`, `watch_nonfinite`). The loop is in `loop.py`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras.callbacks import CallbackList

from safetrain import _compat, distributed, memory, reclaim
from safetrain import data as data_module
from safetrain import plan as plan_module
from safetrain.actions import TrainerActions
from safetrain.checks import check_data, check_fit_arguments, check_int, reject_unknown, resolve_verbose
from safetrain.errors import ConfigurationError
from safetrain.loop import Loop
from safetrain.microbatch import Microbatches
from safetrain.on_batch import OnBatch
from safetrain.policies import Policy, PolicyList
from safetrain.state import TrainingProgress
from safetrain.steps import Steps
from safetrain.surface import StepSurface

__all__ = ["SafeTrainer"]


def _limit_epochs(epochs: int) -> int:
    """`keras.config.set_max_epochs` caps every fit's epochs, as in `model.fit`."""
    read = getattr(keras.config, "max_epochs", None)  # Keras 3.9+
    limit = read() if read is not None else None
    if limit and limit < epochs:
        warnings.warn(f"Limiting epochs to {limit}", stacklevel=3)
        return int(limit)
    return epochs


def _limit_steps(steps: int | None) -> int | None:
    """`keras.config.set_max_steps_per_epoch` caps the steps of every pass, as in Keras's epoch iterator."""
    read = getattr(keras.config, "max_steps_per_epoch", None)  # Keras 3.9+
    limit = read() if read is not None else None
    if limit and (not steps or limit < steps):
        warnings.warn(f"Limiting steps_per_epoch to {limit}", stacklevel=3)
        return int(limit)
    return steps


def _compile_with_overrides(model: keras.Model, strategy, optimizer, loss, metrics, jit_compile) -> None:
    """Compile the model with the trainer's `optimizer`/`loss`/`metrics` merged over its own compile arguments."""
    previous = _compat.compile_config(model)
    optimizer = optimizer if optimizer is not None else (model.optimizer if model.compiled else None)
    if optimizer is None:
        raise ConfigurationError(
            "SafeTrainer needs an optimizer: the model was not compiled with one and no `optimizer=` was given."
        )
    kwargs = {k: previous[k] for k in ("loss_weights", "weighted_metrics") if previous.get(k) is not None}
    loss = loss if loss is not None else previous.get("loss")
    metrics = metrics if metrics is not None else previous.get("metrics")
    with strategy.scope():
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile, **kwargs)


class SafeTrainer(StepSurface, TrainerActions, OnBatch):
    """Train a Keras model with one compiled step per kind, memory telemetry and policies.

    Args:
        model: a `keras.Model` (or any Keras layer that is also a Keras trainer, as `model.fit` accepts),
            or a zero-argument callable returning one (a factory; re-hydration can then rebuild models whose
            config does not round-trip).
        optimizer, loss, metrics: override the model's compiled ones (all three are optional when the
            model was compiled; an uncompiled model needs at least `optimizer` and `loss` to train).
        policies: `safetrain.Policy` instances, applied in the order given.
        strategy: a `tf.distribute.Strategy`; default: the one the model was built under, if any. A model
            (not a factory) passed with it must have been built inside its scope.
        steps_per_execution: steps per compiled call: an int as in Keras (batch callbacks then hear every
            N-th step, as in Keras), or "auto": many steps per call when no callback needs per-batch hooks,
            one per call otherwise. Default (None): the model's `compile(steps_per_execution=N)` when N > 1,
            else "auto".
        jit_compile: compile the steps with XLA. Default (None): what the model was compiled with, as Keras
            resolved it (`model.jit_compile`: `compile`'s default "auto" means XLA on GPUs for models that
            support it, off on CPU and under a distribution strategy), so the same program as `model.fit`.
            "auto" is the same as None.
        memory_logs: also put the memory telemetry into every epoch's logs: `rss_mb` (and `device_mb`,
            `device_peak_mb` on GPU, `microbatch_size` once microbatching is on), so that History, CSVLogger
            and TensorBoard record them. Off by default: logs and History then carry exactly the keys
            `model.fit` gives. `trainer.memory`, the progress bar and the policies see memory either way.
        custom_objects: classes and functions re-hydration needs to rebuild the model from its config (as
            for `keras.models.load_model`); the classes of the model's own layers are found automatically.
        microbatch_size: split every training batch into microbatches of this many samples and accumulate
            their gradients into one update (the same update, up to summation order, for losses averaged
            over the batch). None: whole batches.
        oom_recovery: when a training step runs out of memory (`tf.errors.ResourceExhaustedError`), drop
            it, retry that batch in microbatches, halving until it fits, and keep that size for the rest of
            the run (see `trainer.oom_events`).
        array_path: how NumPy/pandas arrays reach the steps. "stream": batches are read from your arrays as
            they are needed (rows in sorted order, a few batches ahead), so memory does not grow with the
            data and a memory-mapped file is never read whole; "graph": the arrays are copied into
            TensorFlow once (two copies at the peak; refused when that exceeds available memory) and
            batches gathered in-graph; "auto" (default): "stream" for every input that can be streamed
            (numeric NumPy arrays, memory-mapped or not, and pandas objects), "graph" for tensors, strings and
            sparse inputs (already in TensorFlow, or read by Keras's slicing). Streaming measured as fast as
            the in-graph gather (MLP 1.05x, CNN 0.97x). The same numbers either way;
            `trainer.train_batches.describe()` says which was taken.
        check_inputs: refuse NaN/Inf in float inputs: arrays are scanned before training (naming the first
            bad sample), other inputs are checked inside each step (naming the batch).
        memory_budget_mb: the most anonymous memory (RssAnon, MiB) the whole process may hold during `fit`;
            "auto": what it holds plus what the machine (or the container's cgroup limit) still has, less a
            margin. Before the first step the trainer plans (`plan_memory`, probes that leave no trace) and,
            where whole batches would not fit, runs each batch as microbatches that do (the same update, up
            to summation order; BatchNormalization sees microbatch statistics); when not even one sample
            fits it raises `MemoryBudgetExceeded` before any step. With `verbose`, the plan is printed.
            Default None: no plan, whole batches.

    Example:
        >>> model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        >>> history = SafeTrainer(model).fit(x, y, epochs=5, validation_split=0.2)
        >>> trainer.memory.series("rss_mb")    # resident memory after each epoch
        >>> trainer.trace_counts               # {'train': 1, 'test': 1, 'predict': 0}
    """

    def __init__(
        self,
        model: keras.Model | Callable[[], keras.Model],
        *,
        optimizer=None,
        loss=None,
        metrics=None,
        policies: Sequence[Policy] = (),
        strategy: tf.distribute.Strategy | None = None,
        steps_per_execution: int | str | None = None,
        jit_compile: bool | str | None = None,
        memory_logs: bool = False,
        custom_objects: Mapping[str, Any] | None = None,
        microbatch_size: int | None = None,
        oom_recovery: bool = True,
        check_inputs: bool = False,
        array_path: str = "auto",
        memory_budget_mb: float | str | None = None,
    ) -> None:
        if steps_per_execution not in ("auto", None):
            check_int("steps_per_execution", steps_per_execution, 1)
        check_int("microbatch_size", microbatch_size, 1, allow_none=True)
        plan_module.check_budget_argument(memory_budget_mb)
        if jit_compile == "auto":
            jit_compile = None
        if jit_compile is not None and not isinstance(jit_compile, bool):
            raise TypeError(f"`jit_compile` must be True, False, 'auto' or None, got {jit_compile!r}.")
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"`strategy` must be a tf.distribute.Strategy or None, got {type(strategy).__name__}.")
        self.policies = PolicyList(policies)
        reclaim.on_new_trainer(self)
        self.factory: Callable[[], keras.Model] | None = None
        built: Any
        if _compat.is_trainer_model(model):
            built = model
        elif callable(model) and not isinstance(model, keras.layers.Layer):
            self.factory = model
            built = self._call_factory(strategy)
        else:
            raise TypeError(
                "`model` must be a keras.Model (or a Keras layer that is a Keras trainer, as `model.fit` "
                f"accepts) or a zero-argument callable returning one, got {type(model).__name__}."
            )
        self.model: keras.Model = built
        if _compat.is_trainer_model(model) and strategy is not None:
            distributed.check_model_strategy(model, strategy)
        self.strategy: tf.distribute.Strategy = strategy or built.distribute_strategy
        if steps_per_execution is None:
            # The model's own `compile(steps_per_execution=N)`, as `model.fit` runs it; Keras's default, 1,
            # means "auto" here (the same numbers and callbacks, fewer calls).
            compiled = getattr(built, "steps_per_execution", 1) if getattr(built, "compiled", False) else 1
            steps_per_execution = int(compiled) if compiled and int(compiled) > 1 else "auto"
        self.steps_per_execution: int | str = steps_per_execution
        self.memory_logs = bool(memory_logs)
        if optimizer is not None or loss is not None or metrics is not None:
            _compile_with_overrides(
                built, self.strategy, optimizer, loss, metrics, "auto" if jit_compile is None else jit_compile
            )
        if jit_compile is None:
            jit_compile = bool(built.jit_compile) if getattr(built, "compiled", False) else False
        self.jit_compile: bool = jit_compile
        if getattr(built, "run_eagerly", False):
            warnings.warn(
                "The model was compiled with run_eagerly=True; SafeTrainer always compiles its steps "
                "(one trace each), so run_eagerly is ignored; to step through eagerly, use model.fit.",
                UserWarning,
                stacklevel=2,
            )
        self.custom_objects = dict(custom_objects or {})
        self.memory = memory.MemoryLog()
        self.oom_recovery = bool(oom_recovery)
        self.check_inputs = bool(check_inputs)
        if array_path not in data_module.ARRAY_PATHS:
            raise ValueError(f"`array_path` must be one of {data_module.ARRAY_PATHS}, got {array_path!r}.")
        self.array_path = array_path
        self.steps = Steps(self.step_method, self.strategy, jit_compile, self.check_inputs)
        self.is_chief = distributed.is_chief(self.strategy)  # False on every worker but one
        self.progress = TrainingProgress()
        #: The element spec the model was last built for by `fit` (what re-hydration rebuilds it with).
        self.train_spec = None
        #: The `CallbackList` of the running `fit`/`evaluate`/`predict` (None between runs).
        self.callbacks: CallbackList | None = None
        self.rehydrations = 0
        self.last_rehydration_seconds: float | None = None
        self.oom_events: list[dict] = []
        self.microbatches = Microbatches()
        #: slices of evaluation and prediction batches, set by a memory budget (`set_slice_size`)
        self.inference_slices = {"test": Microbatches(), "predict": Microbatches()}
        #: The training data of the last `fit` (re-hydration and resume set its shuffle seed).
        self.train_batches: data_module.Batches | None = None
        self.memory_budget_mb = memory_budget_mb
        #: The plan of each step kind ("train", "test", "predict") the budget was last applied with.
        self.memory_plans: dict[str, plan_module.MemoryPlan] = {}
        self.plan_state: dict[str, tuple] = {}  # kind -> (what the plan was made for, (slice size, least))
        self.user_microbatch_size = None if microbatch_size is None else int(microbatch_size)
        if microbatch_size is not None:
            self.set_microbatch_size(int(microbatch_size))

    # -- model and compile configuration -------------------------------------------------------------
    def _call_factory(self, strategy=None) -> keras.Model:
        factory = self.factory
        assert factory is not None
        if strategy is not None:
            with strategy.scope():
                built = factory()
        else:
            built = factory()
        if not _compat.is_trainer_model(built):
            raise TypeError(
                f"The model factory {getattr(self.factory, '__name__', self.factory)!r} must "
                f"return a keras.Model, but returned {type(built).__name__}."
            )
        return built

    # -- fit, evaluate, predict: arguments checked here, the loop in loop.py ---------------------------
    def _batches(self, x, y=None, sample_weight=None, *, batch_size, steps, what, shuffle=False, class_weight=None):
        """One input of `fit` (training or validation), `evaluate` or `predict` as `Batches`.

        For training data (`what == "fit"`), the shuffle order is `model.fit`'s: under a TensorFlow global seed
        (`keras.utils.set_random_seed`) Keras's own order for it; without one, a fresh order each fit, from a
        seed drawn from the OS so that no global RNG (Python, NumPy, TensorFlow, Keras) moves. Either way it is
        recorded in `progress`, so re-hydration and resume replay it. Other inputs are read in turn.
        """
        seed, keras_order = 0, False
        if what == "fit":
            global_seed = _compat.tf_global_seed()
            if global_seed is not None:
                self.progress.data_seed, self.progress.keras_order = int(global_seed), True
            else:
                self.progress.data_seed, self.progress.keras_order = random.SystemRandom().randrange(2**31), False
            seed, keras_order = self.progress.data_seed, self.progress.keras_order
        return data_module.as_batches(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            shuffle=shuffle,
            class_weight=class_weight,
            steps=steps,
            seed=seed,
            keras_order=keras_order,
            what=what,
            array_path=self.array_path,
        )

    @distributed.reports_worker_failures
    def fit(
        self,
        x=None,
        y=None,
        batch_size: int | None = None,
        epochs: int = 1,
        verbose: int | str = "auto",
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        validation_split: float = 0.0,
        validation_data=None,
        shuffle: bool | str = True,
        class_weight: dict | None = None,
        sample_weight=None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | Sequence[int] = 1,
        **kwargs,
    ) -> keras.callbacks.History:
        """Train for `epochs` epochs, with the arguments and semantics of `keras.Model.fit`.

        Returns the `keras.callbacks.History`, with the keys `model.fit` gives (plus `rss_mb` etc. with
        `memory_logs=True`); memory after each epoch is in `trainer.memory`. Bad arguments raise
        `ValueError`/`TypeError` before any step runs.

        Example:
            >>> history = SafeTrainer(model).fit(x, y, batch_size=64, epochs=10, validation_split=0.1,
            ...                                  callbacks=[keras.callbacks.EarlyStopping(patience=2)])
        """
        reject_unknown(kwargs, self.fit, "fit")
        check_fit_arguments(
            epochs, initial_epoch, steps_per_epoch, validation_steps, validation_batch_size, validation_freq
        )
        verbose = resolve_verbose(verbose)
        self.require_compiled("fit")
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = data_module.split_validation(x, y, sample_weight, validation_split)
        train = self._batches(
            x,
            y,
            sample_weight,
            batch_size=batch_size,
            shuffle=shuffle,
            class_weight=class_weight,
            steps=steps_per_epoch,
            what="fit",
        )
        check_data(self.model, train, x, y, sample_weight, "fit", self.check_inputs)
        val = None
        if validation_data is not None:
            vx, vy, vsw = data_module.unpack_validation_data(validation_data)
            val = self._batches(
                vx,
                vy,
                vsw,
                batch_size=validation_batch_size or (batch_size if data_module.kind_of(vx) == "arrays" else None),
                steps=validation_steps,
                what="fit (validation_data)",
            )
            check_data(self.model, val, vx, vy, vsw, "fit (validation_data)", self.check_inputs)
        self.build(train.element_spec)
        self.train_spec = train.element_spec
        self.train_batches = train
        if self.memory_budget_mb is not None:
            plan = plan_module.apply_budget(self, train, verbose)
            piece = self.progress.microbatch_size or plan.batch_size
            if val is not None and (plan_module.batch_size_of(val) or 0) > piece:
                plan_module.apply_budget(self, val, verbose, kind="test")  # bigger than the steps planned
        epochs = _limit_epochs(epochs)
        steps_per_epoch, validation_steps = _limit_steps(steps_per_epoch), _limit_steps(validation_steps)
        loop = Loop(
            self,
            callbacks,
            verbose=verbose,
            epochs=epochs,
            steps=steps_per_epoch or train.num_batches,
            add_history=True,
        )
        return loop.fit(
            train,
            val,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            validation_freq=validation_freq,
        )

    @property
    def memory_plan(self) -> plan_module.MemoryPlan | None:
        """The `MemoryPlan` a budget last applied to `fit` (None before; see `plan_memory`)."""
        return self.memory_plans.get("train")

    def plan_memory(
        self, x, y=None, *, batch_size: int | None = None, sample_weight=None, step: str = "train"
    ) -> plan_module.MemoryPlan:
        """Predict the peak memory of `fit(x, y, batch_size=...)` from a few probe steps at smaller batch sizes
        (`step="test"`: of `evaluate`; `step="predict"`: of `predict(x)`, with the array its outputs fill).

        The probes run this trainer's step (a separate compiled copy: no trace is counted) and leave no trace:
        weights, optimizer state, metrics, seed-generator states and `progress` are exactly as before. A
        dataset, generator or `PyDataset` is not iterated (probe batches are zeros of its element spec);
        `batch_size` then says how big its batches are (default: its spec's, else 32).

        Example:
            >>> plan = trainer.plan_memory(x, y, batch_size=512)
            >>> print(plan)                                  # fixed, per sample, predicted peak (MiB)
            >>> plan.max_batch_size(8192), plan.microbatch_size(2048)
            >>> trainer.plan_memory(x, batch_size=8192, step="predict").peak_mb
        """
        if step not in plan_module.KINDS:
            raise ValueError(f"`step` must be one of {plan_module.KINDS}, got {step!r}.")
        if step != "predict":
            self.require_compiled("plan_memory")
        own = data_module.kind_of(x) != "arrays"  # a dataset yields its batches: `batch_size` says how big
        size = None if own else batch_size
        if step == "predict":
            y = sample_weight = None
        batches = self._batches(x, y, sample_weight, batch_size=size, steps=None, what="plan_memory")
        if step != "predict":
            check_data(self.model, batches, x, y, sample_weight, "plan_memory", self.check_inputs)
        return plan_module.make_plan(self, batches, batch_size if own else None, kind=step)

    @distributed.reports_worker_failures
    def evaluate(
        self,
        x=None,
        y=None,
        batch_size: int | None = None,
        verbose: int | str = "auto",
        sample_weight=None,
        steps: int | None = None,
        callbacks=None,
        return_dict: bool = False,
        **kwargs,
    ):
        """Loss and metrics on data, with the arguments and return value of `keras.Model.evaluate`.

        Example:
            >>> loss, mae = trainer.evaluate(x_test, y_test)
            >>> trainer.evaluate(test_ds, return_dict=True)
            {'loss': 0.12, 'mae': 0.27}
        """
        reject_unknown(kwargs, self.evaluate, "evaluate")
        check_int("steps", steps, 1, allow_none=True)
        verbose = resolve_verbose(verbose)
        self.require_compiled("evaluate")
        batches = self._batches(x, y, sample_weight, batch_size=batch_size, steps=steps, what="evaluate")
        check_data(self.model, batches, x, y, sample_weight, "evaluate", self.check_inputs)
        self.build(batches.element_spec)
        if self.memory_budget_mb is not None:
            plan_module.apply_budget(self, batches, verbose, kind="test")
        steps = _limit_steps(steps)
        loop = Loop(self, callbacks, verbose=verbose, steps=steps or batches.num_batches)
        try:
            logs = loop.evaluate(batches, steps)
        finally:
            loop.close()
        if return_dict:
            return logs
        return _compat.flatten_metrics_in_order(self.model, logs)

    @distributed.reports_worker_failures
    def predict(
        self,
        x,
        batch_size: int | None = None,
        verbose: int | str = "auto",
        steps: int | None = None,
        callbacks=None,
        out=None,
        **kwargs,
    ):
        """The model's outputs on `x` as NumPy arrays (same structure as the model's outputs).

        Outputs are gathered on device per chunk of batches and written once per chunk into one array per
        output (allocated for all samples at the first chunk), so memory holds the result once, with no
        per-batch objects and no concatenation at the end. `out=`: write into your own NumPy array or
        `np.memmap` (a structure of them for several outputs) of shape `(num_samples, ...)` and get it back,
        for outputs bigger than memory.

        Example:
            >>> probs = trainer.predict(x_test, batch_size=256)
            >>> trainer.predict(x_big, out=np.lib.format.open_memmap("p.npy", "w+", "float32", (len(x_big), 10)))
        """
        reject_unknown(kwargs, self.predict, "predict")
        check_int("steps", steps, 1, allow_none=True)
        verbose = resolve_verbose(verbose)
        batches = self._batches(x, batch_size=batch_size, steps=steps, what="predict")
        self.build(batches.element_spec, training=False)
        if self.memory_budget_mb is not None:
            plan_module.apply_budget(self, batches, verbose, kind="predict")
        steps = _limit_steps(steps)
        loop = Loop(self, callbacks, verbose=verbose, steps=steps or batches.num_batches)
        try:
            outputs = loop.predict(batches, steps, out=out)
        finally:
            loop.close()
        if outputs is None:
            raise ValueError("predict: `x` yielded no batches.")
        return outputs
