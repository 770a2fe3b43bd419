"""SafeTrainer.fit gives model.fit's numbers: History to 1e-6 relative, weights to 1e-6 absolute."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_same_training, classification_images, make_cnn, make_mlp, regression_data, run_both

from safetrain import SafeTrainer


def test_mlp_regressor_with_metric_validation_and_dropout_matches_model_fit():
    x, y = regression_data(n=330)  # 330 / 32: a partial last batch

    def build():
        return make_mlp(dropout=0.2)

    results = run_both(
        build,
        lambda: dict(x=x[:270], y=y[:270], batch_size=32, epochs=4, shuffle=False, validation_data=(x[270:], y[270:])),
    )
    assert_same_training(*results[:4])
    assert set(results[3]) == {"loss", "mae", "val_loss", "val_mae"}  # exactly model.fit's keys


def test_cnn_classifier_from_tf_data_matches_model_fit():
    x, y = classification_images()

    def fit_kwargs():
        train = tf.data.Dataset.from_tensor_slices((x[:160], y[:160])).batch(24)
        val = tf.data.Dataset.from_tensor_slices((x[160:], y[160:])).batch(24)
        return dict(x=train, epochs=3, validation_data=val)

    results = run_both(make_cnn, fit_kwargs)
    assert_same_training(*results[:4])
    assert "accuracy" in results[3] and "val_accuracy" in results[3]


def build_two_input_model():
    keras.utils.set_random_seed(0)
    a = keras.Input((5,), name="numbers")
    b = keras.Input((3,), name="flags")
    h = keras.layers.Concatenate()([keras.layers.Dense(8, activation="relu")(a), b])
    out = keras.layers.Dense(1, name="score")(h)
    model = keras.Model({"numbers": a, "flags": b}, out)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse", metrics=["mae"])
    return model


def test_functional_model_with_two_named_inputs_matches_model_fit():
    rng = np.random.default_rng(1)
    inputs = {
        "numbers": rng.standard_normal((100, 5)).astype("float32"),
        "flags": rng.integers(0, 2, (100, 3)).astype("float32"),
    }
    y = rng.standard_normal((100, 1)).astype("float32")
    results = run_both(
        build_two_input_model, lambda: dict(x=inputs, y=y, batch_size=16, epochs=3, shuffle=False, validation_split=0.2)
    )
    assert_same_training(*results[:4])


def build_classifier():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3)])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
    )
    return model


def classifier_data():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((150, 6)).astype("float32")
    y = rng.integers(0, 3, size=(150,)).astype("int32")
    return x, y


def test_class_weight_matches_model_fit():
    x, y = classifier_data()
    results = run_both(
        build_classifier,
        lambda: dict(x=x, y=y, batch_size=20, epochs=3, shuffle=False, class_weight={0: 1.0, 1: 3.0, 2: 0.5}),
    )
    assert_same_training(*results[:4])


def test_sample_weight_matches_model_fit():
    x, y = classifier_data()
    sw = np.random.default_rng(3).uniform(0.1, 2.0, size=(150,)).astype("float32")
    results = run_both(
        build_classifier,
        lambda: dict(x=x, y=y, sample_weight=sw, batch_size=20, epochs=3, shuffle=False, validation_split=0.2),
    )
    assert_same_training(*results[:4])


def test_multi_output_model_with_loss_weights_matches_model_fit():
    def build():
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        h = keras.layers.Dense(8, activation="tanh")(inp)
        model = keras.Model(inp, {"a": keras.layers.Dense(1, name="a")(h), "b": keras.layers.Dense(2, name="b")(h)})
        model.compile(
            optimizer="rmsprop",
            loss={"a": "mse", "b": "mae"},
            loss_weights={"a": 1.0, "b": 0.3},
            metrics={"a": ["mae"]},
        )
        return model

    rng = np.random.default_rng(4)
    x = rng.standard_normal((90, 4)).astype("float32")
    ys = {"a": rng.standard_normal((90, 1)).astype("float32"), "b": rng.standard_normal((90, 2)).astype("float32")}
    results = run_both(build, lambda: dict(x=x, y=ys, batch_size=16, epochs=2, shuffle=False))
    assert_same_training(*results[:4])


@pytest.mark.parametrize("steps_per_execution", [1, 3, "auto"])
def test_numbers_do_not_depend_on_steps_per_execution(steps_per_execution):
    x, y = regression_data(n=200)
    results = run_both(
        lambda: make_mlp(dropout=0.1),
        lambda: dict(x=x, y=y, batch_size=16, epochs=2, shuffle=False),
        trainer_kwargs=dict(steps_per_execution=steps_per_execution),
    )
    assert_same_training(*results[:4])


def test_evaluate_and_predict_match_keras():
    x, y = regression_data(n=100)
    model = make_mlp()
    model.fit(x, y, epochs=1, verbose=0)
    trainer = SafeTrainer(model)
    assert trainer.evaluate(x, y, batch_size=7, verbose=0) == pytest.approx(
        model.evaluate(x, y, batch_size=7, verbose=0), rel=1e-6
    )
    assert trainer.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(
        model.evaluate(x, y, verbose=0, return_dict=True), rel=1e-6
    )
    np.testing.assert_allclose(
        trainer.predict(x, batch_size=7, verbose=0), model.predict(x, batch_size=7, verbose=0), rtol=1e-6
    )


def test_shuffled_fit_is_reproducible_with_the_same_seed():
    x, y = regression_data(n=120)

    def run():
        model = make_mlp(dropout=0.1)
        history = SafeTrainer(model).fit(x, y, batch_size=16, epochs=3, verbose=0).history
        return history["loss"], model.get_weights()

    (loss_a, w_a), (loss_b, w_b) = run(), run()
    assert loss_a == loss_b
    for a, b in zip(w_a, w_b):
        np.testing.assert_array_equal(a, b)


# -- default arguments: shuffle=True under keras.utils.set_random_seed, and no global RNG moved -------------


@pytest.mark.parametrize("shuffle", [True, "batch"])
def test_default_shuffle_matches_model_fit_under_a_fixed_seed(shuffle):
    x, y = regression_data(n=150)  # 150 / 16: a partial last batch
    results = run_both(
        lambda: make_mlp(dropout=0.2, seed=3),
        lambda: dict(x=x, y=y, batch_size=16, epochs=3, shuffle=shuffle, validation_split=0.2),
    )
    assert_same_training(*results[:4])


def _global_rng_draws():
    import random

    return [random.random(), float(np.random.rand()), float(tf.random.uniform(())), float(keras.random.uniform(()))]


@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_evaluate_predict_leave_every_global_rng_as_model_fit_does(shuffle):
    """Keras seeds unseeded initializers from Python's RNG: a model built after training must start alike."""
    x, y = regression_data(n=64)

    def script(use_trainer):
        # Keras before 3.9 keeps its global seed generator across `set_random_seed`: start both without one.
        from keras.src.backend.common import global_state

        global_state.set_global_attribute("global_seed_generator", None)
        model = make_mlp(dropout=0.1, seed=5)
        api = SafeTrainer(model) if use_trainer else model
        api.fit(x, y, batch_size=16, epochs=2, shuffle=shuffle, verbose=0)
        api.evaluate(x, y, verbose=0)
        api.predict(x, verbose=0)
        api.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
        built_after = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        return [w.tolist() for w in built_after.get_weights()], _global_rng_draws()

    assert script(use_trainer=True) == script(use_trainer=False)


