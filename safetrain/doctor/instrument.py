"""The doctor's child side: the recorder, the import hooks that patch TensorFlow, Keras and SafeTrainer as the
script imports them, the live-object census, and `child_main`, which runs the script under all of them.

    python -m safetrain.doctor --child record.json train.py --epochs 5   # what `doctor.run` starts
"""

from __future__ import annotations

import functools
import gc
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

# The last census is skipped when RSS grew less than this since the first: diagnose could not call it accumulation.
from safetrain.doctor.report import OBJECT_GROWTH_MB

__all__ = ["census", "child_main"]


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
        self.watch: type | None = None  # the fit callback class, set when keras is patched
        self.exit_code = 0
        self.error: str | None = None
        self.event("start")

    def event(self, kind: str, **detail) -> None:
        self.events.append(
            dict(t=round(time.perf_counter() - self.t0, 4), kind=kind, rss_mb=round(self.rss_mb(), 2), **detail)
        )

    def take_census(self, when: str) -> None:
        # A full collection (0.2-0.3 s with TensorFlow loaded) only for the last census, where garbage
        # would read as growth; left in the first, it only makes the growth look smaller.
        gc.collect() if when == "last" else gc.collect(1)
        t0 = time.perf_counter()
        stats = census()
        self.census[when] = dict(
            stats={k: list(v) for k, v in stats.items()},
            seconds=time.perf_counter() - t0,
            t=round(time.perf_counter() - self.t0, 4),
            rss_mb=self.rss_mb(),
        )

    def maybe_baseline(self) -> None:
        if "first" not in self.census and (
            self.counts["epochs"] >= 1 or self.counts["models"] >= 2 or self.counts["predicts"] >= 5
        ):
            self.take_census("first")

    def write(self) -> None:
        data = dict(
            events=self.events,
            functions=list(self.functions.values()),
            stateful=self.stateful,
            census=self.census,
            counts=self.counts,
            exit_code=self.exit_code,
            error=self.error,
            wall_s=time.perf_counter() - self.t0,
        )
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
        items = list(bound.arguments.items())
    except (TypeError, ValueError):
        items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return {name: _describe(value) for name, value in items if name != "self"}


def _built_by_keras(model) -> bool:
    """A model Keras makes for its own use (the Functional model inside a built Sequential)."""
    if type(model).__name__ != "Functional":
        return False
    frame: types.FrameType | None = sys._getframe(2)
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

    for name, patch in (
        ("tensorflow", _patch_tensorflow),
        ("keras", _patch_keras),
        ("safetrain.trainer", _patch_safetrain),
    ):
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

    from safetrain import _compat  # imported here: the doctor's child imports TensorFlow only when the script does

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
            for layer in _compat.flatten_layers(model) if model is not None else ():
                if getattr(layer, "stateful", False):
                    key = f"{model.name}/{layer.name}"
                    entry = rec.stateful.setdefault(
                        key, {"layer": layer.name, "class": type(layer).__name__, "epochs": 0, "resets": 0}
                    )
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
