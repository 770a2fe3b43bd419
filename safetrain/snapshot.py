"""Re-hydration: capture everything training depends on, clear the session, rebuild, restore exactly.

A `Snapshot` is structure plus state. Structure: the model's Keras config (or the factory the trainer was
given) and how it was compiled. State: every model variable (weights, non-trainable variables and the
seed-generator states that make Dropout reproducible), every optimizer variable (iterations, learning
rate, slots), every metric variable, Keras's global seed-generator state, and the trainer's counters and
data-shuffling seed. Restoring all of it makes a run that was re-hydrated bit-identical to one that was
not; restoring only weights (or a `.keras` round trip, which drops seed state) does not.

Example:
    >>> snap = Snapshot.take(trainer)
    >>> keras.backend.clear_session()
    >>> snap.restore(trainer)          # trainer.model is a new model in exactly the old state
    >>> trainer.rehydrate()            # the same three steps, plus callbacks re-pointed and caches released
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from safetrain import _compat, hooks
from safetrain.errors import ConfigurationError, SnapshotMismatch

__all__ = ["Snapshot", "SnapshotMismatch", "check_rebuildable", "rehydrate", "signature"]

_COMPILE_ARGS = ("loss", "loss_weights", "metrics", "weighted_metrics")


def _class_objects(model: keras.Model) -> dict[str, type]:
    """Every class used by the model's layers, by name: custom layers rebuild without registration."""
    objects: dict[str, type] = {}
    for layer in hooks.layers_of(model):
        cls = type(layer)
        if cls.__module__.split(".")[0] != "keras":
            objects[cls.__name__] = cls
    return objects


def check_rebuildable(trainer) -> None:
    """Raise a clear `ConfigurationError` now if re-hydration could not rebuild the trainer's model later."""
    model = trainer.model
    recipes(model)  # every compile argument must be re-creatable, with or without a factory
    if trainer.factory is not None:
        return
    try:
        config = keras.saving.serialize_keras_object(model)
        objects = dict(_class_objects(model), **(trainer.custom_objects or {}))
        with keras.saving.custom_object_scope(objects):
            probe = keras.saving.deserialize_keras_object(
                {k: v for k, v in config.items() if k not in ("compile_config", "build_config")}
            )
    except Exception as e:  # noqa: BLE001 - any failure means "cannot round-trip"; say so with the cause
        cause = " ".join(line.strip() for line in str(e).strip().splitlines()[:4] if line.strip())
        raise ConfigurationError(
            f"Re-hydration cannot rebuild {type(model).__name__} from its config ({type(e).__name__}: {cause}). "
            "Give SafeTrainer a factory instead, e.g. SafeTrainer(lambda: build_model()), or implement "
            "get_config()/from_config() on the model (the full cause is chained below)."
        ) from e
    del probe


def _stateful(obj) -> bool:
    """Keras objects that hold variables or state: never to be shared with a model of a cleared session."""
    return isinstance(
        obj, (keras.optimizers.Optimizer, keras.metrics.Metric, keras.losses.Loss, keras.layers.Layer)
    ) or hasattr(obj, "get_config")


def _recipe(obj, what: str) -> Callable[[], Any]:
    """How to make a fresh copy of a compile argument (optimizer, loss, metric) later, sharing no state.

    Only the class and config are kept, so a snapshot never holds the old model's optimizer or metrics. A
    stateful object that cannot be re-created is refused (`ConfigurationError`, naming `what`); only a
    stateless plain function is shared as it is.
    """
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return lambda: obj
    if isinstance(obj, (list, tuple)):
        parts = [_recipe(o, f"{what}[{i}]") for i, o in enumerate(obj)]
        kind = type(obj)
        return lambda: kind(p() for p in parts)
    if isinstance(obj, dict):
        named = {k: _recipe(v, f"{what}[{k!r}]") for k, v in obj.items()}
        return lambda: {k: p() for k, p in named.items()}
    errors = []
    if hasattr(obj, "get_config") and hasattr(type(obj), "from_config"):
        try:
            cls, config = type(obj), obj.get_config()
            cls.from_config(config)  # fails now, not after the session is gone
            return lambda: cls.from_config(config)
        except Exception as e:  # noqa: BLE001 - try Keras's serializer next
            errors.append(e)
    try:
        serialized = keras.saving.serialize_keras_object(obj)
        keras.saving.deserialize_keras_object(serialized)
        return lambda: keras.saving.deserialize_keras_object(serialized)
    except Exception as e:  # noqa: BLE001
        errors.append(e)
    if callable(obj) and not _stateful(obj):
        return lambda: obj  # a plain function: stateless, safe to share
    cause = f" ({type(errors[0]).__name__}: {errors[0]})" if errors else ""
    raise ConfigurationError(
        f"Re-hydration cannot re-create the compile argument `{what}` ({type(obj).__name__}) from its config"
        f"{cause}; sharing it with the rebuilt model would carry the cleared session's state over. Give it "
        "a working get_config()/from_config(), or pass SafeTrainer a factory that compiles the model."
    ) from (errors[0] if errors else None)


