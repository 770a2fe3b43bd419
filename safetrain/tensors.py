"""What users pass, as tensors: arrays, tensors and nested structures of them, converted as Keras converts them.

    data, spec = as_tensors(x_batch, y_batch)        # floats to floatx, strings to tf.string, Nones dropped

`fit` converts whole arrays with it (see `data.py`); the `*_on_batch` methods convert one batch per call.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras import backend, tree

from safetrain import _compat
from safetrain._compat import array_slicing, data_adapter_utils

__all__ = ["as_tensors"]


def as_tensors(x, y=None, sample_weight=None):
    """`(x, y, sample_weight)` packed as Keras packs it (Nones dropped) and converted as `fit` converts arrays
    (floats to `floatx`, strings to `tf.string`); returns `(tensors, element spec)`.

    Example:
        >>> data, spec = as_tensors(np.zeros((4, 3)), np.zeros((4, 1)))
        >>> spec
        (TensorSpec(shape=(4, 3), dtype=tf.float32, name=None), TensorSpec(shape=(4, 1), ...))
    """
    inputs = data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight)
    if all(_plain(a) for a in tree.flatten(inputs)):
        # Numeric NumPy arrays and dense tensors (the usual one batch of `train_on_batch`): converted
        # directly, as Keras's slicing converts them (floats to floatx), at a fraction of its cost per call.
        arrays = tree.lists_to_tuples(tree.map_structure(_plain_tensor, inputs))
        return arrays, tree.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), arrays)
    inputs = tree.map_structure(_strings_as_tensors, inputs)
    arrays = tree.lists_to_tuples(array_slicing.convert_to_sliceable(inputs, target_backend="tensorflow"))
    arrays = tree.traverse(_to_tensor, arrays)
    spec = tree.traverse(lambda a: None if isinstance(a, (list, tuple, dict)) else _array_spec(a), arrays)
    return arrays, spec


def _plain(a) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "biuf"
    return isinstance(a, tf.Tensor) and a.dtype != tf.string


def _plain_tensor(a) -> tf.Tensor:
    if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.dtype != backend.floatx():
        a = a.astype(backend.floatx())
    elif isinstance(a, tf.Tensor) and a.dtype.is_floating and a.dtype != backend.floatx():
        a = tf.cast(a, backend.floatx())
    return tf.convert_to_tensor(a)


def _strings_as_tensors(a):
    # Keras's array conversion rejects NumPy unicode/bytes arrays; as tf.string they batch like any array.
    if isinstance(a, np.ndarray) and a.dtype.kind in ("U", "S"):
        return tf.constant(a.astype(object if a.dtype.kind == "U" else a.dtype), dtype=tf.string)
    return a


def _to_tensor(a):
    """`tree.traverse` function: leaves become tensors (sparse wrappers kept), containers are entered."""
    if isinstance(a, (list, tuple, dict)) and not isinstance(a, array_slicing.TensorflowSparseWrapper):
        return None
    if a is None or isinstance(a, array_slicing.TensorflowSparseWrapper) or tf.is_tensor(a):
        return a
    a = np.asarray(a)
    return tf.convert_to_tensor(a, dtype=tf.string if a.dtype == object else None)


def _array_spec(a):
    if a is None:  # an optional input fed None: tf.data carries it as such
        return _compat.none_spec()
    if isinstance(a, array_slicing.TensorflowSparseWrapper):
        return tf.SparseTensorSpec([None] + a.sparse.shape.as_list()[1:], a.sparse.dtype)
    if isinstance(a, tf.RaggedTensor):
        return tf.RaggedTensorSpec.from_value(a)
    if tf.is_tensor(a):
        return tf.TensorSpec(a.shape, a.dtype)
    a = np.asarray(a)
    return tf.TensorSpec(a.shape, tf.as_dtype(a.dtype) if a.dtype != object else tf.string)
