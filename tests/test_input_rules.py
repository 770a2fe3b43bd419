"""Keras's own input rules, not stricter ones.

Every refusal safetrain makes before training is either one `model.fit` (or `evaluate`/`predict`) makes too
(first table: both raise), or a documented case where Keras trains silently on nonsense (second table: Keras
runs, safetrain refuses; each is a line of the README's "Differences from `model.fit`"). What Keras accepts
and trains on sensibly, safetrain accepts with `model.fit`'s numbers (the tests after the tables).
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_same_training, run_both

from safetrain import SafeTrainer

RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 4)).astype("float32")
Y = RNG.standard_normal((16, 1)).astype("float32")
LABELS = RNG.integers(0, 3, (16,)).astype("int32")


def mlp(compile=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    if compile:
        model.compile(optimizer="sgd", loss="mse")
    return model


def classifier(**loss_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, **loss_kwargs))
    return model


def two_inputs():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    model.compile(optimizer="sgd", loss="mse")
    return model


def two_outputs():
    keras.utils.set_random_seed(0)
    a = keras.Input((4,))
    model = keras.Model(a, [keras.layers.Dense(1)(a), keras.layers.Dense(1)(a)])
    model.compile(optimizer="sgd", loss=["mse", "mse"])
    return model


def string_input():
    i = keras.Input((1,), dtype="string")
    ids = keras.ops.cast(keras.layers.StringLookup(vocabulary=["a", "b"])(i), "float32")
    model = keras.Model(i, keras.layers.Dense(1)(ids))
    model.compile(optimizer="sgd", loss="mse")
    return model


def ds(*tensors):
    return tf.data.Dataset.from_tensor_slices(tensors).batch(4)


def gen():
    for i in range(0, 16, 4):
        yield X[i : i + 4], Y[i : i + 4]


def no_batches():
    return
    yield


class Batches(keras.utils.PyDataset):
    def __init__(self, n=4):
        super().__init__()
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return X[4 * i : 4 * i + 4], Y[4 * i : 4 * i + 4]


def call(target, method, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's own warnings on the way to its error
        return getattr(target, method)(**kwargs)


class Fresh:
    """An argument made anew for each call (a generator is used up by the first)."""

    def __init__(self, make):
        self.make = make


def on(method, **kwargs):
    def arguments():
        made = {k: v.make() if isinstance(v, Fresh) else v for k, v in kwargs.items()}
        return dict(dict(verbose=0), **made)

    return method, arguments


def fit(**kwargs):
    return on("fit", **dict(dict(x=X, y=Y), **kwargs))


def assert_refused_before_any_step(build, method, kwargs):
    model = build()
    before = model.get_weights()
    with pytest.raises((ValueError, TypeError)):
        call(SafeTrainer(model), method, kwargs())
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# (name, model, (method, the call's arguments, built afresh: generators are used up)). Labels out of range:
# TensorFlow raises on CPU, where this runs; on GPU Keras trains on NaN (a README line says so).
BOTH_REFUSE = [
    ("epochs float", mlp, fit(epochs=1.5)),
    ("steps_per_epoch negative", mlp, fit(steps_per_epoch=-1)),
    ("steps_per_epoch float", mlp, fit(steps_per_epoch=2.0)),
    ("validation_steps negative", mlp, fit(validation_data=(X, Y), validation_steps=-1)),
    ("validation_batch_size negative", mlp, fit(validation_data=(X, Y), validation_batch_size=-2)),
    ("validation_batch_size float", mlp, fit(validation_data=(X, Y), validation_batch_size=4.0)),
    ("validation_freq 0", mlp, fit(validation_data=(X, Y), validation_freq=0)),
    ("validation_freq string", mlp, fit(validation_data=(X, Y), validation_freq="1")),
    ("validation_freq numpy int", mlp, fit(validation_data=(X, Y), validation_freq=np.int64(1))),
    ("unknown keyword fit", mlp, fit(bogus=1)),
    ("unknown keyword evaluate", mlp, on("evaluate", x=X, y=Y, bogus=1)),
    ("unknown keyword predict", mlp, on("predict", x=X, bogus=1)),
    ("evaluate steps negative", mlp, on("evaluate", x=X, y=Y, steps=-1)),
    ("batch_size negative", mlp, fit(batch_size=-1)),
    ("batch_size float", mlp, fit(batch_size=4.0)),
    ("batch_size string", mlp, fit(batch_size="4")),
    ("class_weight list", classifier, fit(y=LABELS, class_weight=[1.0, 2.0, 3.0])),
    ("class_weight empty with dataset", classifier, on("fit", x=ds(X, LABELS), class_weight={})),
    ("class_weight float key with dataset", classifier, on("fit", x=ds(X, LABELS), class_weight={1.0: 2.0})),
    ("class_weight and sample_weight", classifier, fit(y=LABELS, class_weight={0: 1.0}, sample_weight=np.ones(16))),
    ("class_weight without y", classifier, fit(y=None, class_weight={0: 1.0})),
    ("class_weight with several outputs", two_outputs, fit(y=[Y, Y], class_weight={0: 1.0})),
    ("class_weight with y a list of one", classifier, fit(y=[LABELS], class_weight={0: 1.0})),
    ("class_weight with a generator", mlp, on("fit", x=Fresh(gen), class_weight={0: 1.0})),
    ("one sample_weight (n, 3), several outputs", two_outputs, fit(y=[Y, Y], sample_weight=np.ones((16, 3)))),
    ("x None", mlp, fit(x=None)),
    ("x a string", mlp, fit(x="train.csv")),
    ("x a set", mlp, fit(x={1, 2})),
    ("x an empty list", mlp, fit(x=[])),
    ("x an empty dict", mlp, fit(x={})),
    ("x and y lengths differ", mlp, fit(y=Y[:10])),
    ("predict on 0 samples", mlp, on("predict", x=X[:0])),
    ("predict on an empty dataset", mlp, on("predict", x=ds(X).take(0))),
    ("predict on an empty generator", mlp, on("predict", x=Fresh(no_batches))),
    ("empty generator", mlp, on("fit", x=Fresh(no_batches))),
    ("empty PyDataset", mlp, on("fit", x=Batches(0))),
    ("validation_split 1.0", mlp, fit(validation_split=1.0)),
    ("validation_split string", mlp, fit(validation_split="0.2")),
    ("validation_split True", mlp, fit(validation_split=True)),
    ("validation_split with a dataset", mlp, on("fit", x=ds(X, Y), validation_split=0.2)),
    ("y with a dataset", mlp, on("fit", x=ds(X), y=Y)),
    ("sample_weight with a dataset", mlp, on("fit", x=ds(X, Y), sample_weight=np.ones(16))),
    ("y with a generator", mlp, on("fit", x=Fresh(gen), y=Y)),
    ("y with a PyDataset", mlp, on("fit", x=Batches(), y=Y)),
    ("validation_data of length 0", mlp, fit(validation_data=())),
    ("validation_data of length 4", mlp, fit(validation_data=(X, Y, Y, Y))),
    ("fit uncompiled", lambda: mlp(compile=False), fit()),
    ("evaluate uncompiled", lambda: mlp(compile=False), on("evaluate", x=X, y=Y)),
    ("sparse labels above the classes", classifier, fit(y=LABELS + 1)),
    ("sparse labels negative", classifier, fit(y=LABELS - 1)),
    ("shape (n, 3) for Input((4,))", mlp, fit(x=X[:, :3])),
    ("shape (n, 4, 2) for Input((4,))", mlp, fit(x=np.ones((16, 4, 2), "float32"))),
    ("shape (n, 4, 1, 1) for Input((4,)): two ranks off", mlp, fit(x=X[..., None, None])),
    ("shape (n,) for Input((4,))", mlp, fit(x=X[:, 0])),
    ("rank off, validation_data", mlp, fit(validation_data=(np.ones((16, 4, 2), "float32"), Y))),
    ("rank off, evaluate", mlp, on("evaluate", x=np.ones((16, 4, 2), "float32"), y=Y)),
    ("rank off, predict", mlp, on("predict", x=np.ones((16, 4, 2), "float32"))),
    ("two inputs given one", two_inputs, fit()),
    ("dict without an input", two_inputs, fit(x={"a": X})),
    ("None for a required input", two_inputs, fit(x=[X, None])),
    ("strings for a numeric input", mlp, fit(x=np.array([["a"] * 4] * 16))),
    ("numbers for a string input", string_input, fit(x=np.ones((16, 1), "float32"))),
]


@pytest.mark.parametrize("build, method_and_kwargs", [pytest.param(b, c, id=n) for n, b, c in BOTH_REFUSE])
def test_safetrain_refuses_only_what_model_fit_refuses(build, method_and_kwargs):
    method, kwargs = method_and_kwargs
    # Any error: Keras's vary (ValueError, TypeError, AttributeError, IndexError, InvalidArgumentError, ...).
    with pytest.raises(Exception):  # noqa: B017
        call(build(), method, kwargs())
    assert_refused_before_any_step(build, method, kwargs)


# Keras runs these without an error, on input that makes no sense; safetrain refuses them before any step.
# Each is a line of the README's "Differences from `model.fit`" (what Keras does instead in the comment).
NONSENSE = [
    ("epochs negative", mlp, fit(epochs=-1)),  # no epoch, empty History
    ("epochs below initial_epoch", mlp, fit(epochs=1, initial_epoch=2)),  # no epoch, empty History
    ("initial_epoch negative", mlp, fit(epochs=1, initial_epoch=-1)),  # epochs -1 and 0
    ("epochs True", mlp, fit(epochs=True)),  # a bool as a count: 1
    ("batch_size True", mlp, fit(batch_size=True)),  # batches of 1
    ("validation_freq True", mlp, fit(validation_data=(X, Y), validation_freq=True)),  # every epoch
    ("validation_freq negative", mlp, fit(validation_data=(X, Y), epochs=2, validation_freq=-1)),  # every epoch
    ("validation_freq list of strings", mlp, fit(validation_data=(X, Y), validation_freq=["1"])),  # never
    ("steps_per_epoch 0", mlp, fit(steps_per_epoch=0)),  # 0 read as None: whole epochs
    ("validation_steps 0", mlp, fit(validation_data=(X, Y), validation_steps=0)),
    ("validation_batch_size 0", mlp, fit(validation_data=(X, Y), validation_batch_size=0)),
    ("batch_size 0", mlp, fit(batch_size=0)),
    ("evaluate steps 0", mlp, on("evaluate", x=X, y=Y, steps=0)),
    ("predict steps 0", mlp, on("predict", x=X, steps=0)),
    ("predict batch_size 0", mlp, on("predict", x=X, batch_size=0)),
    ("verbose 3", mlp, fit(verbose=3)),  # prints nothing
    ("verbose string", mlp, fit(verbose="1")),  # prints nothing
    ("verbose None", mlp, fit(verbose=None)),  # prints nothing
    ("class_weight string key", classifier, fit(y=LABELS, class_weight={"a": 2.0})),  # the key matches no label
    ("class_weight key 0.5", classifier, fit(y=LABELS, class_weight={0.5: 2.0})),  # the key matches no label
    ("shuffle a string", mlp, fit(shuffle="yes")),  # any truthy value shuffles: a typo of "batch" too
    ("shuffle 2", mlp, fit(shuffle=2)),
    ("validation_split negative", mlp, fit(validation_split=-0.1)),  # no validation at all
    ("validation_split above 1", mlp, fit(validation_split=1.5)),  # a split from the wrong end
    ("fit on 0 samples", mlp, fit(x=X[:0], y=Y[:0])),  # no step, empty History
    ("evaluate on 0 samples", mlp, on("evaluate", x=X[:0], y=Y[:0])),  # returns []
    ("fit on an empty dataset", mlp, on("fit", x=ds(X, Y).take(0))),  # no step, empty History
    ("fit on an empty dataset of unknown size", mlp, on("fit", x=ds(X, Y).filter(lambda a, b: False))),
    ("evaluate on an empty dataset", mlp, on("evaluate", x=ds(X, Y).take(0))),  # returns []
    ("one input given two", mlp, fit(x=[X, X])),  # warns, reads the first, ignores the second
]


@pytest.mark.parametrize("build, method_and_kwargs", [pytest.param(b, c, id=n) for n, b, c in NONSENSE])
def test_nonsense_keras_runs_on_is_refused_and_documented(build, method_and_kwargs):
    method, kwargs = method_and_kwargs
    call(build(), method, kwargs())
    assert_refused_before_any_step(build, method, kwargs)


# -- accepted as Keras accepts, with model.fit's numbers -------------------------------------------------


def siamese(shape=(6, 6, 1)):
    """keras.io's siamese contrastive example in small: two `Input(shape)` towers sharing an embedding."""

    def build():
        keras.utils.set_random_seed(0)
        i = keras.Input(shape)
        embedding = keras.Model(i, keras.layers.Dense(2)(keras.layers.Flatten()(i)))
        a, b = keras.Input(shape), keras.Input(shape)
        distance = keras.layers.Subtract()([embedding(a), embedding(b)])
        model = keras.Model([a, b], keras.layers.Dense(1, activation="sigmoid")(distance))
        model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
        return model

    return build


