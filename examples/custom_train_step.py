"""A custom loop by subclassing: gradient clipping plus an auxiliary loss, compiled once like the default."""

import keras
import numpy as np
import tensorflow as tf

from safetrain import SafeTrainer


class ClippedTrainer(SafeTrainer):
    """Clips the global gradient norm and adds an L2 activity penalty on the predictions."""

    def __init__(self, model, clip_norm=1.0, penalty=1e-3, **kwargs):
        super().__init__(model, **kwargs)
        self.clip_norm = clip_norm
        self.penalty = penalty

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + self.penalty * tf.reduce_mean(tf.square(y_pred))

    def train_step(self, data):
        # The Keras custom-train_step recipe, unchanged: `self(...)`, `self.optimizer`, `self.metrics` work.
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, self.trainable_variables)
        grads, norm = tf.clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred, sample_weight)
        logs = {m.name: m.result() for m in self.metrics}
        logs["grad_norm"] = norm
        return logs


rng = np.random.default_rng(0)
x = rng.standard_normal((2000, 10)).astype("float32")
y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")

model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
model.compile(
    optimizer=keras.optimizers.SGD(0.5),
    loss=keras.losses.BinaryCrossentropy(from_logits=True),
    metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
)

trainer = ClippedTrainer(model, clip_norm=0.5)
history = trainer.fit(x, y, batch_size=32, epochs=4, validation_split=0.2, verbose=2)
print("train step traced", trainer.trace_counts["train"], "time(s)")
print("last grad norm before clipping:", round(history.history["grad_norm"][-1], 3))
print("val accuracy:", round(history.history["val_binary_accuracy"][-1], 3))
