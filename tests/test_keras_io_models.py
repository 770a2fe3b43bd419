"""Models written the keras.io way train through SafeTrainer with `model.fit`'s numbers.

Each is a small version of a Keras-team example: a GAN and a VAE (a `keras.Model` subclass with its own
`train_step` and no `call()`: Keras builds it when the step is traced), and an endpoint-layer model (its loss
and metric added inside a layer, compiled with an optimizer only).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers, ops

from safetrain import SafeTrainer

LATENT = 4


class GAN(keras.Model):
    """keras.io "DCGAN to generate face images", with Dense networks."""

    def __init__(self, discriminator, generator):
        super().__init__()
        self.discriminator, self.generator = discriminator, generator
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn
        self.d_loss_metric = keras.metrics.Mean(name="d_loss")
        self.g_loss_metric = keras.metrics.Mean(name="g_loss")

    @property
    def metrics(self):
        return [self.d_loss_metric, self.g_loss_metric]

    def train_step(self, real):
        batch_size = ops.shape(real)[0]
        z = keras.random.normal((batch_size, LATENT), seed=self.seed_generator)
        combined = ops.concatenate([self.generator(z), real], axis=0)
        labels = ops.concatenate([ops.ones((batch_size, 1)), ops.zeros((batch_size, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(combined))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        z = keras.random.normal((batch_size, LATENT), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(ops.zeros((batch_size, 1)), self.discriminator(self.generator(z)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_metric.update_state(d_loss)
        self.g_loss_metric.update_state(g_loss)
        return {"d_loss": self.d_loss_metric.result(), "g_loss": self.g_loss_metric.result()}


def make_gan():
    keras.utils.set_random_seed(0)
    d = keras.Sequential([keras.Input((12,)), layers.Dense(16, activation="relu"), layers.Dense(1)])
    g = keras.Sequential([keras.Input((LATENT,)), layers.Dense(16, activation="relu"), layers.Dense(12)])
    gan = GAN(d, g)
    gan.compile(
        keras.optimizers.Adam(3e-4), keras.optimizers.Adam(3e-4), keras.losses.BinaryCrossentropy(from_logits=True)
    )
    return gan


class Sampling(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        mean, log_var = inputs
        eps = keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        return mean + ops.exp(0.5 * log_var) * eps


class VAE(keras.Model):
    """keras.io "Variational AutoEncoder", with Dense networks."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            mean, log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            rec_loss = ops.mean(ops.sum(keras.losses.binary_crossentropy(data, reconstruction)[..., None], axis=1))
            kl = ops.mean(ops.sum(-0.5 * (1 + log_var - ops.square(mean) - ops.exp(log_var)), axis=1))
            total = rec_loss + kl
        grads = tape.gradient(total, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total)
        self.kl_loss_tracker.update_state(kl)
        return {"loss": self.total_loss_tracker.result(), "kl_loss": self.kl_loss_tracker.result()}


def make_vae():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    h = layers.Dense(8, activation="relu")(inputs)
    mean, log_var = layers.Dense(2)(h), layers.Dense(2)(h)
    encoder = keras.Model(inputs, [mean, log_var, Sampling()([mean, log_var])])
    latent = keras.Input((2,))
    decoder = keras.Model(latent, layers.Dense(12, activation="sigmoid")(layers.Dense(8, activation="relu")(latent)))
    vae = VAE(encoder, decoder)
    vae.compile(optimizer=keras.optimizers.Adam())
    return vae


class LogisticEndpoint(layers.Layer):
    """keras.io "The Functional API"/endpoint layer: the loss and a metric are added inside the layer."""

    def __init__(self, name=None):
        super().__init__(name=name)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
        self.accuracy_fn = keras.metrics.BinaryAccuracy()

    def call(self, targets, logits, sample_weights=None):
        self.add_loss(self.loss_fn(targets, logits, sample_weights))
        self.accuracy_fn.update_state(targets, logits, sample_weights)
        return ops.sigmoid(logits)


def make_endpoint():
    keras.utils.set_random_seed(0)
    inputs, targets = keras.Input((3,), name="inputs"), keras.Input((10,), name="targets")
    logits = layers.Dense(10)(inputs)
    model = keras.Model({"inputs": inputs, "targets": targets}, LogisticEndpoint(name="predictions")(targets, logits))
    model.compile(optimizer="adam")
    return model


RNG = np.random.default_rng(0)
DATA = RNG.random((64, 12), dtype=np.float32)
ENDPOINT_DATA = {"inputs": RNG.random((48, 3), dtype=np.float32), "targets": RNG.random((48, 10), dtype=np.float32)}


@pytest.mark.parametrize(
    "make, fit_kwargs",
    [
        (make_gan, lambda: dict(x=tf.data.Dataset.from_tensor_slices(DATA).batch(16), epochs=2)),
        (make_vae, lambda: dict(x=DATA, batch_size=16, epochs=2)),
        (make_endpoint, lambda: dict(x=ENDPOINT_DATA, batch_size=16, epochs=2)),
    ],
    ids=["gan", "vae", "endpoint_layer"],
)
def test_keras_io_model_trains_with_model_fit_numbers(make, fit_kwargs):
    expected = make().fit(verbose=0, **fit_kwargs()).history
    trainer = SafeTrainer(make())
    history = trainer.fit(verbose=0, **fit_kwargs()).history
    assert history.keys() == expected.keys()
    for key, values in expected.items():
        np.testing.assert_allclose(history[key], values, rtol=1e-6, err_msg=key)
    assert trainer.trace_counts["train"] == 1