def sequential(shape):
    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    return build


PAIRS = RNG.random((2, 20, 6, 6), dtype=np.float32)
SAME = RNG.integers(0, 2, (20, 1)).astype("float32")


@pytest.mark.parametrize(
    "build, x",
    [
        pytest.param(siamese((6, 6, 1)), [PAIRS[0], PAIRS[1]], id="(n, 6, 6) for Input((6, 6, 1)), two inputs"),
        pytest.param(siamese((6, 6)), [PAIRS[0][..., None], PAIRS[1][..., None]], id="(n, 6, 6, 1) for Input((6, 6))"),
        pytest.param(sequential((1,)), PAIRS[0][:, 0, 0], id="(n,) for Sequential Input((1,))"),
        pytest.param(sequential((6,)), PAIRS[0][:, 0, :, None], id="(n, 6, 1) for Sequential Input((6,))"),
    ],
)
def test_an_input_one_trailing_axis_of_size_1_off_is_adjusted_as_in_keras(build, x):
    kwargs = dict(x=x, y=SAME, batch_size=8, epochs=2, shuffle=False, validation_data=(x, SAME))
    keras_model, keras_history, safe_model, safe_history, trainer = run_both(build, lambda: kwargs)
    assert_same_training(keras_model, keras_history, safe_model, safe_history)
    np.testing.assert_allclose(
        trainer.evaluate(x, SAME, verbose=0), keras_model.evaluate(x, SAME, verbose=0), rtol=1e-6
    )
    np.testing.assert_allclose(trainer.predict(x, verbose=0), keras_model.predict(x, verbose=0), rtol=1e-6)


