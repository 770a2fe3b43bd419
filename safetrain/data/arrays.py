"""Array inputs (NumPy, tensors, pandas; nested in lists, tuples or dicts) as `Batches`, with Keras's rules.

Numeric arrays are streamed by default (`streaming.ArrayReader`: read batch by batch, never copied whole);
anything else, or `array_path="graph"`, is copied into TensorFlow once and gathered in the graph, as Keras
does. Also here: `validation_split` and `class_weight`, which only arrays take.

Example:
    >>> b = array_batches(np.zeros((10, 3)), np.zeros((10, 1)), batch_size=4)
    >>> b.num_batches, b.path
    (3, 'stream')
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import backend, tree

from safetrain._compat import array_slicing, data_adapter_utils
from safetrain.data.adapters import kind_of
from safetrain.data.batches import Batches
from safetrain.data.specs import relax_spec
from safetrain.data.streaming import ArrayReader
from safetrain.errors import ConfigurationError
from safetrain.tensors import as_tensors

__all__ = [
    "ARRAY_PATHS",
    "array_batches",
    "check_graph_path_memory",
    "class_weight_to_sample_weight",
    "split_validation",
]


def _nbytes(tree_of_arrays) -> int:
    return sum(int(getattr(a, "nbytes", 0) or 0) for a in tree.flatten(tree_of_arrays) if a is not None)


def _num_samples(tree_of_arrays) -> set[int]:
    return {int(a.shape[0]) for a in tree.flatten(tree_of_arrays) if a is not None}


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


def class_weight_to_sample_weight(y, class_weight: dict) -> np.ndarray:
    """Keras's rule: each sample weighs `class_weight.get(class, 1.0)`, its class the rounded label (the argmax
    of a one-hot row). A class with no key, negative ones included, weighs 1."""
    y_np = np.asarray(keras.ops.convert_to_numpy(y))
    if y_np.ndim > 1:
        y_np = np.argmax(y_np, axis=-1) if y_np.shape[-1] != 1 else np.squeeze(y_np, axis=-1)
    classes, index = np.unique(np.round(y_np).astype(np.int64), return_inverse=True)
    # One lookup per class, not per sample; `dict.get` matches a key 1.0 to class 1 as Keras's lookup does.
    table = np.array([class_weight.get(int(c), 1.0) for c in classes], dtype=backend.floatx())
    return table[index.reshape(-1)]


def check_class_weight(class_weight, kind: str = "arrays"):
    """Keys that Keras would silently never match (strings, 0.5, True) are refused; so is `{}` for a dataset,
    generator or PyDataset, which Keras's adapters fail on with "max() arg is an empty sequence"."""
    if class_weight is None:
        return
    if not isinstance(class_weight, dict):
        raise TypeError(f"`class_weight` must be a dict mapping class index to weight, got {class_weight!r}.")
    if not class_weight and kind != "arrays":
        raise ValueError(f"`class_weight` must not be empty when `x` is a {kind}; pass None for no class weights.")
    for k in class_weight:
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or not float(k).is_integer():
            raise ValueError(
                f"`class_weight` keys must be class indices (integers), got key {k!r}, which no label can match."
            )


def array_batches(
    x,
    y=None,
    sample_weight=None,
    batch_size: int | None = None,
    shuffle: bool | str = False,
    class_weight: dict | None = None,
    steps: int | None = None,
    seed: int = 0,
    keras_order: bool = False,
    what: str = "fit",
    array_path: str = "auto",
) -> Batches:
    """Batches of arrays: lengths checked, `class_weight` turned into sample weights, streamed or copied."""
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
    if shuffle is None:
        shuffle = False  # model.fit reads None as False
    if shuffle not in (True, False, "batch"):
        raise ValueError(f"`shuffle` must be True, False or 'batch', got {shuffle!r}.")
    # 1, 0 and NumPy booleans as the bools they stand for: `Batches` tests `shuffle is True`.
    shuffle = "batch" if isinstance(shuffle, str) else bool(shuffle)
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
