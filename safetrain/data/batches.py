"""`Batches`: one source of batches for `fit`, `evaluate` or `predict`, as a `tf.data.Dataset` per epoch.

Arrays are read by `streaming.ArrayReader` (batch by batch from the user's arrays) or gathered in the graph
from one copy in TensorFlow, in the order of `order.py`; datasets, generators and `PyDataset` come from
Keras's data adapters (`adapters.py`).

Example:
    >>> batches = as_batches(x, y, batch_size=32, shuffle=True, seed=0)
    >>> for batch in batches.dataset(epoch=0): ...
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from keras import tree

from safetrain._compat import array_slicing
from safetrain.data.order import keras_shuffle_order, shuffle_order
from safetrain.data.specs import with_batch_size

__all__ = ["Batches", "with_array_options"]


class Batches:
    """One source of batches for `fit`, `evaluate` or `predict`: a `tf.data.Dataset` per epoch.

    Attributes:
        element_spec: the dataset's element spec with every batch dimension set to `None` (what the
            compiled steps are traced for).
        num_batches: batches per epoch, or `None` when unknown (generators, unknown-cardinality datasets).
        kind: "arrays", "tf.data.Dataset", "generator" or "keras.utils.PyDataset".
    """

    def __init__(
        self,
        kind: str,
        element_spec,
        num_batches: int | None,
        adapter=None,
        dataset=None,
        arrays=None,
        num_samples: int | None = None,
        batch_size: int | None = None,
        shuffle: bool | str = False,
        seed: int = 0,
        keras_order: bool = False,
        reader=None,
    ) -> None:
        self.kind = kind
        self.element_spec = element_spec
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        #: True: `seed` is a TensorFlow global seed and the order is the one `model.fit` uses under it.
        self.keras_order = keras_order
        self._keras_orders: dict = {}
        self._adapter = adapter
        self._dataset = dataset
        self._arrays = arrays
        #: For arrays read batch by batch from the user's own arrays (`streaming.ArrayReader`), else None.
        self.reader = reader
        self._data = None
        self._pipeline: tf.data.Dataset | None = None  # the pipeline of a fixed order, built once
        self._step_spec = None

    @property
    def step_spec(self):
        """The spec the compiled steps are traced for: the batch size `model.fit` traces with.

        Keras traces its step for the element spec of its pipeline: a fixed batch size when every batch of a
        pass has it (arrays whose samples divide into batches; a dataset batched with `drop_remainder=True`),
        else `None`. TensorFlow compiles some kernels (convolutions, normalization) differently for a known
        batch size, and training amplifies the difference (measured: Conv1D + BatchNormalization, 256 samples
        in batches of 32: `val_loss` 1.8e-5 off in epoch 1, 5.7e-3 by epoch 6 when traced with `None`). So
        steps are traced for the same spec; a later pass with other batch sizes relaxes it (one more trace).
        """
        if self._step_spec is None:
            spec = self.element_spec
            if isinstance(self._dataset, tf.data.Dataset):
                spec = self._dataset.element_spec
            elif self.num_samples and self.batch_size and self.num_samples % self.batch_size == 0:
                spec = with_batch_size(spec, self.batch_size)
            self._step_spec = spec
        return self._step_spec

    @property
    def path(self) -> str:
        """How arrays reach the steps: "stream" (read batch by batch from the user's arrays), "graph" (copied
        into TensorFlow whole, gathered in the graph), or "adapter" (datasets, generators, PyDataset)."""
        return "stream" if self.reader is not None else "graph" if self._arrays is not None else "adapter"

    def describe(self) -> str:
        """One line on the input: its kind, size, batches and how it is read."""
        head = f"{self.kind}: {self.num_batches} batches"
        if self.reader is not None:
            return f"{head} of {self.batch_size}, {self.reader.describe()}"
        if self._arrays is not None:
            nbytes = sum(
                int(np.prod(a.shape)) * a.dtype.size for a in tree.flatten(self._arrays) if isinstance(a, tf.Tensor)
            )
            return f"{head} of {self.batch_size}, copied into TensorFlow ({nbytes / 2**20:.1f} MiB), gathered in-graph"
        return head

    def dataset(self, epoch: int = 0) -> tf.data.Dataset:
        """The batches of epoch `epoch` (for arrays, shuffled by `(seed, epoch)`)."""
        if self.reader is None and self._arrays is None:
            return self._dataset
        # Arrays: a pipeline per order. Epochs in one fixed order (unshuffled, as every validation pass is, or
        # Keras's order under a global seed) share one: building it is most of what a short pass costs. A
        # shuffled epoch's pipeline is not kept (its order, 8 bytes a sample, is in it).
        fixed = not self.shuffle or self.keras_order
        if fixed and self._pipeline is not None:
            return self._pipeline
        if self.reader is not None:
            assert self.batch_size is not None
            if self.shuffle is True:
                self.reader.expect_random_reads()
            order = self.order(epoch) if self.shuffle else None  # None: in turn, read by slices
            ds = with_array_options(self.reader.dataset(order, self.batch_size))
        else:
            ds = self._array_dataset(epoch)
        if fixed:
            self._pipeline = ds
        return ds

    def single_batch(self):
        """For arrays that make one unshuffled batch: that batch, as tensors (a pass over it needs no
        `tf.data` pipeline, whose set-up costs more than the step on a small input); else None."""
        if self.reader is not None and self.num_batches == 1 and not self.shuffle:
            return self.reader.batch(np.arange(self.num_samples, dtype=np.int64))
        if self._arrays is None or self.num_batches != 1 or self.shuffle:
            return None
        if not all(x is None or isinstance(x, tf.Tensor) for x in tree.flatten(self._arrays)):
            return None  # sparse wrappers and the like are sliced by the pipeline
        return self._arrays

    def order(self, epoch: int) -> np.ndarray:
        """Sample order of epoch `epoch` for array inputs: a pure function of `(seed, epoch)`.

        With `keras_order`, the order `model.fit` gives under the TensorFlow global seed `seed` (Keras
        shuffles in a `tf.data` function whose random kernel starts afresh each epoch, so under a global
        seed every epoch has the same order); otherwise a permutation drawn from `(seed, epoch)`.
        """
        n, bs = self.num_samples, self.batch_size
        assert n is not None and bs is not None, "order() is for array inputs"
        if self.shuffle and self.keras_order:
            key = (self.seed, n, bs, self.shuffle)
            if key not in self._keras_orders:
                self._keras_orders = {key: keras_shuffle_order(n, bs, self.shuffle, self.seed)}
            return self._keras_orders[key]
        return shuffle_order(n, bs, self.shuffle, self.seed, epoch)

    def _array_dataset(self, epoch: int) -> tf.data.Dataset:
        n, bs = self.num_samples, self.batch_size
        assert n is not None and bs is not None
        order = self.order(epoch)
        full = (n // bs) * bs
        index_batches = tf.data.Dataset.from_tensor_slices(order[:full].reshape(-1, bs))
        if full < n:
            index_batches = index_batches.concatenate(tf.data.Dataset.from_tensors(order[full:]))
        if self._data is None:
            # The arrays enter the pipeline as one dataset element (as in Keras), not as graph constants.
            self._data = tf.data.Dataset.from_tensors(self._arrays).repeat()

        def grab(indices, data):
            def one(a):
                if isinstance(a, array_slicing.TensorflowSparseWrapper):
                    return array_slicing.slice_tensorflow_sparse_wrapper(a, indices)
                if isinstance(a, (list, tuple, dict)):
                    return None
                if tf.is_tensor(a):
                    return tf.gather(a, indices, axis=0)
                return a

            return tree.traverse(one, data)

        ds = tf.data.Dataset.zip((index_batches, self._data)).map(
            grab, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return with_array_options(ds).prefetch(tf.data.AUTOTUNE)

    def on_epoch_begin(self) -> None:
        if self._adapter is not None:
            self._adapter.on_epoch_begin()

    def on_epoch_end(self) -> None:
        if self._adapter is not None:
            self._adapter.on_epoch_end()


def with_array_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