def labelled(y):
    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="squared_hinge")
        return model

    return build


@pytest.mark.parametrize(
    "build, kwargs",
    [
        pytest.param(classifier, dict(y=LABELS, class_weight={}), id="class_weight {}: no weighting"),
        pytest.param(classifier, dict(y=LABELS, class_weight={0.0: 1.0, 1.0: 3.0}), id="class_weight float keys"),
        pytest.param(
            labelled(None), dict(y=np.sign(Y), class_weight={-1: 1.0, 1: 3.0}), id="class_weight key -1, labels -1/1"
        ),
        pytest.param(
            lambda: classifier(ignore_class=-1),
            dict(y=np.where(LABELS == 0, -1, LABELS)),
            id="sparse labels -1 with ignore_class=-1",
        ),
        pytest.param(mlp, dict(y=Y, shuffle=None), id="shuffle None"),
        pytest.param(mlp, dict(y=Y, shuffle=1), id="shuffle 1"),
        pytest.param(
            mlp, dict(y=Y, epochs=3, validation_data=(X, Y), validation_freq=[1.0, 3.0]), id="validation_freq floats"
        ),
    ],
)
def test_what_keras_accepts_trains_as_in_keras(build, kwargs):
    args = dict(dict(x=X, batch_size=4, epochs=2), **kwargs)
    assert_same_training(*run_both(build, lambda: args)[:4])


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_bool_is_1_or_0_as_in_keras(verbose):
    expected = mlp().fit(X, Y, verbose=verbose).history
    got = SafeTrainer(mlp()).fit(X, Y, verbose=verbose).history
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
