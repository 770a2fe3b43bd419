"""Preemption: SIGTERM (and Ctrl-C) during `fit` stop training at the next step, save it, and exit cleanly.

    SafeTrainer(model, policies=[Checkpoint("runs/a")]).fit(x, y, epochs=50)
    # kubectl delete pod / scancel / a spot reclaim sends SIGTERM: the step in flight finishes, a checkpoint of
    # that exact step is written, callbacks and policies hear on_train_end, and the process exits with 143.
    # The same command again resumes from it, bit-identical to a run never stopped.

How a signal reaches a step boundary. Python runs signal handlers only between bytecodes of the main thread,
so a handler cannot run while the main thread is inside a compiled chunk of many steps. `signal.set_wakeup_fd`
makes the interpreter's C-level handler write the signal's number to a pipe at once; a watcher thread reading
it sets `stop_flag()`, a `tf.Variable` the training loop's condition reads before each step. The chunk in
flight ends after its current step; the loop sees the request at that boundary, counts every step that ran,
and raises `Interrupted`. Under a distribution strategy, whose loops run a fixed count of steps, the request
is seen at the end of the chunk; in a multi-worker run the workers agree (a collective per chunk) so that all
stop at the same step and save together.

Handlers are installed only in the main thread and only while `fit` runs, and put back after; a handler the
user installed before is called (chained) once training has stopped and saved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import tensorflow as tf

from safetrain import distributed
from safetrain.errors import TrainingPreempted

__all__ = ["Interrupted", "SignalWatch", "stop_flag", "stop_requested", "agreed_signal", "SIGTERM_EXIT"]

#: exit status for SIGTERM (128 + 15), what shells and Kubernetes report for a process stopped by it
SIGTERM_EXIT = 128 + signal.SIGTERM

_flag: tf.Variable | None = None
_active: SignalWatch | None = None


def stop_flag() -> tf.Variable:
    """The process's stop request as a boolean variable (made once, eagerly), read by the training loops."""
    global _flag
    if _flag is None:
        with tf.init_scope():
            _flag = tf.Variable(False, trainable=False, name="safetrain_stop_requested")
    return _flag


def stop_requested() -> bool:
    """True once a watched signal arrived during the running `fit`."""
    return _active is not None and _active.pending() is not None


class Interrupted(Exception):
    """Raised at a step boundary after a watched signal: training stops there (see `SignalWatch`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


class SignalWatch:
    """While active (a `with` block in the main thread), SIGTERM and SIGINT are recorded instead of acted on.

    The first signal sets `received` and the stop flag; `fit` stops at the next step boundary. A second
    SIGINT (Ctrl-C pressed again) raises `KeyboardInterrupt` at once, as before the watch. `deliver()`, after
    the watch is closed, does what the signal would have done: SIGTERM exits with `TrainingPreempted` (exit
    status 143), SIGINT raises `KeyboardInterrupt`; a handler the user installed is called instead.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.active = False
        self.previous: dict[int, Any] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._seen: int | None = None  # the first signal the watcher thread read (before the handler ran)

    def pending(self) -> int | None:
        """The signal received (None: none), whether or not its Python handler has run yet."""
        return self.received if self.received is not None else self._seen

    def __enter__(self) -> SignalWatch:
        global _active
        if threading.current_thread() is not threading.main_thread() or _active is not None:
            return self  # handlers can only be set in the main thread; a nested fit shares the outer watch
        flag = stop_flag()
        flag.assign(False)
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if current in (signal.SIG_IGN, None):
                continue  # ignored stays ignored; None: a handler not installed from Python
            self.previous[signum] = current
            signal.signal(signum, self._handler)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, args=(read, flag), name="safetrain-signals", daemon=True)
        self._thread.start()
        self.active = True
        _active = self
        return self

    def _handler(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # pressed again: stop now
        if self.received is None:
            self.received = signum
            stop_flag().assign(True)

    def _watch(self, read: int, flag: tf.Variable) -> None:
        """The watcher thread: the wakeup pipe's bytes are signal numbers, written by the C-level handler
        while the main thread may be busy in a compiled chunk."""
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            watched = [b for b in data if b in self.previous]
            if watched:
                if self._seen is None:
                    self._seen = watched[0]
                flag.assign(True)
            if self._previous_fd >= 0:  # someone else (asyncio) watched the wakeup fd before us: pass it on
                with contextlib.suppress(OSError):
                    os.write(self._previous_fd, data)

    def __exit__(self, *exc: Any) -> None:
        global _active
        if not self.active:
            return
        _active = None
        self.active = False
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        assert self._pipe is not None
        os.close(self._pipe[1])  # the watcher reads EOF and ends
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(self._pipe[0])
        stop_flag().assign(False)

    def deliver(self, signum: int, checkpoint: str | None = None) -> bool:
        """After `fit` stopped for `signum` and the watch closed: call the handler the user had (returns True:
        `fit` returns normally), or exit as the signal would have (`TrainingPreempted` for SIGTERM,
        `KeyboardInterrupt` for SIGINT)."""
        previous = self.previous.get(signum, signal.SIG_DFL)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)
            return True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TrainingPreempted(SIGTERM_EXIT, checkpoint)


def agreed_signal(strategy, local: int | None) -> int | None:
    """The signal training stops for at this boundary: this process's, or, in a multi-worker run, any
    worker's (SIGTERM before SIGINT; a collective, so every worker calls it at the same boundary)."""
    if distributed.is_multi_worker(strategy):
        signum = int(distributed.max_across_workers(strategy, float(local or 0)))
        return signum or None
    return local
