"""A training run with Checkpoint, for kill-and-resume tests: `python checkpointed_run.py OUT_JSON CKPT_DIR`.

Environment switches (test-only, set by the parent test):
    SLOW_CHECKPOINT_WRITE=seconds  pause this long half-way through writing each state.bin, with the file
                                   CKPT_DIR/../writing holding the write's number meanwhile (so that a
                                   kill can land mid-write)
The script creates CKPT_DIR/../started when training begins (after TensorFlow's import and the build), so
that a parent can time a kill from there, and adds a line to CKPT_DIR/../train_ends whenever callbacks hear
`on_train_end`.
    NO_CHECKPOINT=1                train without the Checkpoint policy (the uninterrupted reference)
    RESTART_OVER_MB=mib            add MemoryBudget(mib, action="restart"): re-exec after every epoch whose
                                   end finds RSS over that
"""

import json
import os
import sys
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import safetrain.checkpoint as checkpoint_module  # noqa: E402
from safetrain import Checkpoint, MemoryBudget, SafeTrainer  # noqa: E402

out_path, ckpt_dir = sys.argv[1], sys.argv[2]
delay = float(os.environ.get("SLOW_CHECKPOINT_WRITE", "0"))
folder = os.path.dirname(ckpt_dir.rstrip("/"))
if delay:
    marker = os.path.join(folder, "writing")
    writes = {"n": 0}

    def slow_write_state(path, chunks):
        writes["n"] += 1
        with open(marker, "w") as f:  # the parent reads which write this is
            f.write(str(writes["n"]))
        data = b"".join(bytes(c) for c in chunks)
        half = len(data) // 2
        with open(path, "wb") as f:  # write half, pause, write the rest: a kill here truncates the file
            f.write(data[:half])
            f.flush()
            time.sleep(delay)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.remove(marker)
        return len(data), zlib.crc32(data)

    checkpoint_module._write_state = slow_write_state

rng = np.random.default_rng(0)
x = rng.standard_normal((480, 8)).astype("float32")
y = (x[:, :2].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((480, 1))).astype("float32")

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
policies = [] if os.environ.get("NO_CHECKPOINT") else [Checkpoint(ckpt_dir, every_n_batches=7, keep=2)]
if os.environ.get("RESTART_OVER_MB"):
    policies.append(MemoryBudget(float(os.environ["RESTART_OVER_MB"]), action="restart"))
trainer = SafeTrainer(model, policies=policies)


class Slow(keras.callbacks.Callback):
    """Mark the start of training, and stretch each epoch so that a kill can land anywhere in it."""

    def on_train_begin(self, logs=None):
        open(os.path.join(folder, "started"), "w").close()

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(0.2)

    def on_train_end(self, logs=None):  # also before a restart: callbacks are flushed then
        with open(os.path.join(folder, "train_ends"), "a") as f:
            f.write(f"{os.getpid()}\n")


history = trainer.fit(x, y, batch_size=16, epochs=6, validation_split=0.25, verbose=0, callbacks=[Slow()])
result = {
    "history": {k: v for k, v in history.history.items() if k != "rss_mb"},
    "epochs": history.epoch,
    "weights": [w.tolist() for w in trainer.model.get_weights()],
    "iterations": int(trainer.model.optimizer.iterations),
    "resumed_from": policies[0].resumed_from if policies else None,
    "restarts": int(os.environ.get("SAFETRAIN_RESTARTS", "0")),
    "pid": os.getpid(),
}
with open(out_path, "w") as f:
    json.dump(result, f)
