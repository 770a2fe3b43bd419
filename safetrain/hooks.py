"""Hooks for custom layers: reset their state, release their caches, survive re-hydration.

A layer opts in by defining any of these methods:

    class CachedEmbedding(keras.layers.Layer):
        def reset_state(self):                 # called by ResetStates
            self.hits.assign(0)
        def release_memory(self):              # called before a session is cleared, and by policies
            self._cache.clear()                #   that free memory: drop what can be recomputed
        def after_rehydrate(self, snapshot):   # called on the rebuilt layer after its state is restored
            self._cache = {}

For a layer class you do not own, register functions instead (they receive the layer first):

    safetrain.hooks.register(ThirdPartyLayer, reset=lambda layer: layer.clear(),
                             release=lambda layer: layer.cache.clear())

Keras's stateful RNN layers (`stateful=True`) are reset through their own `reset_state()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras

from safetrain import _compat

__all__ = ["register", "unregister", "reset_states", "release_memory", "after_rehydrate", "layers_of"]

_REGISTRY: dict[type, dict[str, Callable | None]] = {}


def register(
    layer_class: type,
    *,
    reset: Callable | None = None,
    release: Callable | None = None,
    after_rehydrate: Callable | None = None,
) -> None:
    """Give `layer_class` (and its subclasses) hooks without editing it.

    Each function receives the layer (and `after_rehydrate` also the `Snapshot`). A registered function
    takes precedence over a method of the same role defined by the class.

    Example:
        >>> register(keras.layers.LSTM, reset=lambda layer: print("reset", layer.name))
    """
    if not isinstance(layer_class, type) or not issubclass(layer_class, keras.layers.Layer):
        raise TypeError(f"`layer_class` must be a keras.layers.Layer subclass, got {layer_class!r}.")
    for name, fn in (("reset", reset), ("release", release), ("after_rehydrate", after_rehydrate)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")
    if reset is None and release is None and after_rehydrate is None:
        raise ValueError("register() needs at least one of `reset`, `release`, `after_rehydrate`.")
    _REGISTRY[layer_class] = {"reset": reset, "release": release, "after_rehydrate": after_rehydrate}


def unregister(layer_class: type) -> None:
    """Remove hooks registered for `layer_class`."""
    _REGISTRY.pop(layer_class, None)


def _registered(layer, role: str) -> Callable | None:
    for cls in type(layer).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None and entry.get(role) is not None:
            return entry[role]
    return None


def layers_of(model: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    """Every layer of `model`, the model itself included, each once."""
    yield from _compat.flatten_layers(model)


def _is_stateful_rnn(layer) -> bool:
    return bool(getattr(layer, "stateful", False)) and hasattr(layer, "reset_state")


def _dispatch(model: keras.layers.Layer, role: str, method: str, *args, also=None) -> int:
    """Call the `role` hook of every layer that has one (registered function first, else the layer's own
    `method`, else `also(layer)` if given and true); returns how many layers were called."""
    count = 0
    for layer in layers_of(model):
        fn = _registered(layer, role)
        if fn is not None:
            fn(layer, *args)
        elif _defines(layer, method) or (also is not None and also(layer)):
            getattr(layer, method)(*args)
        else:
            continue
        count += 1
    return count


def reset_states(model: keras.layers.Layer) -> int:
    """Reset every stateful layer of `model` (stateful RNNs and layers with a reset hook); returns how many."""
    return _dispatch(model, "reset", "reset_state", also=_is_stateful_rnn)


def release_memory(model: keras.layers.Layer) -> int:
    """Ask every layer of `model` with a release hook to drop its caches; returns how many were asked."""
    return _dispatch(model, "release", "release_memory")


def after_rehydrate(model: keras.layers.Layer, snapshot) -> int:
    """Call every `after_rehydrate` hook of the rebuilt `model`; returns how many were called."""
    return _dispatch(model, "after_rehydrate", "after_rehydrate", snapshot)


def _defines(layer, name: str) -> bool:
    """True when the layer's class (not Keras's base classes) defines `name` as a method."""
    for cls in type(layer).__mro__:
        if cls.__module__.split(".")[0] == "keras":  # Keras's own classes: not a user hook
            return False
        if name in vars(cls):
            return callable(vars(cls)[name])
    return False
