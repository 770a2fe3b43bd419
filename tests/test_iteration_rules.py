"""Which batches each epoch sees, as in `model.fit`: every input kind, against `model.fit` on the same seed.

Each test builds the same model and the same input objects twice (after `keras.utils.set_random_seed(0)`, so a
`shuffle(buffer)` gets the same seed), runs the same sequence of `fit` calls with `model.fit` and with
`SafeTrainer(model).fit`, and compares every History (1e-6 relative), the weights (1e-6 absolute), the
optimizer's step count and the seed generators' state (dropout draws).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from safetrain import SafeTrainer

RNG = np.random.default_rng(3)
X = RNG.standard_normal((96, 4)).astype("float32")
Y = (X[:, :1] - 0.5 * X[:, 1:2] + 0.1 * RNG.standard_normal((96, 1))).astype("float32")


def build(dropout: float = 0.0):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    model = keras.Sequential([*layers, keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def _state(model):
    seeds = [v.numpy().tolist() for v in model.variables if "seed_generator" in v.path]
    return int(model.optimizer.iterations), seeds


def compare(make_inputs, fits, dropout: float = 0.0):
    """Run `fits` (a list of fit-kwargs factories taking the inputs) with model.fit, then SafeTrainer."""
    results = []
    for runner in ("keras", "safetrain"):
        model = build(dropout)
        inputs = make_inputs()
        histories = []
        for fit_kwargs in fits:
            kwargs = dict(verbose=0, **fit_kwargs(inputs))
            fit = model.fit if runner == "keras" else SafeTrainer(model).fit
            histories.append(fit(**kwargs).history)
        results.append((model, histories))
    (keras_model, keras_histories), (safe_model, safe_histories) = results
    for k_hist, s_hist in zip(keras_histories, safe_histories):
        assert set(s_hist) == set(k_hist)
        for key, values in k_hist.items():
            np.testing.assert_allclose(s_hist[key], values, rtol=1e-6, err_msg=key)
    for a, b in zip(keras_model.get_weights(), safe_model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert _state(safe_model) == _state(keras_model)


def reshuffled(batch=16):
    keras.utils.set_random_seed(0)
    return tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(96).batch(batch)


def unknown_length(n=96, batch=16):
    def rows():
        for i in range(0, n, batch):
            yield X[i : i + batch], Y[i : i + batch]

    return tf.data.Dataset.from_generator(rows, output_signature=(tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1])))


# -- tf.data that reshuffles each iteration -------------------------------------------------------------------


def test_a_reshuffling_dataset_gives_each_epoch_the_pass_model_fit_gives():
    compare(lambda: reshuffled(), [lambda ds: dict(x=ds, epochs=4)])


def test_a_second_fit_on_the_same_reshuffling_dataset_starts_where_model_fit_starts():
    compare(lambda: reshuffled(), [lambda ds: dict(x=ds, epochs=2), lambda ds: dict(x=ds, epochs=2)])


def test_fit_for_one_epoch_in_a_loop_on_a_reshuffling_dataset():
    compare(lambda: reshuffled(), [lambda ds: dict(x=ds, epochs=1)] * 3)


def test_a_cached_shuffled_prefetched_pipeline_with_reshuffling_validation():
    def inputs():
        keras.utils.set_random_seed(0)
        train = tf.data.Dataset.from_tensor_slices((X[:64], Y[:64])).cache().shuffle(64).batch(16).prefetch(2)
        val = tf.data.Dataset.from_tensor_slices((X[64:], Y[64:])).shuffle(32).batch(10)
        return train, val

    compare(inputs, [lambda d: dict(x=d[0], validation_data=d[1], epochs=3)], dropout=0.3)


def test_validation_on_the_training_dataset_itself():
    compare(lambda: reshuffled(), [lambda ds: dict(x=ds, validation_data=ds, epochs=3)])


class StopAtBatch(keras.callbacks.Callback):
    """Stops training at the end of batch `at` (after the last batch: the pass ends, but by the callback)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            self.model.stop_training = True


@pytest.mark.parametrize("at", [2, 5], ids=["mid-pass", "last-batch"])
def test_a_fit_stopped_by_a_callback_leaves_the_dataset_where_model_fit_leaves_it(at):
    compare(
        lambda: reshuffled(),
        [lambda ds: dict(x=ds, epochs=3, callbacks=[StopAtBatch(at)]), lambda ds: dict(x=ds, epochs=2)],
    )


def test_steps_per_epoch_over_a_reshuffling_dataset_renews_its_pass_as_model_fit_does():
    compare(lambda: reshuffled(), [lambda ds: dict(x=ds, epochs=5, steps_per_epoch=4)])


def test_an_infinite_dataset_with_steps_per_epoch():
    compare(lambda: reshuffled().repeat(), [lambda ds: dict(x=ds, epochs=3, steps_per_epoch=5)])


# -- data of unknown length -----------------------------------------------------------------------------------


def test_data_of_unknown_length_counts_the_optimizer_steps_model_fit_counts():
    # model.fit's call that finds the data exhausted still moves the optimizer's count (Adam's bias correction)
    # and the dropout seed: 21 iterations for 20 batches per epoch.
    compare(lambda: unknown_length(), [lambda ds: dict(x=ds, epochs=3)], dropout=0.3)


