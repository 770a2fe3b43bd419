"""Arrays read batch by batch from the user's own arrays: memory that does not grow with the data.

    reader = ArrayReader.of((x, y, None))          # None when some leaf cannot be streamed
    dataset = reader.dataset(order, batch_size)    # batches in `order` (None: in turn), read as they are needed

The in-graph path (`tf.convert_to_tensor` on the whole array, then `tf.gather`) copies the data into
TensorFlow, and peaks at two copies while it converts; a memory-mapped file is read into memory whole. Here
each batch's rows are read from the NumPy array (in RAM or memory-mapped) by a `tf.numpy_function`, several
batches per call (up to `GROUP`: one Python call per 16 small batches keeps the per-batch cost below the
in-graph gather's), rows in sorted order (a memory map reads near-sequentially), then put back in the batch's
order and converted as `fit` converts arrays (floats to `floatx`). What is read ahead is bounded in bytes
(`READ_AHEAD_BYTES`, see `read_ahead`), whatever a row weighs.
"""

from __future__ import annotations

import mmap
import weakref
from typing import Any

import numpy as np
import tensorflow as tf
from keras import backend, tree

from safetrain import _compat

__all__ = ["ArrayReader", "GROUP", "READ_AHEAD_BYTES", "read_ahead", "streamable"]

#: Most batches read per Python call (one call per 16 batches keeps the per-batch cost below the in-graph
#: gather's for small rows).
GROUP = 16
#: Bytes of batches read ahead (being read or waiting), whatever a batch weighs. Measured (2-epoch fits, fresh
#: processes): with 16 batches per call, 2 calls in flight and 2 waiting for any batch size, a float32
#: 128x128x3 batch of 256 (48 MiB) added +1180 MiB; one batch per call, +291. For 12 MiB batches (float32
#: 128x128x3, 64), budgets of 16, 32, 64 and 128 MiB added +183, +179, +205, +481 MiB; 32 MiB (2 calls of 16
#: 1 MiB batches, none waiting) cut 4 KiB rows from 1075-1099 to 784-792 steps/s, so 64: 16 batches of 1 MiB
#: per call, 2 calls in flight and 2 waiting, as before.
READ_AHEAD_BYTES = 64 * 2**20


