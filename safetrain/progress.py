"""A tqdm progress bar as a plain Keras callback: per-epoch bars with loss, metrics and RSS.

Works with `SafeTrainer.fit` (which drives it per chunk of steps) and with `model.fit`:

    model.fit(x, y, epochs=5, verbose=0, callbacks=[safetrain.ProgressBar()])

Redraws are throttled (`min_interval` seconds) and logs are converted to Python numbers only when the bar
redraws, so a step never waits on the bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import keras
import numpy as np
from tqdm.auto import tqdm

from safetrain import memory

__all__ = ["ProgressBar", "format_logs"]


def _number(v) -> float | None:
    try:
        return float(np.asarray(v))
    except (TypeError, ValueError):
        return None


def format_logs(logs: Mapping | None, sep: str = " - ") -> str:
    """`loss: 0.1234 - accuracy: 0.9000 - rss_mb: 512.3`: Keras's style, memory keys with one decimal."""
    parts = []
    for k, v in (logs or {}).items():
        f = _number(v)
        if f is None:
            continue
        parts.append(f"{k}: {f:.1f}" if k.endswith("_mb") else f"{k}: {f:.4g}" if abs(f) >= 1e4 else f"{k}: {f:.4f}")
    return sep.join(parts)


class ProgressBar(keras.callbacks.Callback):
    """Progress for fit/evaluate/predict: `verbose=1` a tqdm bar per epoch, `verbose=2` one line per epoch.

    Args:
        verbose: 1 (bar) or 2 (a line per epoch); 0 shows nothing.
        min_interval: seconds between redraws of a bar.
        file: stream to write to (default: `sys.stdout` at the time of writing, as Keras does).

    Example:
        >>> model.fit(x, y, epochs=3, verbose=0, callbacks=[ProgressBar(verbose=1)])
        Epoch 1/3: 100%|██████████| 625/625 [00:01, loss: 0.5120 - rss_mb: 480.2]
    """

    # Per-batch hooks only redraw: SafeTrainer may keep running many steps per call with this callback.
    chunk_safe = True

    def __init__(self, verbose: int = 1, min_interval: float = 0.2, file=None) -> None:
        super().__init__()
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
        self.verbose = verbose
        self.min_interval = float(min_interval)
        self._file = file
        self._bar = None
        self._last_draw = 0.0
        self._t0 = 0.0
        self._in_fit = False
        self._epochs = None
        self._steps = None

    @property
    def file(self):
        return self._file if self._file is not None else sys.stdout

    def _open(self, total, desc):
        self.close()
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        if self.verbose == 1:
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="step",
                file=self.file,
                leave=True,
                dynamic_ncols=True,
                mininterval=self.min_interval,
                smoothing=0.3,
            )

    def close(self) -> None:
        """Close the bar now (the loop calls this after a run, also after an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _advance(self, batch: int, logs, extra_rss: bool = True) -> None:
        bar = self._bar
        if bar is None:
            return
        now = time.perf_counter()
        if now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        bar.n = batch + 1
        shown = dict(logs or {})
        if extra_rss:
            shown["rss_mb"] = memory.rss_mb()
        bar.set_postfix_str(format_logs(shown), refresh=False)
        bar.refresh()

    def _finish(self, logs, prefix: str, steps_done: int | None) -> None:
        elapsed = time.perf_counter() - self._t0
        if self._bar is not None:
            if steps_done is not None:
                if self._bar.total is None or self._bar.total < steps_done:
                    self._bar.total = steps_done
                self._bar.n = steps_done
            self._bar.set_postfix_str(format_logs(logs), refresh=False)
            self.close()
        elif self.verbose == 2:
            rate = f" - {1000 * elapsed / steps_done:.0f}ms/step" if steps_done else ""
            print(f"{prefix} - {elapsed:.1f}s{rate} - {format_logs(logs)}", file=self.file, flush=True)

    # -- fit ------------------------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._epochs = self.params.get("epochs")
        self._steps_seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._steps_seen = 0
        self._steps = self.params.get("steps")
        self._open(self._steps, f"Epoch {epoch + 1}/{self._epochs}")

    def on_train_batch_end(self, batch, logs=None):
        self._steps_seen = batch + 1
        self._advance(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        shown = dict(logs or {})
        shown.setdefault("rss_mb", memory.rss_mb())  # shown, whether or not `memory_logs` put it in the logs
        self._finish(shown, f"Epoch {epoch + 1}/{self._epochs}", self._steps_seen or self._steps)

    def on_train_end(self, logs=None):
        self.close()
        self._in_fit = False

    # -- evaluate / predict (outside fit) ------------------------------------------------------------
    def on_test_begin(self, logs=None):
        if not self._in_fit:
            self._steps_seen = 0
            self._open(self.params.get("steps"), "Evaluate")

    def on_test_batch_end(self, batch, logs=None):
        if not self._in_fit:
            self._steps_seen = batch + 1
            self._advance(batch, logs)

    def on_test_end(self, logs=None):
        if not self._in_fit:
            self._finish(logs, "Evaluate", self._steps_seen)

    def on_predict_begin(self, logs=None):
        self._steps_seen = 0
        self._open(self.params.get("steps"), "Predict")

    def on_predict_batch_end(self, batch, logs=None):
        self._steps_seen = batch + 1
        self._advance(batch, None)

    def on_predict_end(self, logs=None):
        self._finish({}, "Predict", self._steps_seen)