def recipes(model: keras.Model) -> dict[str, Callable[[], Any]]:
    """Recipes for every argument `model.compile` got (the optimizer included); {} for an uncompiled model."""
    if not model.compiled:
        return {}
    given = _compat.compile_config(model)
    made = {k: _recipe(given.get(k), k) for k in _COMPILE_ARGS}
    made["optimizer"] = _recipe(model.optimizer, "optimizer")
    return made


def signature(model: keras.Model) -> dict[str, list]:
    """Shapes and dtypes of every variable group, and the layer classes: what a checkpoint must match.

    Names are left out on purpose: Keras uniquifies them per process (`dense_3/kernel`), so the same
    architecture built in a fresh process has other names but the same signature.
    """

    def describe(variables):
        return [[list(v.shape), str(v.dtype)] for v in variables]

    optimizer = model.optimizer if getattr(model, "compiled", False) else None
    return {
        "layers": [type(layer).__name__ for layer in hooks.layers_of(model)],
        "model": describe(model.variables),
        "optimizer": describe(optimizer.variables) if optimizer is not None and optimizer.built else [],
        "metrics": describe(model.metrics_variables),
    }


def _values(variables) -> list[np.ndarray]:
    # `numpy()` of a variable reads it into a new buffer: a copy that later updates do not touch.
    return [np.asarray(v.numpy()) for v in variables]


def _assign(what: str, variables, values: list[np.ndarray]) -> None:
    if len(variables) != len(values):
        raise SnapshotMismatch(
            f"{what}: the rebuilt model has {len(variables)} variables, the snapshot "
            f"{len(values)}; was the model or its compile configuration changed?"
        )
    for i, (var, value) in enumerate(zip(variables, values)):
        if tuple(var.shape) != value.shape:
            raise SnapshotMismatch(
                f"{what}[{i}] ({getattr(var, 'path', var.name)}): shape {tuple(var.shape)} in "
                f"the rebuilt model, {value.shape} in the snapshot."
            )
        var.assign(value)


