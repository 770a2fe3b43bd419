"""Checks run before any step: call arguments, and the data against the model.

`safetrain.data` validates inputs on their own (lengths, batch sizes, types); what needs the model lives here: do
the inputs' shapes and dtypes fit the model's inputs, are sparse labels within the model's classes, are the
inputs finite (with `check_inputs=True`). A data error during a step (a generator that raises, a label out of
range in a dataset, a NaN caught by `check_inputs`) becomes a `DataError` that names the epoch and batch.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from safetrain import _compat
from safetrain.errors import DataError

__all__ = [
    "DataError",
    "reject_unknown",
    "check_int",
    "resolve_verbose",
    "check_fit_arguments",
    "check_data",
    "check_against_model",
    "check_sparse_labels",
    "check_finite_arrays",
    "finite_guard",
]


def reject_unknown(kwargs: Mapping, method: Callable, what: str) -> None:
    """Raise `TypeError` naming unknown keyword arguments of `method`, with "did you mean" suggestions."""
    if not kwargs:
        return
    known = [p for p in inspect.signature(method).parameters if p not in ("self", "kwargs")]
    parts = []
    for k in kwargs:
        close = difflib.get_close_matches(k, known, n=1)
        parts.append(f"`{k}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise TypeError(f"{what}() got unknown keyword argument(s) {', '.join(parts)}; accepted: {', '.join(known)}.")


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    """Raise naming `name` unless `value` is an integer >= `minimum` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer{' or None' if allow_none else ''}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def resolve_verbose(verbose) -> int:
    """Keras's `verbose` ("auto", 0, 1, 2) as 0, 1 or 2."""
    if verbose == "auto":
        return 1
    # True and False are 1 and 0 to Keras too (its progress bar compares `verbose == 1`).
    if isinstance(verbose, str) or verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2, got {verbose!r}.")
    return int(verbose)


def _shape(spec) -> str:
    return str(tuple(spec.shape.as_list())) if spec.shape.rank is not None else "(unknown rank)"


def _shape_fits(got: list, want: list) -> bool:
    """Whether a batch of shape `got` fits a model input of shape `want` as Keras decides it.

    (Only functional and Sequential models declare inputs, and those are the models that do this.) Keras's
    functional models (Sequential ones too) accept an input one rank off when the difference is a
    trailing axis of size 1: `(n, 28, 28)` for `Input((28, 28, 1))` (the axis is added), `(n, 8, 1)` for
    `Input((8,))` (it is squeezed). The other dimensions must match where both are known.
    """
    if len(got) == len(want) + 1 and got[-1] == 1:
        got = got[:-1]
    elif len(got) == len(want) - 1 and want and want[-1] == 1:
        want = want[:-1]
    if len(got) != len(want):
        return False
    return all(w is None or g is None or w == g for g, w in zip(got[1:], want[1:]))


def check_against_model(model, x_spec, what: str) -> None:
    """`x`'s element spec against the model's declared inputs (functional and Sequential models).

    Raises `ValueError` naming the input, the shape or dtype received and the one expected.
    """
    expected = _compat.model_inputs(model)
    if expected is None or x_spec is None:
        return
    if isinstance(x_spec, dict) and not isinstance(expected, dict):
        # Keras matches a dict of inputs to a model whose inputs are a list by the inputs' names.
        by_name = {getattr(t, "name", None): t for t in tree.flatten(expected)}
        if None not in by_name and set(x_spec) >= set(by_name):
            expected = by_name
    if isinstance(expected, dict) and isinstance(x_spec, dict):
        missing = sorted(set(expected) - set(x_spec))
        missing = [k for k in missing if not _compat.input_is_optional(expected[k])]
        if missing:
            raise ValueError(
                f"{what}: `x` has no input named {', '.join(map(repr, missing))}; the model's inputs are "
                f"{sorted(expected)} and `x` gives {sorted(x_spec)}."
            )
        pairs = [(f"x[{k!r}]", x_spec[k], expected[k]) for k in expected if k in x_spec]
    else:
        flat_expected = tree.flatten(expected)
        flat_x = tree.flatten(x_spec)
        if len(flat_expected) != len(flat_x):
            raise ValueError(f"{what}: the model takes {len(flat_expected)} input(s) but `x` gives {len(flat_x)}.")
        names = ["x"] if len(flat_x) == 1 else [f"x[{i}]" for i in range(len(flat_x))]
        pairs = list(zip(names, flat_x, flat_expected))
    for name, got, want in pairs:
        if isinstance(got, type(_compat.none_spec())):
            if not _compat.input_is_optional(want):
                raise ValueError(
                    f"{what}: The input '{getattr(want, 'name', name)}' is not optional, but None was passed "
                    f"(as `{name}`). Please provide a valid tensor."
                )
            continue
        if not isinstance(got, tf.TensorSpec):
            continue
        want_shape = tuple(want.shape)
        got_shape = got.shape.as_list() if got.shape.rank is not None else None
        if got_shape is not None and not _shape_fits(got_shape, list(want_shape)):
            raise ValueError(
                f"{what}: `{name}` has shape {_shape(got)} per batch, but the model expects "
                f"{tuple(want_shape)} (the first dimension is the batch)."
            )
        if (got.dtype == tf.string) != (str(want.dtype) == "string"):
            raise TypeError(
                f"{what}: `{name}` has dtype {got.dtype.name}, but the model's input "
                f"{getattr(want, 'name', '')!r} expects {want.dtype}."
            )


