"""Turn what users pass to `fit` into one batched, prefetched `tf.data` pipeline with a fixed element spec.

One module per input kind: `arrays` (NumPy, tensors, pandas; streamed by `streaming` or gathered in the graph),
`adapters` (tf.data, generators, `PyDataset`, through Keras's own adapters), `order` (the shuffle order of
arrays: Keras's own under a TensorFlow global seed, else a pure function of `(seed, epoch)`), `batches` (the
`Batches` every kind becomes), `specs` (element specs as the steps see them).

Example:
    >>> batches = safetrain.data.as_batches(x, y, batch_size=32, shuffle=True, seed=0)
    >>> batches.num_batches, batches.element_spec
    (625, (TensorSpec(shape=(None, 32), ...), TensorSpec(shape=(None, 1), ...)))
    >>> for batch in batches.dataset(epoch=0): ...
"""

from __future__ import annotations

import numpy as np
from keras import tree

from safetrain._compat import array_slicing, can_convert_arrays
from safetrain.data.adapters import adapter_batches, kind_of, unpack_validation_data
from safetrain.data.arrays import (
    ARRAY_PATHS,
    array_batches,
    check_class_weight,
    check_graph_path_memory,
    class_weight_to_sample_weight,
    split_validation,
)
from safetrain.data.batches import Batches
from safetrain.data.order import keras_shuffle_order, shuffle_order
from safetrain.data.specs import describe_spec, relax_spec
from safetrain.data.streaming import ArrayReader

__all__ = [
    "ARRAY_PATHS",
    "ArrayReader",
    "Batches",
    "as_batches",
    "check_graph_path_memory",
    "class_weight_to_sample_weight",
    "describe_spec",
    "keras_shuffle_order",
    "kind_of",
    "relax_spec",
    "shuffle_order",
    "split_validation",
    "unpack_validation_data",
]

_ACCEPTED = (
    "NumPy arrays or tensors (or lists/tuples/dicts of them), a tf.data.Dataset, "
    "a Python generator or a keras.utils.PyDataset"
)


def _check_batch_size(batch_size, name="batch_size"):
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be a positive integer or None, got {batch_size!r} (type {type(batch_size).__name__})."
        )
    if batch_size <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {batch_size}.")


def as_batches(
    x,
    y=None,
    sample_weight=None,
    *,
    batch_size: int | None = None,
    shuffle: bool | str = False,
    class_weight: dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    keras_order: bool = False,
    what: str = "fit",
    array_path: str = "auto",
) -> Batches:
    """Validate one input and return its `Batches`.

    Raises `ValueError`/`TypeError` naming the argument for: an unsupported type, `y` or `sample_weight`
    given with a dataset/generator/PyDataset (a `batch_size` is ignored for them, with a warning),
    `batch_size <= 0`, arrays of different lengths, empty data, `class_weight` with `sample_weight`.

    Example:
        >>> b = as_batches(np.zeros((10, 3)), np.zeros((10, 1)), batch_size=4)
        >>> b.num_batches
        3
    """
    _check_batch_size(batch_size)
    if x is None:
        raise ValueError(f"{what}: `x` is required ({_ACCEPTED}).")
    kind = kind_of(x)
    check_class_weight(class_weight, kind)
    if kind == "arrays":
        streamable = array_path != "graph" and ArrayReader.of((x, y, sample_weight)) is not None
        if not streamable and not can_convert_arrays((x, y, sample_weight)):
            bad = [
                type(a).__name__ for a in tree.flatten((x, y, sample_weight)) if not array_slicing.can_slice_array(a)
            ]
            raise TypeError(f"{what}: `x` must be {_ACCEPTED}; got unsupported type(s) {sorted(set(bad))}.")
        if array_path not in ARRAY_PATHS:
            raise ValueError(f"`array_path` must be one of {ARRAY_PATHS}, got {array_path!r}.")
        return array_batches(
            x, y, sample_weight, batch_size, shuffle, class_weight, steps, seed, keras_order, what, array_path
        )

    return adapter_batches(
        x,
        y,
        sample_weight,
        batch_size=batch_size,
        shuffle=shuffle,
        class_weight=class_weight,
        steps=steps,
        seed=seed,
        what=what,
    )