def test_without_a_global_seed_each_epoch_and_fit_get_a_fresh_order():
    x = np.arange(64, dtype="float32")[:, None]
    trainer = SafeTrainer(make_mlp(d=1))
    tf.random.set_seed(None)  # make_mlp set one
    trainer.fit(x, x, batch_size=8, epochs=1, verbose=0)
    first = trainer.train_batches
    orders = [first.order(0), first.order(1)]
    trainer.fit(x, x, batch_size=8, epochs=1, verbose=0)
    orders.append(trainer.train_batches.order(0))
    assert not first.keras_order
    assert all(sorted(o) == list(range(64)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3


@pytest.mark.parametrize("jit_compile", [False, True])
def test_validation_inside_fit_computes_exactly_what_model_evaluate_computes(jit_compile):
    x, y = regression_data(n=90)
    model = make_mlp(jit_compile=jit_compile, optimizer=keras.optimizers.SGD(0.01, use_ema=True, ema_momentum=0.9))
    history = SafeTrainer(model).fit(
        x, y, batch_size=16, epochs=2, validation_data=(x, y), verbose=0, callbacks=[keras.callbacks.SwapEMAWeights()]
    )
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)  # Keras's own, same weights
    assert history.history["val_loss"][-1] == logs["loss"]  # exactly, not approximately
    assert history.history["val_mae"][-1] == logs["mae"]


def build_conv1d_batchnorm():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((50, 1))
    h = inputs
    for _ in range(2):
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv1D(16, 3, padding="same")(h)))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["sparse_categorical_accuracy"])
    return model


def test_batches_of_one_fixed_size_are_traced_with_it_as_model_fit_traces_them():
    # keras.io's timeseries classification in small: every batch holds 32 samples, so Keras traces its steps
    # for batch size 32, and TensorFlow compiles the convolutions and normalization for it (traced for `None`,
    # val_loss was 7.7e-6 off after 4 epochs).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 50, 1)).astype("float32")
    y = rng.integers(0, 2, 256)
    results = run_both(build_conv1d_batchnorm, lambda: dict(x=x, y=y, batch_size=32, epochs=4, validation_split=0.25))
    assert_same_training(*results[:4])
    trainer = results[4]
    assert trainer.trace_counts == {"train": 1, "test": 1, "predict": 0}
    assert [s.shape[0] for s in tf.nest.flatten(trainer.steps["train"].spec)] == [32, 32]
