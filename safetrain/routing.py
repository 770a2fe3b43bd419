"""Route `model.fit`, `model.evaluate` and `model.predict` through `SafeTrainer`, process-wide.

For code you do not own (KerasTuner, a library's training helper, a notebook you inherit): every Keras
model (a `keras.Model`, or any Keras layer that is a Keras trainer) then trains with SafeTrainer's compiled
steps and memory hygiene, and returns what Keras would. Each model gets one trainer, made on its first
call and kept on the model (freed with it) until the model is compiled again.

    >>> import safetrain
    >>> with safetrain.install():          # or safetrain.install() ... safetrain.uninstall()
    ...     tuner.search(x, y, epochs=5, validation_split=0.2)
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

from safetrain import _compat

__all__ = ["install", "uninstall", "installed", "Installation", "trainer_of"]

_ROUTED = ("fit", "evaluate", "predict")
_ATTRIBUTE = "_safetrain_routed"  # on the model: (compile token, trainer)
_lock = threading.Lock()
_originals: dict[str, Callable] = {}
_options: dict[str, Any] = {}


class Installation:
    """What `install()` returns; a context manager that uninstalls on exit.

    Example:
        >>> with safetrain.install(policies=lambda: [safetrain.GarbageCollect()]):
        ...     model.fit(x, y)       # a SafeTrainer fit
        >>> model.fit(x, y)           # Keras's own again
    """

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc_info) -> None:
        uninstall()


def install(**trainer_kwargs: Any) -> Installation:
    """Route `fit`, `evaluate` and `predict` of every Keras model through `SafeTrainer` until `uninstall()`.

    Args:
        **trainer_kwargs: passed to every `SafeTrainer` made (`memory_logs`, `steps_per_execution`, ...).
            `policies` may be a zero-argument callable returning fresh policies for each model (policy
            objects keep per-run state, so a list is shared by every model).

    Returns an `Installation`, usable as a context manager. Calling `install` again replaces the options.

    Example:
        >>> safetrain.install()
        >>> model.fit(x, y, epochs=3)      # SafeTrainer(model).fit(x, y, epochs=3), the trainer kept
        >>> safetrain.trainer_of(model).trace_counts
        {'train': 1, 'test': 0, 'predict': 0}
        >>> safetrain.uninstall()
    """
    from safetrain.trainer import SafeTrainer

    unknown = set(trainer_kwargs) - set(list(inspect.signature(SafeTrainer).parameters)[1:])
    if unknown:
        raise TypeError(f"install: unknown SafeTrainer argument(s) {sorted(unknown)}.")
    policies = trainer_kwargs.get("policies")
    if policies is not None and not callable(policies) and not isinstance(policies, Sequence):
        raise TypeError(f"install: `policies` must be a sequence of policies or a callable, got {policies!r}.")
    with _lock:
        _options.clear()
        _options.update(trainer_kwargs)
        target = _compat.TensorFlowTrainer
        for name in _ROUTED:
            if name not in _originals:
                _originals[name] = target.__dict__[name]
                setattr(target, name, _routed(name, _originals[name]))
    return Installation()


def uninstall() -> None:
    """Give `fit`, `evaluate` and `predict` back to Keras (a no-op when not installed). Trainers already
    kept on models are dropped with their models."""
    with _lock:
        target = _compat.TensorFlowTrainer
        for name, original in _originals.items():
            setattr(target, name, original)
        _originals.clear()
        _options.clear()


def installed() -> bool:
    """True while `install()` is in effect."""
    return bool(_originals)


def trainer_of(model) -> Any:
    """The `SafeTrainer` the routed calls of `model` use (None before its first routed call, or after it
    was compiled again)."""
    kept = model.__dict__.get(_ATTRIBUTE)
    if kept is None or kept[0] is not _compat.compile_token(model):
        return None
    return kept[1]


def _trainer_for(model):
    from safetrain.trainer import SafeTrainer

    trainer = trainer_of(model)
    if trainer is None:
        options = dict(_options)
        if callable(options.get("policies")):
            options["policies"] = options["policies"]()
        trainer = SafeTrainer(model, **options)
        # Kept in the instance dict directly: Keras's attribute tracking is for layers and variables. The
        # trainer refers back to the model: a cycle, collected with the model.
        object.__setattr__(model, _ATTRIBUTE, (_compat.compile_token(model), trainer))
    return trainer


def _routed(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return getattr(_trainer_for(self), name)(*args, **kwargs)

    method.__safetrain_original__ = original  # type: ignore[attr-defined]
    return method
