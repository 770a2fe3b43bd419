"""The doctor's child side: the import hooks that patch TensorFlow, Keras and SafeTrainer whatever
order the script imports them in, and `child_main`, which runs the script under all of them.

    python -m safetrain.doctor --child record.json train.py --epochs 5   # what `doctor.run` starts

What its `Recorder` (recorder.py) writes is a `safetrain.diagnostics` record: events (models built,
compiles, traces with their signatures, epochs, predict calls, arrays handed to `fit` or `tf.data`), memory
read every 0.1 s between them, and an object census once memory grows after warm-up and again at the end.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
import types
from collections.abc import Sequence
from typing import Any

from safetrain.diagnostics import census
from safetrain.diagnostics.holders import arrays_in
from safetrain.diagnostics.sites import Sites
from safetrain.doctor.recorder import Recorder
from safetrain.scripts import after_import, as_main, run_script

__all__ = ["census", "child_main"]


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


def _nbytes(value) -> int:
    """Bytes of the NumPy arrays in `value` (nested lists, tuples and dicts); tensors and datasets are 0."""
    return sum(int(a.nbytes) for a in arrays_in(value))


def _rows(value) -> int:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, dict) and value:
        return _rows(next(iter(value.values())))
    shape = getattr(value, "shape", None)
    try:
        return int(shape[0]) if shape is not None and len(shape) and shape[0] is not None else 0
    except (TypeError, ValueError):
        return 0


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


def _install(rec: Recorder) -> None:
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
        after_import(name, once(name, patch))


def _patch_tensorflow(rec: Recorder) -> None:
    import tensorflow as tf

    original_function = tf.function

    def function(func=None, *f_args, **f_kwargs):
        if func is None:
            return lambda f: function(f, *f_args, **f_kwargs)
        if not callable(func):
            return original_function(func, *f_args, **f_kwargs)
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        entry: dict[str, Any] = {"name": name, "traces": [], "calls": 0}
        if rec.sites is not None:
            entry["defined"] = rec.sites.defined(func)

        @functools.wraps(func)
        def traced(*args, **kwargs):
            made: list[bool] = []

            def creator(next_creator, **kw):
                made.append(True)
                return next_creator(**kw)

            sig = _signature(func, args, kwargs)
            with rec.lock:
                if not entry["traces"]:
                    rec.functions.append(entry)
                previous = entry["traces"][-1] if entry["traces"] else None
                # TensorFlow traces again, creating no variables, after a first trace that made some: not a retrace.
                lifted = bool(previous and previous.get("made_variables") and previous["args"] == sig)
                trace = dict(t=rec.now(), args=sig, lifted=lifted)
                entry["traces"].append(trace)
            rec.event("trace", function=name, count=len(entry["traces"]), lifted=lifted)
            try:
                with tf.variable_creator_scope(creator):
                    return func(*args, **kwargs)
            finally:
                trace["made_variables"] = bool(made)

        traced._safetrain_doctor_entry = entry
        return original_function(traced, *f_args, **f_kwargs)

    tf.function = function

    # Calls of the script's own tf.functions (outside Keras's loops) mark its loop in custom training.
    function_class = type(original_function(lambda: None))
    call = function_class.__call__

    @functools.wraps(call)
    def counted_call(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            if rec.api_depth == 0:
                entry = getattr(getattr(self, "python_function", None), "_safetrain_doctor_entry", None)
                if entry is not None:
                    entry["calls"] += 1
                    rec.counts["calls"] += 1
                    rec.maybe_baseline("calls", entry["calls"])
                    rec.census_if_due()

    function_class.__call__ = counted_call

    gradient = tf.GradientTape.gradient

    @functools.wraps(gradient)
    def counted_gradient(self, *args, **kwargs):
        try:
            return gradient(self, *args, **kwargs)
        finally:
            if rec.api_depth == 0 and tf.executing_eagerly():
                rec.count("gradients")

    tf.GradientTape.gradient = counted_gradient

    for source in ("from_tensor_slices", "from_tensors"):
        _wrap_data_source(rec, tf.data.Dataset, source)


def _wrap_data_source(rec: Recorder, cls, name: str) -> None:
    make = getattr(cls, name)

    @functools.wraps(make)
    def wrapped(tensors, *args, **kwargs):
        nbytes = _nbytes(tensors) if rec.api_depth == 0 else 0
        if nbytes:
            rec.event("data", source=f"tf.data.Dataset.{name}", nbytes=nbytes)
        return make(tensors, *args, **kwargs)

    setattr(cls, name, staticmethod(wrapped))


def _patch_keras(rec: Recorder) -> None:
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
                rec.event("model", model=rec.model_key(self), count=rec.counts["models"] + 1)
                rec.count("models")

    keras.Model.__init__ = init

    compile_ = keras.Model.compile

    @functools.wraps(compile_)
    def compile(self, *args, **kwargs):
        depth.c = getattr(depth, "c", 0) + 1
        try:
            return compile_(self, *args, **kwargs)
        finally:
            depth.c -= 1
            if depth.c == 0:
                rec.event("compile", model=rec.model_key(self), count=rec.counts["compiles"] + 1)
                rec.count("compiles")

    keras.Model.compile = compile

    model_call = keras.Model.__call__
    import tensorflow as tf  # Keras 3 on TensorFlow: imported with keras

    @functools.wraps(model_call)
    def call(self, *args, **kwargs):
        if rec.api_depth or getattr(depth, "m", 0):  # inside fit/predict, or a model inside a model
            return model_call(self, *args, **kwargs)
        depth.m = 1
        try:
            return model_call(self, *args, **kwargs)
        finally:
            depth.m = 0
            if tf.executing_eagerly():  # the script's own loop calling the model (inference, custom training)
                rec.count("model_calls")

    keras.Model.__call__ = call

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
            rec.event("epoch", api=self.api, epoch=int(epoch), count=rec.counts["epochs"] + 1)
            model = self.model
            for layer in _compat.flatten_layers(model) if model is not None else ():
                if getattr(layer, "stateful", False):
                    key = f"{model.name}/{layer.name}"
                    entry = rec.stateful.setdefault(
                        key, {"layer": layer.name, "class": type(layer).__name__, "epochs": 0, "resets": 0}
                    )
                    entry["epochs"] += 1
                    entry["resets"] = rec.resets.get(id(layer), 0)
            rec.count("epochs")

    rec.watch = Watch
    _wrap_fit(rec, keras.Model, "Model.fit")
    _wrap_predict(rec, keras.Model, "Model.predict")
    _wrap_api(rec, keras.Model, "evaluate")
    for name in ("train_on_batch", "test_on_batch", "predict_on_batch"):
        _wrap_api(rec, keras.Model, name, count="batches")


def _wrap_api(rec: Recorder, cls, name: str, count: str | None = None) -> None:
    method = getattr(cls, name)

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return rec.call_api(method, self, *args, **kwargs)
        finally:
            if count and rec.api_depth == 0:
                rec.count(count)

    setattr(cls, name, wrapped)


def _wrap_fit(rec: Recorder, cls, api: str) -> None:
    fit = cls.fit

    @functools.wraps(fit)
    def wrapped(self, *args, **kwargs):
        callbacks = list(kwargs.get("callbacks") or [])
        kwargs["callbacks"] = callbacks + [rec.watch(api)]
        outer = rec.api_depth == 0
        if outer:
            rec.counts["fits"] += 1
            arrays = list(args[:2]) + [kwargs.get("x"), kwargs.get("y"), kwargs.get("validation_data")]
            nbytes = _nbytes(arrays)
            rec.event("fit_begin", api=api)
            if nbytes:
                rec.event("data", source=api, nbytes=nbytes)
        try:
            return rec.call_api(fit, self, *args, **kwargs)
        finally:
            if outer:
                rec.event("fit_end", api=api)

    cls.fit = wrapped


def _wrap_predict(rec: Recorder, cls, api: str) -> None:
    predict = cls.predict

    @functools.wraps(predict)
    def wrapped(self, *args, **kwargs):
        if rec.predict_depth:  # a predict inside a predict (a routed Model.predict): the outer one reports
            return predict(self, *args, **kwargs)
        t0 = time.perf_counter()
        before = rec.read()[1]
        rec.predict_depth += 1
        try:
            result = rec.call_api(predict, self, *args, **kwargs)
            rec.returned(result)
            return result
        finally:
            rec.predict_depth -= 1
            rows = _rows(args[0] if args else kwargs.get("x"))
            seconds = time.perf_counter() - t0
            n = rec.counts["predicts"] + 1
            rec.event("predict", api=api, count=n, rows=rows, seconds=seconds, before_mb=before)
            rec.count("predicts")

    cls.predict = wrapped


def _patch_safetrain(rec: Recorder) -> None:
    from safetrain.trainer import SafeTrainer

    _wrap_fit(rec, SafeTrainer, "SafeTrainer.fit")
    _wrap_predict(rec, SafeTrainer, "SafeTrainer.predict")
    _wrap_api(rec, SafeTrainer, "evaluate")


def child_main(argv: Sequence[str]) -> int:
    """In the child: `OUT script [args...]`: install the instrumentation, run the script, write OUT."""
    out_path, script, *script_args = argv
    rec = Recorder(out_path)
    rec.sites = Sites(script)
    _install(rec)
    # The script's namespace stays alive until the last census: what it holds at the end is evidence.
    with as_main(script, script_args, restore=False) as module:
        try:
            run_script(module)
        except SystemExit as e:
            rec.exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # the script's own failure: report it, then diagnose what ran
            import traceback

            rec.exit_code = 1
            rec.error = "".join(traceback.format_exception_only(type(e), e)).strip()
            traceback.print_exc()
        finally:
            rec.finish()
    return rec.exit_code
