"""MirroredStrategy on 2 logical CPU devices vs one device, in a fresh process (devices are fixed at TF start).

Prints one JSON line with everything tests/test_distributed.py asserts on.
Usage: python tests/scripts/mirrored.py WORKDIR
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from safetrain import Checkpoint, ClearSession, SafeTrainer  # noqa: E402

workdir = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((512, 8)).astype("float32")
y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((512, 1))).astype("float32")
vx, vy = x[:128], y[:128]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return m


def in_scope():
    with strategy.scope():
        return model()


def weights(trainer):
    return [w.tolist() for w in trainer.model.get_weights()]


FIT = dict(batch_size=64, epochs=3, shuffle=True, validation_data=(vx, vy), verbose=0)
out = {}


def run(name, trainer, **kwargs):
    keras.utils.set_random_seed(0)  # the data seed
    history = trainer.fit(x, y, **{**FIT, **kwargs}).history
    out[name] = {k: v for k, v in history.items() if k != "rss_mb"}
    out[name + "_weights"] = weights(trainer)
    out[name + "_traces"] = dict(trainer.trace_counts)
    return trainer


single = run("single", SafeTrainer(model()))
mirrored = run("mirrored", SafeTrainer(in_scope()))  # strategy detected from the model
out["detected"] = mirrored.strategy is strategy
out["replicas"] = mirrored.strategy.num_replicas_in_sync
out["variable_type"] = type(mirrored.model.trainable_variables[0].value).__name__
run("mirrored_factory", SafeTrainer(model, strategy=strategy))  # a factory built inside the scope
run("mirrored_spe1", SafeTrainer(in_scope(), steps_per_execution=1))
run("mirrored_spe3", SafeTrainer(in_scope(), steps_per_execution=3))

# Keras's own mirrored fit on the same data and order, as a second reference.
keras_model = in_scope()
keras.utils.set_random_seed(0)
out["keras_mirrored"] = keras_model.fit(
    x, y, batch_size=64, epochs=3, shuffle=False, validation_data=(vx, vy), verbose=0
).history
keras.utils.set_random_seed(0)
out["safe_mirrored_noshuffle"] = (
    SafeTrainer(in_scope())
    .fit(x, y, batch_size=64, epochs=3, shuffle=False, validation_data=(vx, vy), verbose=0)
    .history
)

out["evaluate_single"] = single.evaluate(vx, vy, batch_size=32, verbose=0, return_dict=True)
out["evaluate_mirrored"] = mirrored.evaluate(vx, vy, batch_size=32, verbose=0, return_dict=True)
# 100 rows: the last batch of 4 splits unevenly over the replicas; the order must still be the input's.
out["predict_single"] = single.predict(x[:100], batch_size=32, verbose=0).ravel().tolist()
out["predict_mirrored"] = mirrored.predict(x[:100], batch_size=32, verbose=0).ravel().tolist()
out["predict_traces"] = mirrored.trace_counts["predict"]

# Re-hydration after every epoch inside the strategy's scope vs the same mirrored run without it.
rehydrated = run("mirrored_rehydrated", SafeTrainer(in_scope, strategy=strategy, policies=[ClearSession()]))
out["rehydrations"] = rehydrated.rehydrations
out["rehydrated_variable_type"] = type(rehydrated.model.trainable_variables[0].value).__name__
run("mirrored_reference", SafeTrainer(in_scope, strategy=strategy))

# Checkpoint: 2 epochs, then a new trainer resumes to 3; vs mirrored_reference (3 uninterrupted).
directory = os.path.join(workdir, "ckpt")
run("resume_first", SafeTrainer(in_scope, strategy=strategy, policies=[Checkpoint(directory)]), epochs=2)
resumed = run("resumed", SafeTrainer(in_scope, strategy=strategy, policies=[Checkpoint(directory)]))
out["resumed_from"] = os.path.basename(resumed.policies.policies[0].resumed_from or "")
# A model made outside the scope, or under another strategy, is refused before any step.
errors = {}
for name, make, other in (
    ("outside_scope", model, strategy),
    ("other_strategy", in_scope, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
):
    try:
        SafeTrainer(make(), strategy=other)
        errors[name] = None
    except ValueError as error:
        errors[name] = f"{type(error).__name__}: {error}"
out["errors"] = errors
print("RESULT " + json.dumps(out), flush=True)
