"""The doctor's recorder (child side): the events, memory samples, traces and censuses of one script's run.

>>> rec = Recorder("record.json"); rec.event("model", model="m#1"); rec.stop(); rec.write()
"""

from __future__ import annotations

import functools
import gc
import json
import signal
import threading
import time
import weakref
from typing import Any

from safetrain.diagnostics import census, read_memory
from safetrain.diagnostics.holders import arrays_in, holders_of_growth
from safetrain.diagnostics.sites import Sites

__all__ = ["Recorder", "WARMUP"]

SAMPLE_EVERY_S = 0.1  # memory between events; doubled whenever the series reaches MAX_SAMPLES
MAX_SAMPLES = 4000
CENSUS_AFTER_MB = 4.0  # the first census is taken once memory grew this much after warm-up ...
LAST_CENSUS_AFTER_MB = 2.0  # ... and the last one if memory grew again after it
CENSUS_WAIT_S = 2.0  # how long the first census waits for an event of the script's thread
NO_LOOP_AFTER_S = 0.5  # no loop recognized, outside Keras's loops this long after the first model: census anyway
# Events that say where in the user's script they came from (`where`: the innermost two frames of the script's own).
WHERE_KINDS = frozenset({"model", "compile", "predict", "data", "trace", "fit_begin", "epoch"})
MAX_WATCHED = 100_000  # predict's output arrays watched (weak references, the latest)
# Warm-up ends (the baseline for all growth) at the first of these counts.
WARMUP = dict(epochs=1, models=2, compiles=2, predicts=5, batches=5, gradients=5, calls=5, model_calls=5)


