"""Keras's `train_on_batch`, `test_on_batch` and `predict_on_batch`: one batch, one compiled step, no pipeline.

    for x, y in replay_buffer:                         # a GAN or reinforcement-learning loop
        loss = trainer.train_on_batch(x, y)            # one trace whatever the batch size, memory flat

Same signatures and results as Keras's: metrics are reset before each call, results come back as Python
numbers (a list in metric order, or a dict with `return_dict=True`). The batch is converted as `fit` converts
arrays, and the step is the trainer's compiled step for any batch size, so calls with new batch sizes do not
trace again. Policies that asked for `every_n_batches` hear the training steps these calls make, and every
`MEMORY_EVERY` training calls `trainer.memory` gets a sample (`epoch` None, `step` the global step), so a loop
of `train_on_batch` calls has the memory series `fit` epochs would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from keras import tree

from safetrain import _compat
from safetrain.data import class_weight_to_sample_weight, relax_spec
from safetrain.tensors import as_tensors

if TYPE_CHECKING:
    import keras

    from safetrain.memory import MemoryLog, MemorySample
    from safetrain.policies import PolicyList
    from safetrain.state import TrainingProgress
    from safetrain.steps import Steps

__all__ = ["OnBatch", "MEMORY_EVERY"]

#: `train_on_batch` calls between two samples of `trainer.memory` (a sample costs about 20 µs).
MEMORY_EVERY = 100


class OnBatch:
    """Mixin of `SafeTrainer`: the `*_on_batch` methods of a Keras model."""

    model: keras.Model
    progress: TrainingProgress
    policies: PolicyList
    steps: Steps
    memory: MemoryLog
    sample_memory: Callable[..., MemorySample]  # TrainerActions'

    def build(self, spec, training: bool = True) -> None: ...  # StepSurface's

    def require_compiled(self, what: str) -> None: ...  # StepSurface's

    def _batch(self, kind: str, x, y=None, sample_weight=None):
        """The batch as tensors and its spec with the batch dimension free; builds the model before the
        first step of `kind` (eagerly, as `fit` does: nothing is created inside a trace)."""
        data, spec = as_tensors(x, y, sample_weight)
        spec = relax_spec(spec)
        if self.steps[kind].function is None:
            self.build(spec, training=kind != "predict")
        return data, spec

    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None, return_dict: bool = False):
        """One optimizer step on one batch, as `keras.Model.train_on_batch`; returns the loss and metrics.

        Example:
            >>> loss, mae = trainer.train_on_batch(x_batch, y_batch)
            >>> trainer.train_on_batch(x_batch, y_batch, return_dict=True)
            {'loss': 0.41, 'mae': 0.52}
        """
        self.require_compiled("fit")
        if class_weight is not None:
            if sample_weight is not None:
                raise ValueError("`class_weight` and `sample_weight` cannot both be given; pass one.")
            sample_weight = class_weight_to_sample_weight(y, class_weight)
        data, spec = self._batch("train", x, y, sample_weight)
        self.model.reset_metrics()
        logs = self.steps["train"].run_step(data, spec)
        self.progress.global_step += 1
        step = self.progress.global_step
        if step % MEMORY_EVERY == 0:
            self.memory.append(self.sample_memory(step=step))
        if self.policies.wants_batches:
            self.policies.on_batch_end(self, step)
        return self._results(logs, return_dict)

    def test_on_batch(self, x, y=None, sample_weight=None, return_dict: bool = False):
        """Loss and metrics of one batch, as `keras.Model.test_on_batch`.

        Example:
            >>> trainer.test_on_batch(x_batch, y_batch, return_dict=True)
            {'loss': 0.39, 'mae': 0.50}
        """
        self.require_compiled("evaluate")
        data, spec = self._batch("test", x, y, sample_weight)
        self.model.reset_metrics()
        return self._results(self.steps["test"].run_step(data, spec), return_dict)

    def predict_on_batch(self, x) -> Any:
        """The model's outputs on one batch as NumPy arrays (ragged outputs stay `tf.RaggedTensor`), as
        `keras.Model.predict_on_batch`.

        Example:
            >>> probs = trainer.predict_on_batch(x_batch)
        """
        data, spec = self._batch("predict", x)
        outputs = self.steps["predict"].run_step(data, spec)
        return tree.map_structure(
            lambda t: t if isinstance(t, (tf.RaggedTensor, tf.SparseTensor)) else t.numpy(), outputs
        )

    def _results(self, logs, return_dict: bool):
        logs = _compat.pythonify_logs(logs)
        if return_dict:
            return logs
        return _compat.flatten_metrics_in_order(self.model, logs)