@dataclasses.dataclass
class Snapshot:
    """Structure + state of a trainer's model, enough to rebuild it exactly after `clear_session`."""

    structure: dict | None
    factory: Callable[[], keras.Model] | None
    compile_args: dict[str, Callable[[], Any]]
    element_spec: Any
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]
    metric_values: list[np.ndarray]
    global_seed: np.ndarray | None
    counters: dict[str, Any]
    custom_objects: dict[str, Any]

    @classmethod
    def take(cls, trainer, structure: bool = True) -> Snapshot:
        """Capture the trainer's model, optimizer, metrics, RNG state and counters (copies, not references).

        `structure=False` captures values only (what a checkpoint needs: the process that loads it builds
        the model with its own code), which skips serializing the config and compile arguments.
        """
        model = trainer.model
        if not model.built:
            raise ConfigurationError("Snapshot.take: the model is not built yet; train or build it first.")
        config = None
        if structure and trainer.factory is None:
            config = keras.saving.serialize_keras_object(model)
            config = {k: v for k, v in config.items() if k != "compile_config"}
        compile_args = recipes(model) if structure else {}
        seed_state = _compat.global_seed_state()
        optimizer = model.optimizer if model.compiled else None
        return cls(
            structure=config,
            factory=trainer.factory,
            compile_args=compile_args,
            element_spec=trainer.train_spec,
            model_values=_values(model.variables),
            optimizer_values=_values(optimizer.variables) if optimizer is not None and optimizer.built else [],
            metric_values=_values(model.metrics_variables),
            global_seed=None if seed_state is None else np.array(seed_state.numpy(), copy=True),
            counters=trainer.progress.counters(),
            custom_objects=dict(_class_objects(model), **(trainer.custom_objects or {})),
        )

    def _rebuild_model(self, strategy) -> keras.Model:
        with strategy.scope():
            if self.factory is not None:
                model = self.factory()
                if not isinstance(model, keras.Model):
                    raise TypeError(f"The model factory must return a keras.Model, got {type(model).__name__}.")
                return model
            with keras.saving.custom_object_scope(self.custom_objects):
                return keras.saving.deserialize_keras_object(self.structure)

    def restore(self, trainer) -> keras.Model:
        """Rebuild the model into `trainer` and put every captured value back; returns the new model."""
        strategy = trainer.strategy
        model = self._rebuild_model(strategy)
        if self.compile_args:
            with strategy.scope():  # an optimizer belongs to the strategy current when it is made
                args = {k: make() for k, make in self.compile_args.items()}
                model.compile(**args, jit_compile=trainer.jit_compile)
        trainer.model = model
        if self.element_spec is not None:
            trainer.build(self.element_spec)
        elif not model.built:
            raise ConfigurationError("Snapshot.restore: no input spec recorded and the rebuilt model is not built.")
        self.restore_values(trainer)
        return model

    def restore_values(self, trainer, metrics: bool = True, counters: bool = True, notify: bool = True) -> None:
        """Put the captured values into the trainer's current (built) model and optimizer, and (unless
        told not to) its metric state and counters; `notify`: tell the model's hooks (`after_rehydrate`)."""
        model = trainer.model
        _assign("model.variables", model.variables, self.model_values)
        if self.optimizer_values:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            _assign("optimizer.variables", model.optimizer.variables, self.optimizer_values)
        if metrics:
            _assign("model.metrics_variables", model.metrics_variables, self.metric_values)
        if self.global_seed is not None:
            _compat.make_global_seed_state().assign(self.global_seed)
        if counters:
            trainer.load_progress(self.counters)
        if notify:
            hooks.after_rehydrate(model, self)

    # -- on disk (see safetrain.checkpoint): values only; the structure comes from the user's own code ----
    def arrays(self) -> dict[str, np.ndarray]:
        """Every captured value, named `model/0000`, `optimizer/0000`, `metrics/0000`, `seed/global`."""
        out = {}
        for group, values in (
            ("model", self.model_values),
            ("optimizer", self.optimizer_values),
            ("metrics", self.metric_values),
        ):
            out.update({f"{group}/{i:04d}": v for i, v in enumerate(values)})
        if self.global_seed is not None:
            out["seed/global"] = self.global_seed
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], counters: dict[str, Any]) -> Snapshot:
        """The values of a checkpoint, to `restore_values` into a model built by the same code."""

        def group(name):
            return [arrays[k] for k in sorted(k for k in arrays if k.startswith(name + "/"))]

        return cls(
            structure=None,
            factory=None,
            compile_args={},
            element_spec=None,
            model_values=group("model"),
            optimizer_values=group("optimizer"),
            metric_values=group("metrics"),
            global_seed=arrays.get("seed/global"),
            counters=counters,
            custom_objects={},
        )

    @property
    def nbytes(self) -> int:
        """Bytes of captured variable values."""
        return sum(v.nbytes for v in self.model_values + self.optimizer_values + self.metric_values)


def rehydrate(trainer) -> Snapshot:
    """`trainer.rehydrate()`: snapshot, release caches, clear the session, rebuild, restore, re-point callbacks.

    If the rebuild fails, the trainer keeps its old model (its variables outlive `clear_session`; its steps
    trace again on the next call) and the error is raised.
    """
    trainer.check_rehydratable()
    t0 = time.perf_counter()
    old = trainer.model
    snapshot = Snapshot.take(trainer)
    hooks.release_memory(old)
    stop_training = bool(getattr(old, "stop_training", False))
    trainer.steps.reset()
    keras.backend.clear_session()
    try:
        model = snapshot.restore(trainer)
    except BaseException:
        trainer.model = old
        raise
    model.stop_training = stop_training
    if trainer.callbacks is not None:
        trainer.callbacks.set_model(model)
    del old
    gc.collect()  # the old model is unreachable only now that callbacks point at the new one
    trainer.rehydrations += 1
    trainer.last_rehydration_seconds = time.perf_counter() - t0
    return snapshot
