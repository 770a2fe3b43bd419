"""Memory readings, the one slope, and the census of live objects by the bytes they hold (no TensorFlow import).

Example:
    >>> before = census(); grow(); after = census()
    >>> census_growth(before, after)[0]          # (bytes, count, type name), largest first
    (104857600, 100, 'EagerTensor')
"""

from __future__ import annotations

import collections
import gc
import itertools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["read_memory", "PeakMemory", "slope", "census", "census_growth"]

_TENSOR_TYPES = frozenset({"EagerTensor", "ResourceVariable", "UninitializedVariable"})
# Tracked objects whose own size can grow with what they hold; other objects' own sizes are small and fixed.
_CONTAINERS = (list, dict, set, frozenset, tuple, collections.deque)

# -- memory readings -----------------------------------------------------------------------------------------

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def read_memory() -> tuple[float, float]:
    """(resident, anonymous resident) memory of this process in MiB, from one read of `/proc/self/statm`.

    Anonymous memory (RSS less file-backed and shared pages) is what leaks are made of; RSS also wanders with
    the page cache of files read or mapped. Where there is no `/proc`, both are psutil's RSS.

    Example:
        >>> rss, anon = read_memory()
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]), int(fields[2])
        return resident * _PAGE_MB, (resident - shared) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
        return rss, rss


def _status_kib(*keys: str) -> dict[str, int] | None:
    """Fields of `/proc/self/status` in KiB (None where there is no `/proc`)."""
    try:
        with open("/proc/self/status", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out if len(out) == len(keys) else None


class PeakMemory:
    """The peak anonymous memory (MiB) of this process during a block, short spikes included.

    The kernel's high-water mark of resident memory is reset on entry (`/proc/self/clear_refs`); on exit the
    peak is that mark less the file-backed and shared pages resident then (which a training step does not
    make). Where the mark cannot be reset, a thread reads anonymous memory every `interval` seconds instead.
    Either way the peak is at least the anonymous memory on entry and on exit.

    Example:
        >>> with PeakMemory() as peak:
        ...     model.train_on_batch(x, y)
        >>> peak.mb
        812.4
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.mb = 0.0
        self.exact = False  # True: from the kernel's reset high-water mark, not from samples
        self._thread: Any = None
        self._stop: Any = None

    def __enter__(self) -> PeakMemory:
        self.mb = read_memory()[1]
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM, the peak resident set size
            self.exact = _status_kib("VmHWM", "RssFile", "RssShmem") is not None
        except OSError:
            self.exact = False
        if not self.exact:
            import threading

            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(self.interval):
                    self.mb = max(self.mb, read_memory()[1])

            self._thread = threading.Thread(target=sample, name="safetrain-peak", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.mb = max(self.mb, read_memory()[1])
        if self.exact:
            status = _status_kib("VmHWM", "RssFile", "RssShmem")
            if status is not None:
                self.mb = max(self.mb, (status["VmHWM"] - status["RssFile"] - status["RssShmem"]) / 1024)


def slope(values: Sequence[float], xs: Sequence[float] | None = None) -> float:
    """Least-squares slope of `values` against `xs` (default 0, 1, 2, ...); NaN with fewer than 2 points.

    Example:
        >>> slope([500, 502, 504])
        2.0
    """
    n = len(values)
    if n < 2:
        return float("nan")
    x = list(range(n)) if xs is None else [float(v) for v in xs]
    mean_x, mean_y = sum(x) / n, sum(values) / n
    var = sum((a - mean_x) ** 2 for a in x)
    if var == 0:
        return float("nan")
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(x, values)) / var


# -- the census -------------------------------------------------------------------------------------------


def _buffer_bytes(o: Any) -> int:
    """Bytes a tensor or variable holds (its buffer, not its Python object); 0 if it cannot tell."""
    try:
        n = o.shape.num_elements()
        return int(n * o.dtype.size) if n is not None else 0
    except Exception:  # a tensor whose buffer is gone, a symbolic one: nothing held here
        return 0


