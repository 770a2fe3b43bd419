"""Memory telemetry: sample process and device memory, keep a per-epoch series, fit its slope.

`MemoryMonitor` is a plain Keras callback, so the same telemetry works with `model.fit`:

    model.fit(x, y, epochs=20, callbacks=[safetrain.MemoryMonitor()])
    # History.history["rss_mb"] now holds resident memory after every epoch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras

from safetrain.diagnostics import read_memory
from safetrain.diagnostics import slope as diagnostics_slope

__all__ = [
    "MemorySample",
    "MemoryLog",
    "MemoryMonitor",
    "sample",
    "rss_mb",
    "anon_mb",
    "device_memory_mb",
    "slope",
    "trim_malloc",
]

_MIB = 2.0**20
_GPU_NAMES: list[str] | None = None


def rss_mb() -> float:
    """Resident set size of this process in MiB (`safetrain.diagnostics.read_memory`, the doctor's reader)."""
    return read_memory()[0]


def anon_mb() -> float:
    """Anonymous resident memory of this process in MiB (Linux `RssAnon`: heap and stacks, not the page cache
    of files read or mapped, which makes RSS wander with I/O); RSS where the kernel does not report it.

    Example:
        >>> before = anon_mb(); train(); print(f"{anon_mb() - before:+.1f} MiB")
    """
    return read_memory()[1]


def _gpu_names() -> list[str]:
    global _GPU_NAMES
    if _GPU_NAMES is None:
        import tensorflow as tf

        _GPU_NAMES = [d.name for d in tf.config.list_logical_devices("GPU")]
    return _GPU_NAMES


def device_memory_mb() -> tuple[float, float] | None:
    """`(current, peak)` device memory in MiB summed over the GPUs TensorFlow sees, or None without GPUs."""
    names = _gpu_names()
    if not names:
        return None
    import tensorflow as tf

    current = peak = 0.0
    for name in names:
        info = tf.config.experimental.get_memory_info(name)
        current += info["current"] / _MIB
        peak += info["peak"] / _MIB
    return current, peak


@dataclasses.dataclass(frozen=True)
class MemorySample:
    """One memory reading: RSS, device memory (None without a GPU), trace counts and when."""

    epoch: int | None
    rss_mb: float
    device_mb: float | None = None
    device_peak_mb: float | None = None
    traces: Mapping[str, int] | None = None
    time: float = 0.0
    # In a multi-worker run: each worker's RSS, in worker order (`rss_mb` is then their maximum).
    worker_rss_mb: tuple[float, ...] | None = None
    # The trainer's global step when read (set for samples taken between `train_on_batch` calls).
    step: int | None = None

    def as_logs(self) -> dict[str, float]:
        """The keys this sample adds to Keras epoch logs (`rss_mb`, and `device_mb`/`device_peak_mb` on GPU)."""
        logs = {"rss_mb": self.rss_mb}
        if self.device_mb is not None and self.device_peak_mb is not None:
            logs["device_mb"] = self.device_mb
            logs["device_peak_mb"] = self.device_peak_mb
        return logs


def sample(epoch: int | None = None, traces: Mapping[str, int] | None = None) -> MemorySample:
    """Read memory now.

    Example:
        >>> s = safetrain.memory.sample()
        >>> s.rss_mb > 0
        True
    """
    device = device_memory_mb()
    return MemorySample(
        epoch=epoch,
        rss_mb=rss_mb(),
        device_mb=None if device is None else device[0],
        device_peak_mb=None if device is None else device[1],
        traces=dict(traces) if traces is not None else None,
        time=time.time(),
    )


def slope(values: Sequence[float], xs: Sequence[float] | None = None) -> float:
    """Least-squares slope of `values` against `xs` (default 0, 1, 2, ...); NaN with fewer than 2 points.

    The one slope of the package (`safetrain.diagnostics.slope`), here for the memory log's users.
    """
    return diagnostics_slope(values, xs)


class MemoryLog:
    """The memory series of a run, one `MemorySample` per epoch, with its growth slope.

    Example:
        >>> trainer.fit(x, y, epochs=30)
        >>> trainer.memory.slope()          # MiB per epoch, after a 3-epoch warm-up
        0.02
        >>> trainer.memory.series("rss_mb")[-1]
        612.4
    """

    def __init__(self, samples: Sequence[MemorySample] = ()) -> None:
        self.samples: list[MemorySample] = list(samples)

    def append(self, s: MemorySample) -> None:
        self.samples.append(s)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[MemorySample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> MemorySample:
        return self.samples[i]

    def series(self, key: str = "rss_mb") -> list[float]:
        """Values of one field (`rss_mb`, `device_mb`, `device_peak_mb`) in order, skipping missing ones."""
        return [getattr(s, key) for s in self.samples if getattr(s, key) is not None]

    def slope(self, key: str = "rss_mb", skip: int = 3) -> float:
        """Growth of `key` in MiB per epoch: least-squares fit after dropping the first `skip` samples.

        The first epochs include tracing and allocator warm-up, hence `skip`. When fewer than two samples
        remain after skipping, all samples are used; with fewer than two in all, the result is NaN.
        """
        values = self.series(key)
        if len(values) - skip >= 2:
            values = values[skip:]
        return slope(values)

    def as_dict(self) -> dict[str, list]:
        """Column-wise copy of the series, for JSON."""
        out: dict[str, list] = {f.name: [] for f in dataclasses.fields(MemorySample)}
        for s in self.samples:
            for k in out:
                v = getattr(s, k)
                out[k].append(dict(v) if isinstance(v, Mapping) else v)
        return out

    def plot(self, path: str, title: str | None = None) -> str:
        """Write a PNG of this log: RSS (and device memory on GPU) per epoch, epochs with new traces marked.

        Needs matplotlib (`pip install "safetrain[plot]"`).

        Example:
            >>> trainer.fit(x, y, epochs=30)
            >>> trainer.memory.plot("memory.png")
            'memory.png'
        """
        from safetrain.plots import plot_memory_log

        return plot_memory_log(self, path, title)

    def __repr__(self) -> str:
        if not self.samples:
            return "MemoryLog([])"
        return (
            f"MemoryLog({len(self)} epochs, rss {self.samples[0].rss_mb:.1f} -> "
            f"{self.samples[-1].rss_mb:.1f} MiB, slope {self.slope():.3f} MiB/epoch)"
        )


class MemoryMonitor(keras.callbacks.Callback):
    """Keras callback that adds `rss_mb` (and `device_mb`, `device_peak_mb` on GPU) to every epoch's logs.

    Put it first in `callbacks` so that later callbacks (CSVLogger, TensorBoard) see the new keys.
    `monitor.log` is the `MemoryLog` of the run.

    Example:
        >>> monitor = safetrain.MemoryMonitor()
        >>> model.fit(x, y, epochs=10, callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
        >>> monitor.log.slope()
    """

    def __init__(
        self, log: MemoryLog | None = None, trace_counts: Callable[[], Mapping[str, int]] | None = None
    ) -> None:
        super().__init__()
        self.log = log if log is not None else MemoryLog()
        self._trace_counts = trace_counts

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        s = sample(epoch, self._trace_counts() if self._trace_counts else None)
        self.log.append(s)
        if logs is not None:
            logs.update(s.as_logs())


_LIBC: Any = None  # the C library (None: not looked up yet; False: no malloc_trim here)
_TRIM_WARNED = False


def trim_malloc(quiet: bool = False) -> bool:
    """Return freed heap memory to the OS with glibc's `malloc_trim(0)`; False (and, unless `quiet`, one
    warning) elsewhere."""
    global _LIBC, _TRIM_WARNED
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if not _LIBC:
        if not _TRIM_WARNED and not quiet:
            _TRIM_WARNED = True
            warnings.warn(
                f"TrimMalloc: malloc_trim is only available with glibc; it does nothing on {sys.platform}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    _LIBC.malloc_trim(0)
    return True