def _sparse_loss(loss) -> bool:
    if isinstance(loss, str):
        return loss in ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True
    return getattr(loss, "__name__", "") == "sparse_categorical_crossentropy"


def _ignore_class(loss):
    """`SparseCategoricalCrossentropy(ignore_class=...)`'s label, which Keras masks out of the loss."""
    return getattr(loss, "ignore_class", None) if isinstance(loss, keras.losses.SparseCategoricalCrossentropy) else None


def check_sparse_labels(model, y, what: str) -> None:
    """For a single-output model compiled with a sparse categorical loss: every label in `[0, classes)`."""
    if y is None or tree.is_nested(y) or not _sparse_loss(getattr(model, "loss", None)):
        return
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or outputs[0].shape[-1] is None:
        return
    classes = int(outputs[0].shape[-1])
    labels = np.asarray(y)
    if not np.issubdtype(labels.dtype, np.number) or labels.size == 0:
        return
    flat = labels.reshape(len(labels), -1)
    outside = (flat < 0) | (flat >= classes)
    ignored = _ignore_class(model.loss)
    if ignored is not None:
        outside &= flat != ignored
    bad = np.flatnonzero(outside.any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what}: `y` holds labels outside [0, {classes}) for the model's {classes} classes: "
            f"sample {i} has label {labels[i].tolist()} ({bad.size} such sample(s)). Sparse "
            "categorical losses expect class indices."
        )


def check_finite_arrays(arrays: dict, what: str, batch_size: int | None = None) -> None:
    """`check_inputs=True` with arrays: raise naming the argument and the first sample with NaN or Inf."""
    for name, value in arrays.items():
        for leaf in tree.flatten(value):
            if leaf is None:
                continue
            a = np.asarray(leaf)
            if not np.issubdtype(a.dtype, np.floating):
                continue
            bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
            if bad.size:
                i = int(bad[0])
                where = f" (batch {i // batch_size} without shuffling)" if batch_size else ""
                raise ValueError(
                    f"{what}: `{name}` contains NaN or Inf: sample {i}{where}, "
                    f"{bad.size} sample(s) in all (check_inputs=True)."
                )


def finite_guard(data):
    """Inside a step (`check_inputs=True`): fail on NaN/Inf in any float input, naming which input."""
    flat = tree.flatten(data)
    checked = []
    for i, t in enumerate(flat):
        if isinstance(t, tf.Tensor) and t.dtype.is_floating:
            t = tf.debugging.check_numerics(t, f"check_inputs: element {i} of the batch contains NaN or Inf")
        checked.append(t)
    return tree.pack_sequence_as(data, checked)


def check_fit_arguments(
    epochs, initial_epoch, steps_per_epoch, validation_steps, validation_batch_size, validation_freq
) -> None:
    """`fit`'s counting arguments, each named in the error when it is not what Keras accepts."""
    check_int("epochs", epochs, 0)
    check_int("initial_epoch", initial_epoch, 0)
    if epochs < initial_epoch:
        raise ValueError(
            f"`epochs` ({epochs}) must be >= `initial_epoch` ({initial_epoch}): `epochs` is "
            "the index of the last epoch, not a count of epochs to add."
        )
    check_int("steps_per_epoch", steps_per_epoch, 1, allow_none=True)
    check_int("validation_steps", validation_steps, 1, allow_none=True)
    check_int("validation_batch_size", validation_batch_size, 1, allow_none=True)
    if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
        check_int("validation_freq", validation_freq, 1)
    elif not (
        isinstance(validation_freq, (list, tuple))
        # Keras tests `epoch in validation_freq`: 2.0 matches epoch 2; a string or a bool is refused as nonsense.
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in validation_freq)
    ):
        raise TypeError(f"`validation_freq` must be an int or a list of epoch numbers, got {validation_freq!r}.")


def check_data(model, batches, x, y, sample_weight, what: str, check_inputs: bool = False) -> None:
    """Refuse, before any step, data that does not fit the model: its inputs' shapes and dtypes, sparse labels
    in range, and (with `check_inputs`) no NaN/Inf in float arrays."""
    x_spec, _, _ = keras.utils.unpack_x_y_sample_weight(batches.element_spec)
    check_against_model(model, x_spec, what)
    if batches.kind == "arrays":
        check_sparse_labels(model, y, what)
        if check_inputs:
            check_finite_arrays(
                {"x": x, "y": y, "sample_weight": sample_weight},
                what,
                batches.batch_size if not batches.shuffle else None,
            )
