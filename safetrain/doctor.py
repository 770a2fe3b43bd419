"""The doctor: run any Keras training script, unmodified, and say why its memory grows.

    python -m safetrain doctor train.py --epochs 20          # the script's own arguments follow it
    python -m safetrain doctor --json report.json --plot memory.png --fail-on-leak train.py

The script runs in a child process with instrumentation installed before its first line:

- every `tf.function` (the script's own and Keras's) reports each trace with the shapes and dtypes of its
  arguments, so a retrace names the function and the argument whose shape varied;
- `Model.fit` (and `SafeTrainer.fit`) get one extra callback that reads memory at every epoch end and
  watches stateful layers; `Model.predict` and every model constructed are timed and sampled too;
- a census of live Python objects is taken once early (after the first epoch, the 2nd model or the 5th
  predict) and once at the end, to tell Python-side accumulation from allocator growth.

Then the parent diagnoses (`diagnose`, a pure function of the recorded events) and prints each cause found
with its evidence and the safetrain change that fixes it.

Example:
    >>> report = run("examples/leaky/retracing.py")
    >>> [c["cause"] for c in report["causes"]]
    ['retracing']
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.abc
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from typing import Any, Sequence

__all__ = ["run", "diagnose", "format_report", "main", "CAUSES"]

CAUSES = ("retracing", "models_in_loop", "predict_in_loop", "stateful_not_reset", "python_accumulation",
          "allocator_growth")

# Thresholds (MiB). A cause needs both its own evidence and memory that grew with it.
MIN_RETRACES = 3                 # traces of one function with distinct signatures
MIN_MODELS = 4                   # models constructed
MODEL_SLOPE_MB = 1.0             # RSS per model built
MIN_PREDICTS = 20                # predict calls
PREDICT_SLOPE_MB = 0.02          # RSS per predict call, after the first 5 (Keras 3.15: 0.015-0.05 per call)
PREDICT_GROWTH_MB = 1.0          # ... and in all over those calls
OBJECT_GROWTH_MB = 10.0          # live Python objects grown between the two censuses
EPOCH_SLOPE_MB = 1.0             # RSS per epoch
UNEXPLAINED_GROWTH_MB = 30.0     # RSS growth no other cause accounts for


# -- child: instrumentation -----------------------------------------------------------------------------

class _Recorder:
    """Everything the child records; written as JSON when the script ends (however it ends)."""

    def __init__(self, out_path: str) -> None:
        import psutil

        process = psutil.Process()
        self.rss_mb = lambda: process.memory_info().rss / 2**20
        self.out_path = out_path
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.functions: dict[int, dict] = {}
        self.stateful: dict[str, dict] = {}
        self.resets: dict[int, int] = {}
        self.census: dict[str, Any] = {}
        self.counts = {"models": 0, "predicts": 0, "epochs": 0, "fits": 0}
        self.lock = threading.Lock()
        self.exit_code = 0
        self.error: str | None = None
        self.event("start")

    def event(self, kind: str, **detail) -> None:
        self.events.append(dict(t=round(time.perf_counter() - self.t0, 4), kind=kind,
                                rss_mb=round(self.rss_mb(), 2), **detail))

    def take_census(self, when: str) -> None:
        # A full collection (0.2-0.3 s with TensorFlow loaded) only for the last census, where garbage
        # would read as growth; left in the first, it only makes the growth look smaller.
        gc.collect() if when == "last" else gc.collect(1)
        t0 = time.perf_counter()
        stats = census()
        self.census[when] = dict(stats={k: list(v) for k, v in stats.items()}, seconds=time.perf_counter() - t0,
                                 t=round(time.perf_counter() - self.t0, 4), rss_mb=self.rss_mb())

    def maybe_baseline(self) -> None:
        if "first" not in self.census and (self.counts["epochs"] >= 1 or self.counts["models"] >= 2
                                           or self.counts["predicts"] >= 5):
            self.take_census("first")

    def write(self) -> None:
        data = dict(events=self.events, functions=list(self.functions.values()), stateful=self.stateful,
                    census=self.census, counts=self.counts, exit_code=self.exit_code, error=self.error,
                    wall_s=time.perf_counter() - self.t0)
        with open(self.out_path, "w") as f:
            json.dump(data, f)


_BUFFERS: tuple[type, ...] = (bytes, bytearray, str)


def census() -> dict[str, tuple[int, int]]:
    """Live Python objects by type, `{type name: (count, bytes)}`, in about a third of a second.

    Containers come from `gc.get_objects()`; of the objects they hold that the collector does not track,
    only buffers (NumPy arrays, bytes, strings) are counted, which is where accumulated data lives.
    """
    try:
        import numpy as np

        buffers = _BUFFERS + (np.ndarray,)
    except ImportError:
        buffers = _BUFFERS
    objects = gc.get_objects()
    counts: dict[type, list[int]] = {}
    for o in objects:
        entry = counts.get(type(o))
        if entry is None:
            entry = counts[type(o)] = [0, 0]
        entry[0] += 1
        entry[1] += sys.getsizeof(o, 0)
    held = {id(r): r for r in gc.get_referents(*objects) if type(r) in buffers}
    for r in held.values():
        entry = counts.setdefault(type(r), [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(r, 0)
    del objects
    return {t.__name__: (c, b) for t, (c, b) in counts.items()}


def _describe(value) -> str:
    import tensorflow as tf

    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "shape") and hasattr(value, "dtype"):
        shape = getattr(value, "shape", None)
        try:
            dims = "x".join("?" if d is None else str(d) for d in shape.as_list()) if shape is not None else "?"
        except (ValueError, AttributeError):
            dims = "?"
        return f"{getattr(value.dtype, 'name', value.dtype)}[{dims}]"
    if isinstance(value, tf.TypeSpec):
        return repr(value)[:60]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)[:40]
    if isinstance(value, (list, tuple, dict)):
        return "(" + ", ".join(_describe(v) for v in tf.nest.flatten(value))[:200] + ")"
    return type(value).__name__


def _signature(func, args, kwargs) -> dict[str, str]:
    try:
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
        items = bound.arguments.items()
    except (TypeError, ValueError):
        items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return {name: _describe(value) for name, value in items if name != "self"}


def _built_by_keras(model) -> bool:
    """A model Keras makes for its own use (the Functional model inside a built Sequential)."""
    if type(model).__name__ != "Functional":
        return False
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code.co_filename.replace("\\", "/").endswith("keras/src/models/sequential.py"):
            return True
        frame = frame.f_back
    return False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Call `callback` right after module `name` is first imported (by the script, in its own order, so
    that whatever it sets before importing TensorFlow, such as environment variables, still applies)."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_patch(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_patch
        return spec


def _install(rec: _Recorder) -> None:
    """Patch TensorFlow, Keras and SafeTrainer as each is imported, so that their calls report to `rec`."""
    done: set[str] = set()

    def once(name, patch):
        def run():
            if name not in done:
                done.add(name)
                patch(rec)
        return run

    for name, patch in (("tensorflow", _patch_tensorflow), ("keras", _patch_keras),
                        ("safetrain.trainer", _patch_safetrain)):
        if name in sys.modules:
            once(name, patch)()
        else:
            sys.meta_path.insert(0, _AfterImport(name, once(name, patch)))


def _patch_tensorflow(rec: _Recorder) -> None:
    import tensorflow as tf

    original_function = tf.function

    def function(func=None, *f_args, **f_kwargs):
        if func is None:
            return lambda f: function(f, *f_args, **f_kwargs)
        if not callable(func):
            return original_function(func, *f_args, **f_kwargs)
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        entry: dict[str, Any] = {"name": name, "traces": []}

        @functools.wraps(func)
        def traced(*args, **kwargs):
            with rec.lock:
                if not entry["traces"]:
                    rec.functions[id(entry)] = entry
                entry["traces"].append(_signature(func, args, kwargs))
                rec.event("trace", function=name, count=len(entry["traces"]))
            return func(*args, **kwargs)

        return original_function(traced, *f_args, **f_kwargs)

    tf.function = function


def _patch_keras(rec: _Recorder) -> None:
    import keras

    depth = threading.local()
    model_init = keras.Model.__init__

    @functools.wraps(model_init)
    def init(self, *args, **kwargs):
        depth.n = getattr(depth, "n", 0) + 1
        try:
            return model_init(self, *args, **kwargs)
        finally:
            depth.n -= 1
            if depth.n == 0 and not _built_by_keras(self):
                rec.counts["models"] += 1
                rec.event("model", model=type(self).__name__, count=rec.counts["models"])
                rec.maybe_baseline()

    keras.Model.__init__ = init

    rnn_reset = keras.layers.RNN.reset_state

    @functools.wraps(rnn_reset)
    def reset_state(self, *args, **kwargs):
        rec.resets[id(self)] = rec.resets.get(id(self), 0) + 1
        return rnn_reset(self, *args, **kwargs)

    keras.layers.RNN.reset_state = reset_state

    class Watch(keras.callbacks.Callback):
        def __init__(self, api: str):
            super().__init__()
            self.api = api

        def on_epoch_end(self, epoch, logs=None):
            rec.counts["epochs"] += 1
            rec.event("epoch", api=self.api, epoch=int(epoch), count=rec.counts["epochs"])
            model = self.model
            for layer in model._flatten_layers(include_self=False) if model is not None else ():
                if getattr(layer, "stateful", False):
                    key = f"{model.name}/{layer.name}"
                    entry = rec.stateful.setdefault(key, {"layer": layer.name, "class": type(layer).__name__,
                                                          "epochs": 0, "resets": 0})
                    entry["epochs"] += 1
                    entry["resets"] = rec.resets.get(id(layer), 0)
            rec.maybe_baseline()

    rec.watch = Watch
    _wrap_fit(rec, keras.Model, "Model.fit")
    _wrap_predict(rec, keras.Model, "Model.predict")


def _wrap_fit(rec: _Recorder, cls, api: str) -> None:
    fit = cls.fit

    @functools.wraps(fit)
    def wrapped(self, *args, **kwargs):
        callbacks = list(kwargs.get("callbacks") or [])
        kwargs["callbacks"] = callbacks + [rec.watch(api)]
        rec.counts["fits"] += 1
        rec.event("fit_begin", api=api)
        try:
            return fit(self, *args, **kwargs)
        finally:
            rec.event("fit_end", api=api)

    cls.fit = wrapped


def _wrap_predict(rec: _Recorder, cls, api: str) -> None:
    predict = cls.predict

    @functools.wraps(predict)
    def wrapped(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return predict(self, *args, **kwargs)
        finally:
            rec.counts["predicts"] += 1
            rec.event("predict", api=api, count=rec.counts["predicts"], seconds=time.perf_counter() - t0)
            rec.maybe_baseline()

    cls.predict = wrapped


def _patch_safetrain(rec: _Recorder) -> None:
    from safetrain.trainer import SafeTrainer

    _wrap_fit(rec, SafeTrainer, "SafeTrainer.fit")
    _wrap_predict(rec, SafeTrainer, "SafeTrainer.predict")


def child_main(argv: Sequence[str]) -> int:
    """In the child: `OUT script [args...]`: install the instrumentation, run the script, write OUT."""
    out_path, script, *script_args = argv
    rec = _Recorder(out_path)
    _install(rec)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    # The script's namespace stays alive until the last census: what it holds at the end is evidence.
    module = types.ModuleType("__main__")
    module.__file__ = script
    sys.modules["__main__"] = module
    try:
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec")
        exec(code, module.__dict__)
    except SystemExit as e:
        rec.exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # the script's own failure: report it, then diagnose what ran
        import traceback

        rec.exit_code = 1
        rec.error = "".join(traceback.format_exception_only(type(e), e)).strip()
        traceback.print_exc()
    finally:
        rec.event("end")
        first = rec.census.get("first")
        # Without growth since the first census there is nothing for a second one to explain.
        if first is None or rec.rss_mb() - first["rss_mb"] > OBJECT_GROWTH_MB:
            rec.take_census("last")
        rec.write()
    return rec.exit_code


# -- parent: diagnosis ----------------------------------------------------------------------------------

def _slope(ys: Sequence[float]) -> float:
    """Least-squares slope of `ys` against 0, 1, 2, ... (0.0 with fewer than 2 points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    return sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys)) / sum((i - mean_x) ** 2 for i in range(n))


