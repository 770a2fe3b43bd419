"""Every input kind becomes one tf.data pipeline; bad input is refused before any step, naming the argument."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, regression_data

from safetrain import SafeTrainer
from safetrain.data import as_batches
from safetrain.epochs import EpochIterator


def batches_of(b, epoch=0):
    return [tuple(t.numpy() for t in tf.nest.flatten(batch)) for batch in b.dataset(epoch)]


def test_arrays_are_batched_with_a_partial_last_batch_and_relaxed_spec():
    x, y = regression_data(n=10)
    b = as_batches(x, y, batch_size=4)
    assert b.num_batches == 3
    assert [len(bx) for bx, _ in batches_of(b)] == [4, 4, 2]
    assert b.element_spec[0].shape.as_list() == [None, 8]


def test_shuffle_order_is_a_function_of_seed_and_epoch():
    x = np.arange(50, dtype="float32")[:, None]
    b1 = as_batches(x, x, batch_size=8, shuffle=True, seed=7)
    b2 = as_batches(x, x, batch_size=8, shuffle=True, seed=7)
    order = lambda b, e: np.concatenate([bx[:, 0] for bx, _ in batches_of(b, e)])  # noqa: E731
    assert np.array_equal(order(b1, 3), order(b2, 3))
    assert not np.array_equal(order(b1, 0), order(b1, 1))
    assert sorted(order(b1, 0)) == list(range(50))


def test_shuffle_batch_keeps_each_batch_s_samples():
    x = np.arange(20, dtype="float32")[:, None]
    b = as_batches(x, x, batch_size=5, shuffle="batch", seed=1)
    for i, (bx, _) in enumerate(batches_of(b)):
        assert sorted(bx[:, 0]) == list(range(5 * i, 5 * i + 5))


def test_float64_arrays_become_floatx_as_in_keras():
    b = as_batches(np.zeros((4, 2)), np.zeros((4, 1)))
    assert b.element_spec[0].dtype == tf.float32


def test_class_weight_becomes_sample_weight():
    y = np.array([0, 1, 2, 1])
    b = as_batches(np.zeros((4, 2), "float32"), y, class_weight={1: 3.0}, batch_size=4)
    ((_, _, sw),) = batches_of(b)
    assert sw.tolist() == [1.0, 3.0, 1.0, 3.0]


def test_generator_with_variable_length_sequences_gets_none_dims():
    def gen():
        for length in (5, 7, 9):
            yield np.zeros((2, length, 3), "float32"), np.zeros((2, 1), "float32")

    b = as_batches(gen())
    assert b.element_spec[0].shape.as_list() == [None, None, 3]
    assert b.num_batches is None


class Squares(keras.utils.PyDataset):
    def __init__(self, n=5, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.epochs_ended = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = np.full((4, 8), i, "float32")
        return x, x[:, :1] ** 2

    def on_epoch_end(self):
        self.epochs_ended += 1


def test_pydataset_trains_and_gets_its_epoch_hooks():
    data = Squares()
    trainer = SafeTrainer(make_mlp())
    history = trainer.fit(data, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    assert data.epochs_ended >= 3
    assert trainer.trace_counts["train"] == 1


def test_generator_input_trains():
    x, y = regression_data(n=64)

    def gen():
        for i in range(0, 64, 16):
            yield x[i : i + 16], y[i : i + 16]

    trainer = SafeTrainer(make_mlp())
    history = trainer.fit(gen(), epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1
    # 4 steps, and the count model.fit adds for its call that finds the generator exhausted
    assert trainer.model.optimizer.iterations.numpy() == 5


def test_lists_and_dicts_of_arrays_feed_multi_input_models():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    model.compile(optimizer="sgd", loss="mse")
    xs = [np.ones((10, 3), "float32"), np.ones((10, 2), "float32")]
    history = SafeTrainer(model).fit(xs, np.ones((10, 1), "float32"), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    out = SafeTrainer(model).predict(xs, verbose=0)
    assert out.shape == (10, 1)


def test_steps_per_epoch_draws_from_one_iterator_across_epochs():
    x, y = regression_data(n=40)
    b = as_batches(x, y, batch_size=10)  # 4 batches
    epochs = EpochIterator(b, steps_per_epoch=3)
    epochs.start(0)
    assert epochs.remaining() == 3
    epochs.advance(3, 3)
    epochs.finish()
    epochs.start(1)
    assert epochs.remaining() == 1  # one batch left in this pass, as Keras does
    epochs.advance(1, 1)
    with pytest.warns(UserWarning, match="ran out of data"):
        epochs.finish()
    epochs.start(2)
    assert epochs.remaining() == 3


def test_repeated_dataset_with_steps_per_epoch_trains_that_many_steps():
    x, y = regression_data(n=64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    trainer = SafeTrainer(make_mlp())
    trainer.fit(ds, epochs=3, steps_per_epoch=5, verbose=0)
    assert int(trainer.model.optimizer.iterations) == 15


# -- bad input: clear errors, raised before any step ------------------------------------------------


def assert_untrained(model, weights_before):
    assert int(model.optimizer.iterations) == 0
    for a, b in zip(weights_before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(y_slice=slice(0, 50)), ValueError, r"`x` has 60 samples, `y` has 50"),
        (dict(batch_size=0), ValueError, r"`batch_size` must be a positive integer"),
        (dict(batch_size=-3), ValueError, r"`batch_size`"),
        (dict(batch_size=2.5), TypeError, r"`batch_size`"),
        (dict(epochs=2, initial_epoch=3), ValueError, r"`epochs` \(2\) must be >= `initial_epoch` \(3\)"),
        (dict(epochz=3), TypeError, r"`epochz` \(did you mean `epochs`\?\)"),
        (dict(validation_split=1.5), ValueError, r"`validation_split`"),
        (dict(class_weight={0: 1.0}, sample_weight=True), ValueError, r"`class_weight` and `sample_weight`"),
        (dict(n=0), ValueError, r"empty"),
        (dict(steps_per_epoch=0), ValueError, r"`steps_per_epoch`"),
        (dict(verbose=3), ValueError, r"`verbose`"),
    ],
)
def test_bad_array_arguments_raise_before_any_step(kwargs, error, match):
    n = kwargs.pop("n", 60)
    x, y = regression_data(n=n) if n else (np.zeros((0, 8), "float32"), np.zeros((0, 1), "float32"))
    if "y_slice" in kwargs:
        y = y[kwargs.pop("y_slice")]
    if kwargs.pop("sample_weight", None):
        kwargs["sample_weight"] = np.ones(len(y))
    kwargs.setdefault("verbose", 0)
    model = make_mlp()
    before = model.get_weights()
    with pytest.raises(error, match=match):
        SafeTrainer(model).fit(x, y, **kwargs)
    assert_untrained(model, before)


def dataset():
    x, y = regression_data(n=32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def gen():
    x, y = regression_data(n=32)
    yield x[:8], y[:8]
    yield x[8:16], y[8:16]


@pytest.mark.parametrize(
    "make_x, kwargs, match",
    [
        (dataset, dict(validation_split=0.2), r"`validation_split` is only supported for array inputs"),
        (
            gen,
            dict(validation_split=0.2),
            r"`validation_split` is only supported for array inputs, not for a generator",
        ),
        (dataset, dict(y=np.zeros((32, 1))), r"`y` must be None when `x` is a tf.data.Dataset"),
        (lambda: dataset().take(0), {}, r"empty"),
        (gen, dict(class_weight={0: 2.0}), r"`class_weight` is not supported with a generator"),
        (lambda: "train.csv", {}, r"`x` must be NumPy arrays or tensors"),
    ],
)
def test_bad_dataset_arguments_raise_before_any_step(make_x, kwargs, match):
    model = make_mlp()
    before = model.get_weights()
    with pytest.raises((ValueError, TypeError), match=match):
        SafeTrainer(model).fit(make_x(), verbose=0, **kwargs)
    assert_untrained(model, before)


@pytest.mark.parametrize("make_x", [dataset, gen], ids=["dataset", "generator"])
def test_batch_size_with_an_input_that_yields_batches_is_ignored_with_a_warning_as_model_fit_ignores_it(make_x):
    keras.utils.set_random_seed(0)
    plain = SafeTrainer(make_mlp()).fit(make_x(), verbose=0).history
    keras.utils.set_random_seed(0)
    with pytest.warns(UserWarning, match=r"`batch_size=8` is ignored"):
        given = SafeTrainer(make_mlp()).fit(make_x(), batch_size=8, verbose=0).history
    assert given == plain


def test_empty_generator_is_refused():
    def nothing():
        return
        yield

    with pytest.raises(ValueError, match="generator"):
        SafeTrainer(make_mlp()).fit(nothing(), verbose=0)


def test_mismatched_validation_data_is_refused_before_training():
    x, y = regression_data(n=40)
    model = make_mlp()
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"validation_data.*`x` has 10 samples, `y` has 9"):
        SafeTrainer(model).fit(x, y, validation_data=(x[:10], y[:9]), verbose=0)
    assert_untrained(model, before)


# -- inputs Keras accepts: dicts matched by name, optional inputs fed None -------------------------------


def _two_input_model():
    keras.utils.set_random_seed(0)
    first, second = keras.Input((3,), name="zeta"), keras.Input((2,), name="alpha")  # sorted names != list order
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([first, keras.layers.Dense(3)(second)]))
    model = keras.Model([first, second], out)
    model.compile(optimizer="adam", loss="mse")
    return model


def test_a_dict_of_inputs_is_matched_by_name_to_a_list_input_model_as_in_keras():
    rng = np.random.default_rng(0)
    x = {"alpha": rng.random((24, 2), dtype=np.float32), "zeta": rng.random((24, 3), dtype=np.float32)}
    y = rng.random((24, 1), dtype=np.float32)
    expected = _two_input_model().fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    trainer = SafeTrainer(_two_input_model())
    got = trainer.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    bad = {"alpha": x["alpha"], "zeta": x["zeta"][:, :2]}
    with pytest.raises(ValueError, match=r"`x\['zeta'\]` has shape \(None, 2\) per batch, but the model expects"):
        trainer.fit(bad, y, verbose=0)


def _optional_input_model():
    class AddIfGiven(keras.layers.Layer):
        def call(self, a, b=None):
            return a if b is None else a + b

    keras.utils.set_random_seed(0)
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b", optional=True)
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(AddIfGiven()(a, b)))
    model.compile(optimizer="adam", loss="mse")
    return model


def test_an_optional_input_fed_none_trains_evaluates_and_predicts_as_in_keras():
    x = {"a": np.linspace(0, 1, 48, dtype="float32").reshape(16, 3), "b": None}
    y = np.ones((16, 1), "float32")
    plain = _optional_input_model()
    expected = plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    trainer = SafeTrainer(_optional_input_model())
    got = trainer.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert trainer.evaluate(x, y, verbose=0) == pytest.approx(plain.evaluate(x, y, verbose=0), rel=1e-6)
    np.testing.assert_allclose(trainer.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-6)


def test_a_required_input_fed_none_gets_keras_wording_before_any_step():
    trainer = SafeTrainer(_optional_input_model())
    x = {"a": None, "b": np.ones((8, 3), "float32")}
    with pytest.raises(ValueError, match=r"The input 'a' is not optional, but None was passed"):
        trainer.fit(x, np.ones((8, 1), "float32"), verbose=0)
    assert int(trainer.model.optimizer.iterations) == 0
