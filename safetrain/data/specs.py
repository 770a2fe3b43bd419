"""Element specs as the compiled steps see them: the batch dimension relaxed, and a short rendering for errors.

Example:
    >>> relax_spec((tf.TensorSpec([32, 8]), tf.TensorSpec([32, 1])))
    (TensorSpec(shape=(None, 8), ...), TensorSpec(shape=(None, 1), ...))
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["relax_spec", "with_batch_size", "describe_spec"]


def _relax_leaf(spec):
    if isinstance(spec, tf.TensorSpec) and spec.shape.rank:
        return tf.TensorSpec([None] + spec.shape.as_list()[1:], spec.dtype, spec.name)
    if isinstance(spec, tf.RaggedTensorSpec) and spec.shape.rank:
        return tf.RaggedTensorSpec(
            [None] + spec.shape.as_list()[1:], spec.dtype, spec.ragged_rank, spec.row_splits_dtype
        )
    if isinstance(spec, tf.SparseTensorSpec) and spec.shape.rank:
        return tf.SparseTensorSpec([None] + spec.shape.as_list()[1:], spec.dtype)
    return spec


def relax_spec(spec):
    """The same element spec with the batch dimension of every component set to `None`.

    Dimensions that already vary (`None`) stay `None`; nothing else is loosened, so a step compiled for
    the relaxed spec accepts every batch of the dataset, the partial last one included.
    """
    return tf.nest.map_structure(_relax_leaf, spec)


def with_batch_size(spec, batch_size: int):
    """The same element spec with the batch dimension of every dense component set to `batch_size`."""

    def one(s):
        if isinstance(s, tf.TensorSpec) and s.shape.rank:
            return tf.TensorSpec([batch_size] + s.shape.as_list()[1:], s.dtype, s.name)
        return s

    return tf.nest.map_structure(one, spec)


def describe_spec(spec) -> str:
    """A short human-readable rendering of an element spec, for error messages."""

    def one(s):
        if hasattr(s, "shape") and hasattr(s, "dtype"):
            return f"{s.dtype.name}{list(s.shape.as_list()) if s.shape.rank is not None else '[?]'}"
        return type(s).__name__

    return str(tf.nest.map_structure(one, spec))