class Recorder:
    """Everything the child records; written as JSON when the script ends (however it ends)."""

    def __init__(self, out_path: str) -> None:
        self.out_path = out_path
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.functions: list[dict] = []
        self.stateful: dict[str, dict] = {}
        self.resets: dict[int, int] = {}
        self.census: dict[str, Any] = {}
        self.baseline: dict[str, Any] | None = None
        self.activity: dict[str, Any] | None = None  # the first model, trace, fit or predict
        self.activity_t = 0.0
        self.api_exit_t = 0.0  # when the last of Keras's fit/evaluate/predict/*_on_batch calls returned
        self.counts = dict.fromkeys(("models", "compiles", "fits", "epochs", "predicts", "batches", "gradients"), 0)
        self.counts.update(calls=0, model_calls=0)
        self.model_keys: dict[int, str] = {}
        self.models_seen = 0
        self.predict_depth = 0
        self.api_depth = 0  # inside Keras's fit/evaluate/predict/*_on_batch: their own steps are not the script's
        self.lock = threading.RLock()
        self.watch: type | None = None  # the fit callback class, set when keras is patched
        self.exit_code = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self.own_mb = 0.0  # memory the first census left behind, taken off every later reading
        self.census_due: float | None = None  # when memory first grew enough after warm-up for a census
        self.main = threading.current_thread()
        self.sites: Sites | None = None  # the script's own frames (set by `child_main`)
        self.predicted: dict[int, weakref.ref] = {}  # the arrays predict returned and that are alive, by id
        self.holders: list[dict] = []
        self.taking_census = False
        self.census_asked_t = float("-inf")
        self.census_signal = self._install_census_signal()
        self.event("start")
        threading.Thread(target=self._sample, name="safetrain-doctor-sampler", daemon=True).start()

    def _install_census_signal(self) -> int | None:
        """A real-time signal whose handler takes the due census in the script's thread (None where there is no
        such signal, or someone else's handler has it). A census must not run in another thread: the list
        `gc.get_objects()` returns holds a reference to every tracked object, a tuple the script's thread is
        still building among them, and CPython then fails to grow that tuple (`SystemError: bad argument to
        internal function`, seen in `tape.gradient` during a trace). A handler runs between two bytecodes of
        the script's thread, and the census drops every reference before it returns."""
        if not hasattr(signal, "SIGRTMIN") or threading.current_thread() is not threading.main_thread():
            return None
        number = signal.SIGRTMIN + 3
        if signal.getsignal(number) not in (signal.SIG_DFL, None):
            return None
        signal.signal(number, self._on_census_signal)
        signal.siginterrupt(number, False)  # a system call it interrupts (in TensorFlow's threads too) restarts
        return number

    def _on_census_signal(self, signum, frame) -> None:
        self.census_if_due()

    def _request_census(self) -> None:
        """From the sampler: have the script's thread take the due census at its next bytecode (asked again at
        most once a second: real-time signals queue while that thread is in a long TensorFlow call)."""
        number, now = self.census_signal, time.perf_counter()
        if number is None or now - self.census_asked_t < 1.0 or not self.main.ident:
            return
        if signal.getsignal(number) == self._on_census_signal:
            self.census_asked_t = now
            signal.pthread_kill(self.main.ident, number)

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 4)

    def read(self) -> tuple[float, float]:
        """(RSS, anonymous) memory in MiB, less what the doctor's own census left behind."""
        rss, anon = read_memory()
        return rss - self.own_mb, anon - self.own_mb

    def event(self, kind: str, **detail) -> None:
        if self.sites is not None and kind in WHERE_KINDS and "where" not in detail:
            detail["where"] = self.sites.here()
        rss, anon = self.read()
        with self.lock:
            self.events.append(dict(t=self.now(), kind=kind, rss_mb=round(rss, 2), anon_mb=round(anon, 2), **detail))
        if self.activity is None and kind in ("model", "trace", "fit_begin", "predict"):
            self.activity = self.events[-1]
            self.activity_t = self.activity["t"]
        self.census_if_due()

    def census_if_due(self) -> None:
        if (
            self.census_due is not None
            and "first" not in self.census
            and not self.taking_census
            and threading.current_thread() is self.main
        ):
            self.take_census("first")

    def _sample(self) -> None:
        every = SAMPLE_EVERY_S
        while not self._stop.wait(every):
            rss, anon = self.read()
            with self.lock:
                self.samples.append(dict(t=self.now(), rss_mb=round(rss, 2), anon_mb=round(anon, 2)))
                if len(self.samples) >= MAX_SAMPLES:
                    del self.samples[::2]
                    every *= 2
            # The first census waits until memory grows after warm-up: a flat script never pays for one. The
            # script's thread takes it at its next event; a loop with no events is asked for it (a signal its
            # thread handles) after CENSUS_WAIT_S.
            # With no loop recognized long after the first model, trace, fit or predict, growth since then counts.
            base, wait = self.baseline, CENSUS_WAIT_S
            idle = self.api_depth == 0 and self.now() - max(self.activity_t, self.api_exit_t) > NO_LOOP_AFTER_S
            if base is None and self.activity is not None and idle:
                base, wait = self.activity, 0.0  # no event of the script's will come: take it from here now
            if base is not None and "first" not in self.census and anon - base["anon_mb"] > CENSUS_AFTER_MB:
                if self.census_due is None:
                    self.census_due = time.perf_counter()
                if time.perf_counter() - self.census_due >= wait:
                    self._request_census()

    def call_api(self, method, *args, **kwargs):
        """Run one of Keras's loops (fit, evaluate, predict, *_on_batch): the steps, calls and gradients inside it
        are Keras's, not the script's loop."""
        self.api_depth += 1
        try:
            return method(*args, **kwargs)
        finally:
            self.api_depth -= 1
            self.api_exit_t = self.now()

    def _forget(self, key: int, _ref: Any = None) -> None:
        self.predicted.pop(key, None)

    def returned(self, outputs) -> None:
        """What a predict call returned: its arrays, watched (weakly) to tell later whether the script keeps them."""
        for array in arrays_in(outputs):
            key = id(array)
            try:
                self.predicted[key] = weakref.ref(array, functools.partial(self._forget, key))
            except TypeError:  # an array type without weak references: not watched
                continue
        while len(self.predicted) > MAX_WATCHED:
            del self.predicted[next(iter(self.predicted))]

    def model_key(self, model) -> str:
        key = self.model_keys.get(id(model))
        if key is None:
            self.models_seen += 1  # a new number for every model: names repeat after clear_session(), ids are reused
            key = self.model_keys[id(model)] = f"{getattr(model, 'name', type(model).__name__)}#{self.models_seen}"
            weakref.finalize(model, self.model_keys.pop, id(model), None)
        return key

    def take_census(self, when: str) -> None:
        # A full collection (0.2-0.3 s with TensorFlow loaded) only for the last census, where garbage
        # would read as growth; left in the first, it only makes the growth look smaller.
        if when == "last":
            gc.collect()
        t0, t = time.perf_counter(), self.now()
        raw_anon = read_memory()[1]
        rss, anon = self.read()  # before: the objects counted are those alive at the start
        self.taking_census = True
        try:
            stats = census()
        finally:
            self.taking_census = False
        # What the census itself left (freed lists the allocator keeps) is the doctor's, not the script's.
        if when == "first":
            self.own_mb += max(0.0, read_memory()[1] - raw_anon)
        first = self.census.get("first")
        if when == "last" and first is not None and self.sites is not None:
            # Who keeps the data that grew, and the lines that add to it.
            watch = {key for key, ref in list(self.predicted.items()) if ref() is not None}
            self.holders = holders_of_growth(first["stats"], stats, self.sites, watch=watch)
        self.census[when] = dict(
            stats={k: list(v) for k, v in stats.items()},
            seconds=time.perf_counter() - t0,
            t=t,
            rss_mb=rss,
            anon_mb=anon,
        )

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n
        self.maybe_baseline(what, self.counts[what])
        self.census_if_due()

    def maybe_baseline(self, what: str, n: int) -> None:
        """Warm-up ends at the first repetition of the script's loop: growth is measured from here."""
        if self.baseline is None and n >= WARMUP.get(what, 1 << 62):
            rss, anon = self.read()
            self.baseline = dict(t=self.now(), reason=f"{what} {n}", rss_mb=rss, anon_mb=anon)

    def no_loop_baseline(self) -> dict | None:
        """Without a loop recognized, growth counts from the first model, trace, fit or predict."""
        if self.activity is None:
            return None
        a = self.activity
        reason = f"the first {a['kind']}; no loop recognized"
        return dict(t=a["t"], reason=reason, rss_mb=a["rss_mb"], anon_mb=a["anon_mb"])

    def stop(self) -> None:
        self._stop.set()
        number, self.census_signal = self.census_signal, None
        main = threading.current_thread() is threading.main_thread()
        if number is not None and main and signal.getsignal(number) == self._on_census_signal:
            # Ignored, not the default (which ends the process): a request may still be on its way.
            signal.signal(number, signal.SIG_IGN)

    def finish(self) -> None:
        """The script ended (however it ended): the end reading, the last census if memory grew again, the file."""
        self.stop()
        self.event("end")  # the end reading comes before the last census, which allocates and collects
        first = self.census.get("first")
        # Without growth since the first census there is nothing for a second one to explain.
        if first is not None and self.events[-1]["anon_mb"] - first["anon_mb"] > LAST_CENSUS_AFTER_MB:
            self.take_census("last")
        self.write()

    def write(self) -> None:
        with self.lock:
            data = dict(
                events=self.events,
                samples=self.samples,
                functions=self.functions,
                stateful=self.stateful,
                census=self.census,
                counts=self.counts,
                baseline=self.baseline or self.no_loop_baseline(),
                exit_code=self.exit_code,
                error=self.error,
                wall_s=time.perf_counter() - self.t0,
                holders=self.holders,
            )
            with open(self.out_path, "w") as f:
                json.dump(data, f)