def test_data_of_unknown_length_in_several_fits():
    compare(lambda: unknown_length(), [lambda ds: dict(x=ds, epochs=2), lambda ds: dict(x=ds, epochs=1)])


def test_a_generator_with_steps_per_epoch():
    def inputs():
        def forever():
            i = 0
            while True:
                j = (i * 16) % 96
                yield X[j : j + 16], Y[j : j + 16]
                i += 1

        return forever()

    compare(inputs, [lambda g: dict(x=g, epochs=3, steps_per_epoch=4)], dropout=0.3)


# -- PyDataset ------------------------------------------------------------------------------------------------


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch=16, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return -(-len(self.x) // self.batch)

    def __getitem__(self, i):
        s = slice(i * self.batch, (i + 1) * self.batch)
        return self.x[s], self.y[s]


@pytest.mark.parametrize("workers", [1, 2], ids=["no-workers", "2-workers"])
def test_a_py_dataset_for_training_and_validation(workers):
    def inputs():
        return Batches(X[:64], Y[:64], workers=workers), Batches(X[64:], Y[64:], batch=10, workers=workers)

    compare(inputs, [lambda d: dict(x=d[0], validation_data=d[1], epochs=3)])


# -- validation inputs that yield batches, with validation_steps -----------------------------------------------


def test_a_generator_as_validation_data_with_validation_steps():
    def inputs():
        def forever():
            i = 0
            while True:
                j = (i * 8) % 32
                yield X[64 + j : 72 + j] + i, Y[64 + j : 72 + j]
                i += 1

        return forever()

    compare(
        inputs, [lambda g: dict(x=X[:64], y=Y[:64], batch_size=16, validation_data=g, validation_steps=2, epochs=3)]
    )


def test_a_py_dataset_as_validation_data_with_validation_steps():
    compare(
        lambda: Batches(X[64:], Y[64:], batch=8),
        [lambda v: dict(x=X[:64], y=Y[:64], batch_size=16, validation_data=v, validation_steps=2, epochs=3)],
    )


def test_a_reshuffling_dataset_as_validation_data_with_validation_steps():
    compare(
        lambda: reshuffled(batch=8),
        [lambda v: dict(x=X[:64], y=Y[:64], batch_size=16, validation_data=v, validation_steps=3, epochs=3)],
    )


def test_a_finite_generator_as_validation_data_with_validation_steps():
    def inputs():
        return ((X[64 + j : 72 + j] + j, Y[64 + j : 72 + j]) for j in range(0, 32, 8))

    compare(
        inputs, [lambda g: dict(x=X[:64], y=Y[:64], batch_size=16, validation_data=g, validation_steps=2, epochs=3)]
    )


def test_a_py_dataset_with_workers_as_validation_data_with_validation_steps():
    compare(
        lambda: Batches(X[64:], Y[64:], batch=8, workers=2),
        [lambda v: dict(x=X[:64], y=Y[:64], batch_size=16, validation_data=v, validation_steps=3, epochs=3)],
    )


def test_a_multi_input_multi_output_model_on_a_reshuffling_dataset_as_in_the_keras_guide():
    # "Training & evaluation with the built-in methods": dicts of inputs and targets, per-output losses and
    # loss weights, a shuffled tf.data dataset, validation on another.
    def build_multi_io():
        keras.utils.set_random_seed(0)
        image = keras.Input((8, 8, 1), name="img_input")
        series = keras.Input((None, 3), name="ts_input")
        x1 = keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(3, 3)(image))
        x2 = keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(3, 3)(series))
        x = keras.layers.concatenate([x1, x2])
        score = keras.layers.Dense(1, name="score_output")(x)
        klass = keras.layers.Dense(5, name="class_output")(x)
        model = keras.Model([image, series], [score, klass])
        model.compile(
            optimizer=keras.optimizers.RMSprop(1e-3),
            loss={"score_output": "mse", "class_output": keras.losses.CategoricalCrossentropy(from_logits=True)},
            loss_weights={"score_output": 2.0, "class_output": 1.0},
        )
        return model

    rng = np.random.default_rng(5)
    images = rng.random((60, 8, 8, 1)).astype("float32")
    series = rng.random((60, 12, 3)).astype("float32")
    scores = rng.random((60, 1)).astype("float32")
    classes = keras.utils.to_categorical(rng.integers(0, 5, 60), 5).astype("float32")

    def inputs():
        keras.utils.set_random_seed(0)
        ds = tf.data.Dataset.from_tensor_slices(
            ({"img_input": images, "ts_input": series}, {"score_output": scores, "class_output": classes})
        )
        return ds.take(48).shuffle(48).batch(16), ds.skip(48).batch(6)

    results = []
    for runner in ("keras", "safetrain"):
        model = build_multi_io()
        train, val = inputs()
        fit = model.fit if runner == "keras" else SafeTrainer(model).fit
        results.append((model, fit(train, validation_data=val, epochs=3, verbose=0).history))
    (k_model, k_hist), (s_model, s_hist) = results
    assert set(s_hist) == set(k_hist)
    for key in k_hist:
        np.testing.assert_allclose(s_hist[key], k_hist[key], rtol=1e-6, err_msg=key)
    for a, b in zip(k_model.get_weights(), s_model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
