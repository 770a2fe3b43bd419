"""The shuffle order of array inputs: a pure function of `(seed, epoch)`, or Keras's own under a global seed.

Example:
    >>> shuffle_order(6, 4, True, seed=0, epoch=1)               # drawn from (seed, epoch)
    >>> keras_shuffle_order(6, 4, True, global_seed=0)         # what model.fit uses after set_random_seed(0)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from safetrain import _compat

__all__ = ["shuffle_order", "keras_shuffle_order"]


def shuffle_order(num_samples: int, batch_size: int, shuffle: bool | str, seed: int, epoch: int) -> np.ndarray:
    """The sample order of epoch `epoch`, drawn from `(seed, epoch)` and nothing else (no global RNG moves).

    `shuffle=False`: samples in turn; `"batch"`: Keras's batch shuffle (batches keep their samples, the order
    inside each batch is shuffled); `True`: a permutation of all samples.
    """
    n, bs = num_samples, batch_size
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if shuffle == "batch":
        return np.concatenate([rng.permutation(np.arange(i, min(i + bs, n), dtype=np.int64)) for i in range(0, n, bs)])
    return rng.permutation(n).astype(np.int64)


def keras_shuffle_order(num_samples: int, batch_size: int, shuffle: bool | str, global_seed: int) -> np.ndarray:
    """The sample order Keras's array adapter makes under the TensorFlow global seed `global_seed`.

    The same ops as Keras (`tf.random.shuffle` of the indices in a `tf.data` function; with
    `shuffle="batch"`, of each batch of indices), with the op seeds TensorFlow would derive, so the global
    seed is read, never set, and no random state outside this pipeline moves.

    Example:
        >>> keras_shuffle_order(6, 4, True, global_seed=0)   # what model.fit uses after set_random_seed(0)
    """
    seed, seed2 = _compat.function_op_seeds(global_seed)

    def shuffle_indices(indices):
        return tf.raw_ops.RandomShuffle(value=indices, seed=seed, seed2=seed2)

    def permutation(_):
        indices = tf.range(num_samples, dtype=tf.int64)
        return indices if shuffle == "batch" else shuffle_indices(indices)

    indices = tf.data.Dataset.range(1).map(permutation)
    if shuffle != "batch":
        return next(iter(indices)).numpy()
    full = (num_samples // batch_size) * batch_size

    def to_batches(order):
        batches = tf.data.Dataset.from_tensor_slices(tf.reshape(order[:full], [-1, batch_size]))
        if full < num_samples:
            batches = batches.concatenate(tf.data.Dataset.from_tensors(order[full:]))
        return batches

    batches = indices.flat_map(to_batches).map(shuffle_indices)
    return np.concatenate([b.numpy() for b in batches]) if num_samples else np.zeros(0, np.int64)
