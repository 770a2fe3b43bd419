"""Datasets, generators and `keras.utils.PyDataset` as `Batches`, read through Keras's own data adapters.

They behave as in `model.fit`: the same `tf.data` pipeline, the same class weighting, the same `PyDataset`
workers and epoch hooks. Keras ignores `batch_size` for these inputs (they yield batches); so does this, with
a warning.

Example:
    >>> b = adapter_batches(tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    >>> b.kind, b.num_batches
    ('tf.data.Dataset', 32)
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import tensorflow as tf
from keras.utils import PyDataset, unpack_x_y_sample_weight

from safetrain import _compat
from safetrain._compat import get_data_adapter
from safetrain.data.batches import Batches
from safetrain.data.specs import relax_spec
from safetrain.data.streaming import keep_with

__all__ = ["kind_of", "adapter_batches", "unpack_validation_data"]


def kind_of(x) -> str:
    """ "arrays", "tf.data.Dataset", "keras.utils.PyDataset" or "generator": how `x` will be read."""
    if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        return "tf.data.Dataset"
    if isinstance(x, PyDataset):
        return "keras.utils.PyDataset"
    if isinstance(x, types.GeneratorType):
        return "generator"
    return "arrays"


def adapter_batches(
    x,
    y=None,
    sample_weight=None,
    *,
    batch_size: int | None = None,
    shuffle: bool | str = False,
    class_weight: dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    what: str = "fit",
) -> Batches:
    """Batches of a dataset, generator or PyDataset; `y` and `sample_weight` must be None (the input yields
    them), as in Keras."""
    kind = kind_of(x)
    for name, value in (("y", y), ("sample_weight", sample_weight)):
        if value is not None:
            raise ValueError(
                f"{what}: `{name}` must be None when `x` is a {kind}; the {kind} itself must "
                f"yield `(x, y)` or `(x, y, sample_weight)`."
            )
    if batch_size is not None:
        warnings.warn(
            f"{what}: `batch_size={batch_size}` is ignored: `x` is a {kind}, which yields its own batches "
            "(model.fit ignores it too).",
            UserWarning,
            stacklevel=6,  # adapter_batches, as_batches, _batches, fit, its wrapper: the user's line
        )
    if kind == "generator" and class_weight is not None:
        raise ValueError(
            f"{what}: `class_weight` is not supported with a generator; yield sample weights "
            "as the third element instead."
        )
    if kind == "tf.data.Dataset" and isinstance(x, tf.data.Dataset):
        card = int(x.cardinality())
        if card == 0:
            raise ValueError(f"{what}: the tf.data.Dataset `x` is empty (cardinality 0).")
    with warnings.catch_warnings():
        # Keras warns that `shuffle` is ignored for these inputs; that is documented behaviour here.
        warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
        try:
            adapter = get_data_adapter(
                x, class_weight=class_weight, shuffle=shuffle if kind != "generator" else False, steps_per_epoch=steps
            )
            with _compat.python_functions_made() as made:  # a generator's or PyDataset's `from_generator`
                dataset = keep_with(adapter.get_tf_dataset(), made)
        except ValueError as e:
            raise ValueError(f"{what}: invalid `x` ({kind}): {e}") from e
    num_batches = adapter.num_batches
    if num_batches is not None and num_batches < 0:
        num_batches = None
    if num_batches == 0:
        raise ValueError(f"{what}: `x` ({kind}) yields no batches.")
    return Batches(kind, relax_spec(dataset.element_spec), num_batches, adapter=adapter, dataset=dataset, seed=seed)


def unpack_validation_data(validation_data) -> tuple[Any, Any, Any]:
    """`validation_data` as `(x, y, sample_weight)`; a dataset, generator or PyDataset stays whole."""
    if isinstance(validation_data, (list, tuple)):
        if len(validation_data) not in (1, 2, 3):
            raise ValueError(
                "`validation_data` must be `(x_val, y_val)`, `(x_val, y_val, val_sample_weight)`, "
                f"a dataset, generator or PyDataset; got a sequence of length {len(validation_data)}."
            )
        return unpack_x_y_sample_weight(tuple(validation_data))
    return validation_data, None, None
