"""Turn what users pass to `fit` into one batched, prefetched `tf.data` pipeline with a fixed element spec.

Arrays (NumPy, tensors, pandas; nested in lists, tuples or dicts) get safetrain's own pipeline: it is the
same gather-by-index pipeline Keras uses, and the shuffle order of epoch `e` is a pure function of its seed
and `e`, so a run can be re-created exactly (re-hydration, resume): under a TensorFlow global seed (as
`keras.utils.set_random_seed` sets) it is the order `model.fit` uses, otherwise one drawn from `(seed, e)`.
Datasets, generators and `keras.utils.PyDataset` go through Keras's own data adapters, so they behave as
they do in `model.fit`.

Example:
    >>> batches = safetrain.data.as_batches(x, y, batch_size=32, shuffle=True, seed=0)
    >>> batches.num_batches, batches.element_spec
    (625, (TensorSpec(shape=(None, 32), ...), TensorSpec(shape=(None, 1), ...)))
    >>> for batch in batches.dataset(epoch=0): ...
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import backend, tree
from keras.utils import PyDataset, unpack_x_y_sample_weight

from safetrain import _compat
from safetrain._compat import array_slicing, can_convert_arrays, data_adapter_utils, get_data_adapter
from safetrain.errors import ConfigurationError
from safetrain.streaming import ArrayReader
from safetrain.tensors import as_tensors

__all__ = ["Batches", "as_batches", "relax_spec", "split_validation", "describe_spec"]

_ACCEPTED = (
    "NumPy arrays or tensors (or lists/tuples/dicts of them), a tf.data.Dataset, "
    "a Python generator or a keras.utils.PyDataset"
)


def _is_dataset(x) -> bool:
    return isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset))


def kind_of(x) -> str:
    """ "arrays", "tf.data.Dataset", "keras.utils.PyDataset" or "generator": how `x` will be read."""
    if _is_dataset(x):
        return "tf.data.Dataset"
    if isinstance(x, PyDataset):
        return "keras.utils.PyDataset"
    if isinstance(x, types.GeneratorType):
        return "generator"
    return "arrays"


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


def describe_spec(spec) -> str:
    """A short human-readable rendering of an element spec, for error messages."""

    def one(s):
        if hasattr(s, "shape") and hasattr(s, "dtype"):
            return f"{s.dtype.name}{list(s.shape.as_list()) if s.shape.rank is not None else '[?]'}"
        return type(s).__name__

    return str(tf.nest.map_structure(one, spec))


def _check_batch_size(batch_size, name="batch_size"):
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be a positive integer or None, got {batch_size!r} (type {type(batch_size).__name__})."
        )
    if batch_size <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {batch_size}.")


def _nbytes(tree_of_arrays) -> int:
    return sum(int(getattr(a, "nbytes", 0) or 0) for a in tree.flatten(tree_of_arrays) if a is not None)


def _num_samples(tree_of_arrays) -> set[int]:
    return {int(a.shape[0]) for a in tree.flatten(tree_of_arrays) if a is not None}


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
            ds = _with_array_options(self.reader.dataset(order, self.batch_size))
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
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        if self.keras_order:
            key = (self.seed, n, bs, self.shuffle)
            if key not in self._keras_orders:
                self._keras_orders = {key: keras_shuffle_order(n, bs, self.shuffle, self.seed)}
            return self._keras_orders[key]
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle == "batch":
            # Keras's "batch" shuffle: batches keep their samples, the order inside each batch is shuffled.
            return np.concatenate(
                [rng.permutation(np.arange(i, min(i + bs, n), dtype=np.int64)) for i in range(0, n, bs)]
            )
        return rng.permutation(n).astype(np.int64)

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
        return _with_array_options(ds).prefetch(tf.data.AUTOTUNE)

    def on_epoch_begin(self) -> None:
        if self._adapter is not None:
            self._adapter.on_epoch_begin()

    def on_epoch_end(self) -> None:
        if self._adapter is not None:
            self._adapter.on_epoch_end()


def _with_array_options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


ARRAY_PATHS = ("auto", "stream", "graph")


def check_graph_path_memory(nbytes: int, what: str) -> None:
    """Before copying arrays into TensorFlow: refuse when the copy (two at its peak) exceeds available memory."""
    import psutil

    available = psutil.virtual_memory().available
    if 2 * nbytes > available:
        raise ConfigurationError(
            f"{what}: copying the arrays into TensorFlow (array_path='graph') needs about {2 * nbytes / 2**30:.1f} "
            f"GiB at its peak ({nbytes / 2**30:.1f} GiB of data, twice while it converts), but "
            f"{available / 2**30:.1f} GiB is available. Use array_path='auto' or 'stream' (batches are read "
            "from your arrays as needed), or a smaller input."
        )


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


def class_weight_to_sample_weight(y, class_weight: dict) -> np.ndarray:
    y_np = np.asarray(keras.ops.convert_to_numpy(y))
    if y_np.ndim > 1:
        y_np = np.argmax(y_np, axis=-1) if y_np.shape[-1] != 1 else np.squeeze(y_np, axis=-1)
    classes = np.round(y_np).astype(np.int64)
    table_size = max(int(classes.max(initial=0)), max(int(k) for k in class_weight)) + 1
    table = np.ones(table_size, dtype=backend.floatx())
    for k, v in class_weight.items():
        table[int(k)] = v
    return table[classes]


def _check_class_weight(class_weight):
    if class_weight is None:
        return
    if not isinstance(class_weight, dict) or not class_weight:
        raise TypeError(f"`class_weight` must be a non-empty dict mapping class index to weight, got {class_weight!r}.")
    for k in class_weight:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"`class_weight` keys must be non-negative class indices, got key {k!r}.")


def _array_batches(
    x, y, sample_weight, batch_size, shuffle, class_weight, steps, seed, keras_order, what, array_path="auto"
) -> Batches:
    if class_weight is not None:
        if sample_weight is not None:
            raise ValueError("`class_weight` and `sample_weight` cannot both be given; pass one.")
        if y is None:
            raise ValueError("`class_weight` needs targets `y`.")
        if tree.is_nested(y):
            raise ValueError(
                "`class_weight` is only supported for models with a single output "
                "(`y` is nested); pass `sample_weight` per output instead."
            )
    if sample_weight is not None and tree.is_nested(y) and not tree.is_nested(sample_weight):
        sw = np.asarray(sample_weight)
        if not (sw.ndim == 1 or (sw.ndim == 2 and sw.shape[1] == 1)):
            raise ValueError(
                "With several outputs, a single `sample_weight` array must have one weight per "
                f"sample (shape (num_samples,)), got shape {sw.shape}."
            )
        sample_weight = tree.map_structure(lambda _: sample_weight, y)
    sizes = {
        name: _num_samples(v) for name, v in (("x", x), ("y", y), ("sample_weight", sample_weight)) if v is not None
    }
    all_sizes = set().union(*sizes.values()) if sizes else set()
    if len(all_sizes) > 1:
        detail = ", ".join(f"`{k}` has {sorted(v) if len(v) > 1 else next(iter(v))} samples" for k, v in sizes.items())
        raise ValueError(f"{what}: inputs must all have the same number of samples, but {detail}.")
    if not all_sizes:
        raise ValueError(f"{what}: `x` holds no arrays.")
    n = all_sizes.pop()
    if n == 0:
        raise ValueError(f"{what}: `x` is empty (0 samples); there is nothing to iterate over.")
    if class_weight is not None:
        sample_weight = class_weight_to_sample_weight(y, class_weight)
    if not batch_size:
        batch_size = int(math.ceil(n / steps)) if steps else 32
    if shuffle not in (True, False, "batch"):
        raise ValueError(f"`shuffle` must be True, False or 'batch', got {shuffle!r}.")
    reader = None
    if array_path != "graph":
        reader = ArrayReader.of(data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight))
        if reader is None and array_path == "stream":
            raise ConfigurationError(
                f"{what}: array_path='stream' reads numeric NumPy arrays (also memory-mapped) or pandas objects; "
                "this input holds tensors, strings or sparse data. Use array_path='auto' or 'graph'."
            )
    if reader is not None:
        arrays, spec = None, reader.spec
    else:
        check_graph_path_memory(_nbytes((x, y, sample_weight)), what)
        arrays, spec = as_tensors(x, y, sample_weight)
    return Batches(
        "arrays",
        relax_spec(spec),
        int(math.ceil(n / batch_size)),
        arrays=arrays,
        reader=reader,
        num_samples=n,
        batch_size=int(batch_size),
        shuffle=shuffle,
        seed=seed,
        keras_order=keras_order,
    )


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
    or `batch_size` given with a dataset/generator/PyDataset, `batch_size <= 0`, arrays of different
    lengths, empty data, `class_weight` with `sample_weight`.

    Example:
        >>> b = as_batches(np.zeros((10, 3)), np.zeros((10, 1)), batch_size=4)
        >>> b.num_batches
        3
    """
    _check_batch_size(batch_size)
    _check_class_weight(class_weight)
    if x is None:
        raise ValueError(f"{what}: `x` is required ({_ACCEPTED}).")
    kind = kind_of(x)
    if kind == "arrays":
        streamable = array_path != "graph" and ArrayReader.of((x, y, sample_weight)) is not None
        if not streamable and not can_convert_arrays((x, y, sample_weight)):
            bad = [
                type(a).__name__ for a in tree.flatten((x, y, sample_weight)) if not array_slicing.can_slice_array(a)
            ]
            raise TypeError(f"{what}: `x` must be {_ACCEPTED}; got unsupported type(s) {sorted(set(bad))}.")
        if array_path not in ARRAY_PATHS:
            raise ValueError(f"`array_path` must be one of {ARRAY_PATHS}, got {array_path!r}.")
        return _array_batches(
            x, y, sample_weight, batch_size, shuffle, class_weight, steps, seed, keras_order, what, array_path
        )

    for name, value in (("y", y), ("sample_weight", sample_weight)):
        if value is not None:
            raise ValueError(
                f"{what}: `{name}` must be None when `x` is a {kind}; the {kind} itself must "
                f"yield `(x, y)` or `(x, y, sample_weight)`."
            )
    if batch_size is not None:
        raise ValueError(
            f"{what}: `batch_size` must be None when `x` is a {kind}: it already yields "
            f"batches (got batch_size={batch_size})."
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
            dataset = adapter.get_tf_dataset()
        except ValueError as e:
            raise ValueError(f"{what}: invalid `x` ({kind}): {e}") from e
    num_batches = adapter.num_batches
    if num_batches is not None and num_batches < 0:
        num_batches = None
    if num_batches == 0:
        raise ValueError(f"{what}: `x` ({kind}) yields no batches.")
    return Batches(kind, relax_spec(dataset.element_spec), num_batches, adapter=adapter, dataset=dataset, seed=seed)


def split_validation(x, y, sample_weight, validation_split: float):
    """Keras's `validation_split`: the last `validation_split` fraction of the arrays becomes validation data.

    Returns `((x, y, sample_weight), (val_x, val_y, val_sample_weight))`.
    """
    if (
        isinstance(validation_split, bool)
        or not isinstance(validation_split, (float, int))
        or not 0.0 <= validation_split < 1.0
    ):
        raise ValueError(f"`validation_split` must be a float in [0, 1), got {validation_split!r}.")
    kind = kind_of(x)
    if kind != "arrays":
        raise ValueError(
            f"`validation_split` is only supported for array inputs, not for a {kind}; pass `validation_data` instead."
        )
    try:
        train, val = array_slicing.train_validation_split((x, y, sample_weight), validation_split)
    except ValueError as e:
        raise ValueError(f"`validation_split={validation_split}`: {e}") from e
    return train, val


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