def _varied(traces: list[dict]) -> dict[str, list[str]]:
    """Arguments whose description differs across traces: {name: distinct values, in order seen}."""
    names = {n for t in traces for n in t}
    varied = {}
    for n in sorted(names):
        seen: list[str] = []
        for t in traces:
            v = t.get(n, "-")
            if v not in seen:
                seen.append(v)
        if len(seen) > 1:
            varied[n] = seen
    return varied


def _growth_between(events: list[dict], kind: str, **match) -> tuple[list[float], float]:
    selected = [e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]
    rss = [e["rss_mb"] for e in selected]
    return rss, (rss[-1] - rss[0]) if len(rss) > 1 else 0.0


def diagnose(data: dict) -> dict:
    """Causes found in a recorded run (what `child_main` wrote): a list of {cause, title, evidence, fix}.

    Each cause needs its own evidence (traces, models, predict calls, stateful layers, object census) and,
    except for a stateful layer never reset (a correctness problem that also keeps state alive), memory
    that grew with it. Allocator growth is what is left: RSS that grew while no live objects did.
    """
    events = data["events"]
    causes: list[dict] = []
    rss_all = [e["rss_mb"] for e in events]
    explained_mb = 0.0

    # Retracing: one function traced again and again for new argument shapes.
    for fn in data["functions"]:
        traces = fn["traces"]
        distinct = {json.dumps(t, sort_keys=True) for t in traces}
        if len(traces) < MIN_RETRACES or len(distinct) < MIN_RETRACES:
            continue
        rss, growth = _growth_between(events, "trace", function=fn["name"])
        varied = _varied(traces)
        arg_text = "; ".join(f"`{n}` took {len(v)} forms ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})"
                             for n, v in list(varied.items())[:3]) or "its arguments changed"
        per = growth / max(1, len(traces) - 1)
        causes.append(dict(
            cause="retracing",
            title=f"retracing: `{fn['name']}` was traced {len(traces)} times",
            evidence=f"{arg_text}; RSS {growth:+.1f} MiB over those traces ({per:+.2f} MiB per trace), and a "
                     "traced graph is never freed while its function lives",
            fix="SafeTrainer(model).fit(...)  # one trace: a fixed input signature with the batch and varying "
                "dims as None. For a hand-written step: @tf.function(input_signature=[tf.TensorSpec([None, None, "
                "4], tf.float32), ...]) or @tf.function(reduce_retracing=True)",
            function=fn["name"], traces=len(traces), varied=varied, growth_mb=growth))
        explained_mb += max(growth, 0.0)

    # Models built in a loop.
    models = [e for e in events if e["kind"] == "model"]
    if len(models) >= MIN_MODELS:
        rss = [e["rss_mb"] for e in models]
        per_model = _slope(rss[1:]) if len(rss) > 3 else _slope(rss)
        if per_model > MODEL_SLOPE_MB:
            growth = rss[-1] - rss[0]
            causes.append(dict(
                cause="models_in_loop",
                title=f"models built in a loop: {len(models)} models, memory never returned",
                evidence=f"RSS {per_model:+.1f} MiB per model built ({rss[0]:.0f} -> {rss[-1]:.0f} MiB over "
                         f"{len(models)} models); each fit leaves its traced train step and optimizer "
                         "functions alive",
                fix="trainer = SafeTrainer(build_model)  # a factory per fold/trial: earlier models are released; "
                    "or safetrain.run_isolated(train_one, i) for a fresh process per model",
                models=len(models), slope_mb_per_model=per_model, growth_mb=growth))
            explained_mb += max(growth, 0.0)

    # predict in a loop.
    predicts = [e for e in events if e["kind"] == "predict"]
    if len(predicts) >= MIN_PREDICTS:
        rss = [e["rss_mb"] for e in predicts[5:]]  # the first calls trace and warm up
        per_call = _slope(rss)
        growth = rss[-1] - rss[0]
        seconds = sum(e.get("seconds", 0.0) for e in predicts) / len(predicts)
        if per_call > PREDICT_SLOPE_MB and growth > PREDICT_GROWTH_MB:
            causes.append(dict(
                cause="predict_in_loop",
                title=f"predict in a loop: {len(predicts)} calls of {predicts[0].get('api', 'predict')}",
                evidence=f"RSS {per_call:+.3f} MiB per call after the first 5 ({growth:+.1f} MiB over "
                         f"{len(predicts) - 5} calls, not returned during the run), {seconds * 1000:.0f} ms per call: each predict "
                         "builds a new input pipeline, iterator and callbacks for one small input",
                fix="y = model(x, training=False)  # for small inputs in a loop: no pipeline per call; or collect "
                    "the inputs and predict once (SafeTrainer(model).predict(all_x): one trace, one pipeline)",
                calls=len(predicts), slope_mb_per_call=per_call, growth_mb=growth))
            explained_mb += max(growth, 0.0)

    # Stateful layers never reset.
    for key, entry in data["stateful"].items():
        if entry["epochs"] >= 2 and entry["resets"] == 0:
            causes.append(dict(
                cause="stateful_not_reset",
                title=f"stateful layer never reset: {entry['class']} `{key}`",
                evidence=f"it carried its state across {entry['epochs']} epochs and reset_state() was never "
                         "called: every epoch starts from the last batch of the previous one",
                fix="SafeTrainer(model, policies=[safetrain.ResetStates()])  # or every=N batches",
                layer=key, epochs=entry["epochs"]))

    # Python-side accumulation: live objects that grew between the two censuses.
    first, last = data["census"].get("first"), data["census"].get("last")
    object_growth_mb = 0.0
    if first and last:
        grew = []
        for name, (count, size) in last["stats"].items():
            c0, s0 = first["stats"].get(name, (0, 0))
            if size - s0 > 0:
                grew.append((size - s0, count - c0, name))
        grew.sort(reverse=True)
        object_growth_mb = sum(g[0] for g in grew) / 2**20
        top = [g for g in grew if g[0] / 2**20 >= 1.0][:4]
        rss_growth = last["rss_mb"] - first["rss_mb"]
        # Objects must account for much of the growth: traced graphs and models also leave dicts and lists.
        if object_growth_mb > OBJECT_GROWTH_MB and top and object_growth_mb >= 0.5 * rss_growth:
            causes.append(dict(
                cause="python_accumulation",
                title="Python-side accumulation: live objects keep growing",
                evidence="grew between the first epoch and the end: " + ", ".join(
                    f"{name} {count:+d} objects ({size / 2**20:+.1f} MiB)" for size, count, name in top)
                    + f"; {object_growth_mb:+.1f} MiB of live objects in all",
                fix="keep numbers, not tensors or arrays, in callbacks and lists (float(logs['loss'])); "
                    "SafeTrainer(model, policies=[safetrain.LeakDetector()]) names the types that grow",
                types=[name for _, _, name in top], growth_mb=object_growth_mb))
            explained_mb += object_growth_mb

    # Allocator growth: RSS grew, and neither live objects nor any cause above accounts for it.
    epochs = [e for e in events if e["kind"] == "epoch"]
    epoch_slope = _slope([e["rss_mb"] for e in epochs[1:]]) if len(epochs) > 3 else 0.0
    total = (max(rss_all[len(rss_all) // 3:]) - rss_all[min(len(rss_all) - 1, len(rss_all) // 3)]) if rss_all else 0
    # The baseline: after the first epoch (the first census), else at the first model, trace, fit or predict
    # (after the imports, which are not a leak).
    started = [e["rss_mb"] for e in events if e["kind"] in ("model", "trace", "fit_begin", "predict", "epoch")]
    baseline = first["rss_mb"] if first else (started[0] if started else (rss_all[0] if rss_all else 0.0))
    end_rss = last["rss_mb"] if last else (rss_all[-1] if rss_all else 0.0)
    unexplained = (end_rss - baseline) - explained_mb
    if not any(c["cause"] in ("retracing", "models_in_loop", "predict_in_loop") for c in causes) \
            and unexplained > UNEXPLAINED_GROWTH_MB and (epoch_slope > EPOCH_SLOPE_MB or len(epochs) <= 3) \
            and object_growth_mb < 0.25 * (end_rss - baseline):
        causes.append(dict(
            cause="allocator_growth",
            title="allocator growth with no live-object growth",
            evidence=f"RSS {end_rss - baseline:+.1f} MiB after the first epoch ({epoch_slope:+.2f} MiB per epoch) "
                     f"while live Python objects grew {object_growth_mb:+.1f} MiB and no traces or models "
                     "piled up: memory freed inside the process but kept by the allocator (or native code)",
            fix="SafeTrainer(model, policies=[safetrain.TrimMalloc()])  # malloc_trim after each epoch; or "
                "MALLOC_ARENA_MAX=2, or safetrain.run_isolated(...) for work whose memory must go back",
            growth_mb=end_rss - baseline, slope_mb_per_epoch=epoch_slope))

    return dict(causes=causes, leak=bool(causes), rss_start_mb=rss_all[0] if rss_all else None,
                rss_baseline_mb=baseline, censuses=len(data["census"]),
                rss_end_mb=end_rss, rss_peak_mb=max(rss_all) if rss_all else None, epoch_slope_mb=epoch_slope,
                object_growth_mb=object_growth_mb, total_growth_mb=total,
                traces={fn["name"]: len(fn["traces"]) for fn in data["functions"]},
                counts=data["counts"])


def format_report(script: str, data: dict, diagnosis: dict) -> str:
    lines = [f"safetrain doctor: {script}", ""]
    c = diagnosis["counts"]
    lines.append(f"ran {data['wall_s']:.1f} s, exit code {data['exit_code']}; {c['fits']} fit call(s), "
                 f"{c['epochs']} epochs, {c['models']} model(s) built, {c['predicts']} predict call(s)")
    if diagnosis["rss_start_mb"] is not None:
        parts = [f"RSS {diagnosis['rss_start_mb']:.0f} MiB at start, {diagnosis['rss_baseline_mb']:.0f} once "
                 f"training began, {diagnosis['rss_end_mb']:.0f} at the end (peak {diagnosis['rss_peak_mb']:.0f})"]
        if c["epochs"] > 3:
            parts.append(f"{diagnosis['epoch_slope_mb']:+.2f} MiB per epoch")
        if diagnosis["censuses"] == 2:
            parts.append(f"live Python objects {diagnosis['object_growth_mb']:+.1f} MiB")
        lines.append("; ".join(parts))
    retraced = {k: v for k, v in diagnosis["traces"].items() if v > 1}
    if retraced:
        lines.append("traced more than once: " + ", ".join(f"{k} x{v}" for k, v in sorted(
            retraced.items(), key=lambda kv: -kv[1])[:6]))
    if data.get("error"):
        lines.append(f"the script failed: {data['error']}")
    lines.append("")
    if not diagnosis["causes"]:
        lines.append("no leak found: memory did not grow with epochs, traces, models or predict calls.")
    for i, cause in enumerate(diagnosis["causes"], 1):
        lines.append(f"{i}. {cause['title']}")
        lines.append(f"   evidence: {cause['evidence']}")
        lines.append(f"   fix:      {cause['fix']}")
    return "\n".join(lines)


def run(script: str, args: Sequence[str] = (), *, json_path: str | None = None, plot_path: str | None = None,
        echo: bool = True, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `script` with `args` under the doctor in a child process; returns the report (a dict).

    The report has the recorded `events`, `functions` (every traced function with each trace's signature),
    `diagnosis` (causes, each with evidence and fix) and `text` (what `main` prints).

    Example:
        >>> report = run("train.py", ["--epochs", "5"], plot_path="memory.png")
        >>> report["diagnosis"]["leak"]
        False
    """
    if not os.path.isfile(script):
        raise ValueError(f"`script`: no such file: {script!r}")
    with tempfile.TemporaryDirectory(prefix="safetrain_doctor_") as tmp:
        out = os.path.join(tmp, "record.json")
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, "-m", "safetrain.doctor", "--child", out, script, *args]
        kwargs: dict[str, Any] = {} if echo else dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.run(cmd, env=child_env, timeout=timeout, **kwargs)
        if not os.path.exists(out):
            raise RuntimeError(f"the doctor's child process ended (exit {proc.returncode}) without a record; "
                               "it was probably killed (out of memory?)")
        with open(out) as f:
            data = json.load(f)
    diagnosis = diagnose(data)
    report = dict(script=script, args=list(args), exit_code=data["exit_code"], wall_s=data["wall_s"],
                  events=data["events"], functions=data["functions"], stateful=data["stateful"],
                  census_seconds={k: v["seconds"] for k, v in data["census"].items()},
                  diagnosis=diagnosis)
    report["text"] = format_report(script, data, diagnosis)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    if plot_path:
        from safetrain.plots import plot_timeline

        plot_timeline(report, plot_path)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m safetrain doctor [--json F] [--plot F] [--fail-on-leak] script.py [script args]`."""
    p = argparse.ArgumentParser(prog="safetrain doctor", description="Run a training script, unmodified, and "
                                "diagnose why its memory grows.")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write a PNG of memory over time with epochs, model builds and retraces marked")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when any cause is found (for CI)")
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    a = p.parse_args(argv)
    if a.plot:
        from safetrain.plots import require_matplotlib

        require_matplotlib()
    try:
        report = run(a.script, a.args, json_path=a.json, plot_path=a.plot)
    except ValueError as e:
        p.error(str(e))
    print("\n" + report["text"])
    if a.json:
        print(f"\nreport: {a.json}")
    if a.plot:
        print(f"plot:   {a.plot}")
    if report["exit_code"]:
        return int(report["exit_code"])
    return 1 if a.fail_on_leak and report["diagnosis"]["leak"] else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