def census() -> dict[str, tuple[int, int]]:
    """Live objects by type, `{type name: (count, bytes held)}`, in a few tenths of a second.

    Objects come from `gc.get_objects()`, and of what they hold, the buffers the collector does not track
    (NumPy arrays, bytes, bytearrays). Bytes are what an object holds: a NumPy array its data (a view: the
    array it views), an `EagerTensor` or `ResourceVariable` its buffer (shape x dtype size), a container
    (list, dict, set, tuple, deque) `sys.getsizeof`; other objects count, with 0 bytes (their own size is
    small and fixed; what they hold is counted where it lives). Strings are not looked for among referents
    (there are hundreds of thousands of names). Needs neither TensorFlow nor NumPy imported; counts them
    when they are.

    Example:
        >>> census()["EagerTensor"]
        (1200, 104857600)
    """
    np = sys.modules.get("numpy")
    ndarray = np.ndarray if np is not None else None
    buffers: set[type] = {bytes, bytearray}
    if np is not None:
        buffers |= {np.ndarray, np.memmap}
    objects = gc.get_objects()
    getsizeof = sys.getsizeof
    # Counts, and the selections below, run at C speed (map, Counter, compress): a third of a second at most.
    count = collections.Counter(map(type, objects))
    size = dict.fromkeys(count, 0)
    containers = {t for t in count if issubclass(t, _CONTAINERS)}
    tensors = {t for t in count if t.__name__ in _TENSOR_TYPES}
    for o in itertools.compress(objects, map(containers.__contains__, map(type, objects))):
        size[type(o)] += getsizeof(o, 0)
    for o in itertools.compress(objects, map(tensors.__contains__, map(type, objects))):
        size[type(o)] += _buffer_bytes(o)
    held = live_buffers(objects, buffers)
    del objects
    for r in held.values():
        t = type(r)
        count[t] += 1
        size[t] = size.get(t, 0) + (
            _array_bytes(r) if ndarray is not None and isinstance(r, ndarray) else getsizeof(r, 0)
        )
    return {t.__name__: (n, size.get(t, 0)) for t, n in count.items()}


def live_buffers(objects: list, buffers: set[type], untracked_out: dict[int, Any] | None = None) -> dict[int, Any]:
    """The objects of `buffers` types (untracked by the collector: NumPy arrays, bytes) that `objects` refer
    to, directly or through a tuple or dict the collector does not track (given `untracked_out`, those
    tuples and dicts are put there, by id), and the arrays their views keep alive, by id."""
    held: dict[int, Any] = {}
    is_buffer = buffers.__contains__
    is_plain = {tuple, dict}.__contains__
    untracked: dict[int, Any] = {}
    for i in range(0, len(objects), 2000):  # in slices: one list of every referent would be ~15 MiB more
        refs = gc.get_referents(*objects[i : i + 2000])
        for r in itertools.compress(refs, map(is_buffer, map(type, refs))):
            held[id(r)] = r
        # A tuple or dict of untracked things only (arrays, numbers, strings) is untracked itself after a
        # collection: `hist.append((pred, label))`, `scores[epoch] = pred`. What it holds is looked for too.
        for r in itertools.compress(refs, map(is_plain, map(type, refs))):
            if not gc.is_tracked(r):
                untracked[id(r)] = r
    plain = list(untracked.values())
    if untracked_out is not None:
        untracked_out.update(untracked)
    untracked.clear()
    for i in range(0, len(plain), 2000):
        refs = gc.get_referents(*plain[i : i + 2000])
        for r in itertools.compress(refs, map(is_buffer, map(type, refs))):
            held[id(r)] = r
    del plain
    np = sys.modules.get("numpy")
    if np is not None:  # the arrays that views keep alive
        for r in list(held.values()):
            base = getattr(r, "base", None) if isinstance(r, np.ndarray) else None
            while isinstance(base, np.ndarray) and id(base) not in held:
                held[id(base)] = base
                base = base.base
    return held


def _array_bytes(a: Any) -> int:
    return int(a.nbytes) if a.base is None else 0  # a view holds nothing of its own; its base is counted


def census_growth(first: Mapping[str, Sequence[int]], last: Mapping[str, Sequence[int]]) -> list[tuple[int, int, str]]:
    """Types whose bytes grew from census `first` to `last`: `[(bytes, count, type name)]`, largest first."""
    grew = []
    for name, (count, size) in last.items():
        c0, s0 = first.get(name, (0, 0))
        if size - s0 > 0:
            grew.append((size - s0, count - c0, name))
    grew.sort(reverse=True)
    return grew