def read_ahead(batch_bytes: int, limit: int = READ_AHEAD_BYTES) -> tuple[int, int, int]:
    """(batches per Python call, calls in flight, calls waiting) for batches of `batch_bytes` bytes as produced:
    four calls' batches fit in `limit` (`READ_AHEAD_BYTES`) where they can, and at least one batch is read while
    a step runs (`limit=0`: one batch at a time, one call in flight, the least a pipeline holds).

    Example:
        >>> read_ahead(2**20)          # 4 KiB rows, batch 256: 16 batches per call, 2 in flight, 2 waiting
        (16, 2, 2)
        >>> read_ahead(48 * 2**20)     # float32 128x128x3, batch 256: one batch at a time
        (1, 1, 0)
    """
    batch_bytes = max(1, batch_bytes)
    group = max(1, min(GROUP, limit // (4 * batch_bytes)))
    calls = max(1, min(4, limit // (group * batch_bytes)))
    return group, min(2, calls), calls - min(2, calls)


def _as_numpy(a):
    """What rows are read from: NumPy arrays as they are, a NumPy view of a pandas object (no copy when its
    columns share one dtype), and array-likes that slice like NumPy (`h5py.Dataset`-style: `shape`, `dtype`,
    `len()` and indexing by a sorted index array) as they are; None for anything else."""
    if isinstance(a, np.ndarray):
        return a
    to_numpy = getattr(a, "to_numpy", None)
    if callable(to_numpy) and type(a).__module__.startswith("pandas"):
        return to_numpy()
    if tf.is_tensor(a) or not all(hasattr(a, name) for name in ("shape", "dtype", "__len__", "__getitem__")):
        return None
    return a if isinstance(a.dtype, np.dtype) else None


def streamable(leaf) -> bool:
    """Can this leaf be read batch by batch: a numeric NumPy array (also `np.memmap`), a pandas object, or an
    array-like that slices like NumPy (an `h5py.Dataset`)."""
    if leaf is None:
        return True
    a = _as_numpy(leaf)
    return a is not None and len(a.shape) >= 1 and a.dtype.kind in "biuf"


def _out_dtype(a: np.ndarray) -> np.dtype:
    return np.dtype(backend.floatx()) if a.dtype.kind == "f" else a.dtype


#: In a `tf.data` pipeline, TensorFlow takes a NumPy array that a `tf.numpy_function` returns as it is when the
#: array starts on this boundary (Eigen's alignment), and copies any other (checked in tests/test_streaming.py).
#: Reads go into such arrays, so a batch is held once, not twice while it converts. Reader alone, 3 shuffled
#: passes, peak RssAnon: float32 224x224x3 batches of 256 +327 -> +192 MiB, float32 128x128x3 batches of 64
#: +200 -> +136, uint8 224x224x3 batches of 128 +229 -> +134.
ALIGNMENT = 64


def _aligned(shape: tuple, dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _take(source, indices: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`source[indices]` as `dtype`, in one copy (one more to convert), into an aligned array."""
    out = _aligned((len(indices), *source.shape[1:]), dtype)
    if isinstance(source, np.ndarray) and source.dtype == dtype:
        np.take(source, indices, axis=0, out=out, mode="clip")  # "raise" would gather into a temporary first
    else:
        np.copyto(out, source[indices], casting="unsafe")
    return out


def _copy(source, dtype: np.dtype) -> np.ndarray:
    """`source` (rows read by a slice) as `dtype`, in one copy, into an aligned array."""
    out = _aligned(source.shape, dtype)
    np.copyto(out, source, casting="unsafe")
    return out


def keep_with(dataset: tf.data.Dataset, objects: list) -> tf.data.Dataset:
    """`dataset`, holding `objects` (the Python functions its pipeline calls) for as long as it lives, and no
    longer: see `_compat.python_functions_made` (whose list may still be filled after this call)."""
    weakref.finalize(dataset, objects.clear)
    return dataset


class ArrayReader:
    """Reads batches of rows from a structure of arrays (`(x, y, sample_weight)` as Keras packs it).

    Attributes:
        nbytes: the size of the arrays (what the in-graph path would copy into TensorFlow).
        spec: the element spec of one batch (batch dimension `None`), as the in-graph path gives it.
        num_samples: rows in each array.
    """

    def __init__(self, structure) -> None:
        self.structure = tree.lists_to_tuples(structure)
        flat = tree.flatten(self.structure)
        self._slots = [i for i, a in enumerate(flat) if a is not None]
        self.arrays = [_as_numpy(flat[i]) for i in self._slots]
        self.dtypes = [_out_dtype(a) for a in self.arrays]
        self.nbytes = int(sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self.arrays))
        self.num_samples = int(self.arrays[0].shape[0])
        self._in_ram = [self.in_ram(a) for a in self.arrays]  # gathered in one go; the others in sorted order
        self._flat_template = flat
        #: bytes read ahead of the step (see `read_ahead`); a memory budget may lower it
        self.read_ahead_bytes = READ_AHEAD_BYTES
        specs = list(flat)
        for slot, a, dt in zip(self._slots, self.arrays, self.dtypes):
            specs[slot] = tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(dt))
        self.spec = tree.pack_sequence_as(self.structure, specs)

    @classmethod
    def of(cls, structure) -> ArrayReader | None:
        """A reader for `structure`, or None when some leaf cannot be streamed (tensors, strings, sparse)."""
        flat = tree.flatten(tree.lists_to_tuples(structure))
        if not any(a is not None for a in flat) or not all(streamable(a) for a in flat):
            return None
        return cls(structure)

    @property
    def in_memory_map(self) -> bool:
        return any(isinstance(a, np.memmap) or isinstance(getattr(a, "base", None), np.memmap) for a in self.arrays)

    def expect_random_reads(self) -> None:
        """Shuffled passes read rows scattered over the arrays: memory maps are told so (no readahead)."""
        for a in self.arrays:
            if isinstance(a, np.memmap) or isinstance(getattr(a, "base", None), np.memmap):
                _compat.advise_random_access(a)

    def read_slice(self, start: int, stop: int) -> list[np.ndarray]:
        """The rows `start:stop` of every array, converted: one slice each, no fancy indexing."""
        return [_copy(a[start:stop], dt) for a, dt in zip(self.arrays, self.dtypes)]

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        """The rows `indices` (in that order) of every array, converted.

        Arrays in memory are gathered in one go; memory maps and `h5py`-style arrays are read in sorted row
        order (near-sequential on disk; h5py takes only sorted indices) and put back in order (a second copy).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and np.all(indices[1:] - indices[:-1] == 1):
            return self.read_slice(int(indices[0]), int(indices[-1]) + 1)
        if all(self._in_ram):
            return [_take(a, indices, dt) for a, dt in zip(self.arrays, self.dtypes)]
        order = np.argsort(indices, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        ordered = indices[order]
        return [
            _take(a, indices, dt) if in_ram else _take(a[ordered], inverse, dt)
            for a, dt, in_ram in zip(self.arrays, self.dtypes, self._in_ram)
        ]

    @staticmethod
    def in_ram(a) -> bool:
        """A NumPy array whose memory is no memory map (an `np.memmap`, or a view of one or of an `mmap`); not
        an array-like such as an `h5py.Dataset`."""
        if not isinstance(a, np.ndarray):
            return False
        while isinstance(a, np.ndarray):
            if isinstance(a, np.memmap):
                return False
            a = a.base
            if a is None:
                return True
        return not isinstance(a, mmap.mmap)

    def batch(self, indices: np.ndarray):
        """One batch as tensors in the packed structure."""
        flat = list(self._flat_template)
        for slot, values in zip(self._slots, self.read(indices)):
            flat[slot] = tf.convert_to_tensor(values)
        return tree.pack_sequence_as(self.structure, flat)

    def dataset(self, order: np.ndarray | None, batch_size: int) -> tf.data.Dataset:
        """The batches of `order` (sample indices, one epoch; None: every sample in turn), `batch_size` each
        (the last one may be smaller)."""
        n = self.num_samples if order is None else int(order.size)
        row_bytes = sum(int(np.prod(a.shape[1:])) * dt.itemsize for a, dt in zip(self.arrays, self.dtypes))
        group, calls, waiting = read_ahead(batch_size * row_bytes, self.read_ahead_bytes)
        full = (n // batch_size) * batch_size
        grouped = (full // (group * batch_size)) * group * batch_size
        # The pass as pieces (first position, batches, rows per batch): `group` batches each, then the other
        # full batches, then the partial last one. The order stays in NumPy, read by position.
        pieces = [(start, group, batch_size) for start in range(0, grouped, group * batch_size)]
        if full > grouped:
            pieces.append((grouped, (full - grouped) // batch_size, batch_size))
        if n > full:
            pieces.append((full, 1, n - full))
        dtypes = [tf.as_dtype(dt) for dt in self.dtypes]
        row_shapes = [a.shape[1:] for a in self.arrays]
        lead = [None, None] if group > 1 else [None]  # one batch per call: no group dimension, no `unbatch`

        def read_piece(piece: np.ndarray):
            start, batches, rows = (int(v) for v in piece)
            stop = start + batches * rows
            values = self.read_slice(start, stop) if order is None else self.read(order[start:stop])
            return [v.reshape(*[batches, rows][-len(lead) :], *shape) for v, shape in zip(values, row_shapes)]

        def read(piece):
            values = tf.numpy_function(read_piece, [piece], dtypes, stateful=False)
            flat: list[Any] = list(self._flat_template)
            for slot, v, shape in zip(self._slots, values, row_shapes):
                flat[slot] = tf.ensure_shape(v, [*lead, *shape])
            return tree.pack_sequence_as(self.structure, flat)

        # One traced function per pass, and no AutoGraph (plain Python): building the pipeline is most of what a
        # short pass costs (25 ms with the indices as a tensor and a second map to pack the structure after
        # `unbatch`, 13 ms like this).
        read = tf.autograph.experimental.do_not_convert(read)
        positions = tf.data.Dataset.from_tensor_slices(np.array(pieces, dtype=np.int64).reshape(-1, 3))
        with _compat.python_functions_made() as made:  # `read_piece` holds this reader and the pass's order
            ds = positions.map(read, num_parallel_calls=calls, deterministic=True)
        ds = ds.prefetch(waiting) if waiting else ds
        return keep_with(ds.unbatch() if group > 1 else ds, made)

    def describe(self) -> str:
        where = "memory-mapped" if self.in_memory_map else "in memory"
        return f"streamed from {len(self.arrays)} NumPy array(s), {self.nbytes / 2**20:.1f} MiB {where}"
