"""The Keras-facing step surface of `SafeTrainer`: what a custom `train_step` written for a `keras.Model` uses.

    class ClippedTrainer(SafeTrainer):
        def train_step(self, data):                       # the same code as in a keras.Model subclass
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip([tf.clip_by_norm(g, 1.0) for g in grads], self.trainable_variables))
            return self.compute_metrics(x, y, self(x), None)

`train_step`, `test_step`, `predict_step` and `compute_loss` keep Keras's names and signatures; `step_method`
picks which one is compiled (a subclass's override, else the model's, else these).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from keras import tree

from safetrain import _compat, reclaim
from safetrain.errors import ConfigurationError
from safetrain.microbatch import first_tensor

if TYPE_CHECKING:
    from safetrain.microbatch import Microbatches
    from safetrain.state import TrainingProgress
    from safetrain.steps import Steps

__all__ = ["StepSurface"]


class StepSurface:
    """Mixin of `SafeTrainer`: the overridable steps and the Model-like attributes custom steps read.

    Needs `self.model` and `self.progress` (the microbatch size) from the class it is mixed into.
    """

    model: keras.Model
    progress: TrainingProgress
    microbatches: Microbatches
    inference_slices: dict[str, Microbatches]
    steps: Steps
    strategy: Any

    def has_custom(self, name: str) -> bool:
        """Whether the trainer's subclass or the model overrides step method `name` (e.g. "train_step")."""
        return getattr(type(self), name) is not getattr(StepSurface, name) or getattr(
            type(self.model), name
        ) is not getattr(_compat.TensorFlowTrainer, name)

    def require_compiled(self, what: str) -> None:
        """Raise `ConfigurationError` before any step when the model was not compiled (as `model.fit` and
        `model.evaluate` do) or `fit` has no optimizer. A compiled model needs no `loss`: its losses may all
        come from `add_loss` or a custom step; with none at all, Keras's own error comes at the first trace."""
        model = self.model
        if not model.compiled:
            raise ConfigurationError(
                f"SafeTrainer.{what}(): You must call `compile()` before using the model (or pass `optimizer=` "
                f"and `loss=` to SafeTrainer(model, ...))."
            )
        if what == "fit" and model.optimizer is None:
            raise ConfigurationError(
                "SafeTrainer.fit() needs an optimizer (`optimizer=`): compile the model with one or pass it to "
                "SafeTrainer(model, ...)."
            )

    def step_method(self, kind: str, microbatched: bool = True) -> Callable:
        """The Python step to compile for `kind`: the trainer's override, else the model's, else ours; the
        microbatched train step when a microbatch size is set, the sliced test or predict step when a slice size
        is (unless `microbatched=False`: the one-piece step)."""
        name = f"{kind}_step"
        slices = self.inference_slices.get(kind)
        if microbatched and slices is not None and slices.size is not None and not self.has_custom(name):
            return functools.partial(getattr(slices, name), self)
        if kind == "train" and microbatched and self.progress.microbatch_size is not None:
            if self.has_custom("train_step"):
                raise ConfigurationError(
                    "microbatching (microbatch_size=, or recovery from running out of memory) "
                    "needs SafeTrainer's own train_step; this model or trainer overrides it."
                )
            return functools.partial(self.microbatches.train_step, self)
        if getattr(type(self), name) is not getattr(StepSurface, name):
            return getattr(self, name)
        if getattr(type(self.model), name) is not getattr(_compat.TensorFlowTrainer, name):
            return getattr(self.model, name)
        return getattr(self, name)

    def build(self, spec, training: bool = True) -> None:
        """Create every variable eagerly (model, metrics, loss trackers, optimizer) before the first trace.

        An optimizer built inside a trace leaves functions alive after its model is gone. `predict` only
        needs the model's own variables (its data has no targets to build metrics from). A model Keras cannot
        build from a spec (no `call()`: a GAN or VAE whose `train_step` does the work) is built when its step
        is traced, as `model.fit` builds it; under a distribution strategy Keras requires the build, and so
        the error stands.
        """
        try:
            self._build(spec, training)
        finally:
            optimizer = getattr(self.model, "optimizer", None)  # an uncompiled model (predict) has none
            reclaim.on_variables(self.model.variables + (optimizer.variables if optimizer is not None else []))

    def _build(self, spec, training: bool) -> None:
        model = self.model
        none_spec = type(_compat.none_spec())
        spec = tree.map_structure(lambda s: None if isinstance(s, (tf.OptionalSpec, none_spec)) else s, spec)
        with self.strategy.scope():
            if training and model.compiled:
                try:
                    _compat.symbolic_build(model, spec)
                except RuntimeError:  # Keras's "Unable to automatically build the model"
                    if _compat.model_strategy(model) is not None:
                        raise
                    return
                if model.optimizer is not None and not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
            elif not model.built:
                x, _, _ = keras.utils.unpack_x_y_sample_weight(spec)
                symbolic = tree.map_structure(
                    lambda s: None if s is None else keras.KerasTensor(s.shape, s.dtype.name), x
                )
                _compat.compute_output_spec(model, symbolic)

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
        return self.steps.trace_counts

    @property
    def epoch(self) -> int:
        """The next epoch to train (`progress.epoch`)."""
        return self.progress.epoch

    @property
    def microbatch_size(self) -> int | None:
        """The microbatch size in use (None: whole batches); `progress.microbatch_size`."""
        return self.progress.microbatch_size

    @property
    def data_seed(self) -> int | None:
        """The seed of the array shuffle order (`progress.data_seed`)."""
        return self.progress.data_seed

    # -- the overridable steps -------------------------------------------------------------------------
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training: bool = True):
        """Total loss of a batch (compiled loss + `model.losses`); override for a custom objective."""
        return _compat.compute_loss(self.model, x, y, y_pred, sample_weight, training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None) -> dict:
        """Update the compiled metrics and return every metric's result (`model.compute_metrics`)."""
        return self.model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def track_loss(self, loss, x) -> None:
        """Add a batch's loss to the loss shown in logs, weighted by the batch size (as Keras does)."""
        tracker = _compat.loss_tracker(self.model)
        if tracker is not None:
            tracker.update_state(
                _compat.unscale_loss_for_distribution(loss), sample_weight=tf.shape(first_tensor(x))[0]
            )

    def forward(self, x, training: bool):
        """The model's outputs on `x`, passing `training` where its `call` takes it."""
        if _compat.call_has_training_arg(self.model):
            return self.model(x, training=training)
        return self.model(x)

    def train_step(self, data) -> dict:
        """One optimizer step on one batch; returns the logs. Same computation as Keras's `train_step`."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.forward(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
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
                warnings.warn("The model does not have any trainable weights.", stacklevel=2)
            self.track_loss(loss, x)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data) -> dict:
        """Loss and metrics of one batch, without training."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.forward(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
        self.track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def predict_step(self, data):
        """The model's outputs for one batch."""
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.forward(x, training=False)
