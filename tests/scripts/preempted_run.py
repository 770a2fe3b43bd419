"""A shuffled, chunked run with Dropout and a Checkpoint, for the preemption tests and benchmark:
`python preempted_run.py OUT_JSON CKPT_DIR`.

Writes CKPT_DIR/../started (monotonic time) when training begins. On SIGTERM, `fit` stops at the next step,
saves, and raises `TrainingPreempted`: the script then writes OUT_JSON with `preempted`, the checkpoint's
path, `global_step`, the optimizer's `iterations`, and `timeline` (the optimizer's iterations sampled every
2 ms with `time.monotonic()`, so a parent can tell which step a signal sent at a known time landed on), and
exits with the exception's status (143). Otherwise (a first run, or the rerun that resumes) OUT_JSON holds
the History, the final weights' checksum and the counters.

Environment: NO_CHECKPOINT=1 trains without the policy; SAVE_ON_INTERRUPT=1 sets `save_on_interrupt`;
PER_STEP=1 adds a callback with a batch hook (one step per compiled call, as Keras runs); EPOCHS (default 4).
"""

import json
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from safetrain import Checkpoint, SafeTrainer, TrainingPreempted  # noqa: E402

out_path, ckpt_dir = sys.argv[1], sys.argv[2]
folder = os.path.dirname(ckpt_dir.rstrip("/"))
rng = np.random.default_rng(0)
x = rng.standard_normal((20000, 16)).astype("float32")
y = (x[:, :3].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((20000, 1))).astype("float32")

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.3), keras.layers.Dense(1)]
)
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
policies = []
if not os.environ.get("NO_CHECKPOINT"):
    policies.append(Checkpoint(ckpt_dir, keep=2, save_on_interrupt=bool(os.environ.get("SAVE_ON_INTERRUPT"))))
trainer = SafeTrainer(model, policies=policies)
timeline: list = []
running = threading.Event()


def sample_iterations():
    while not running.wait(0.002):
        timeline.append((time.monotonic(), int(model.optimizer.iterations.numpy())))


class Started(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        with open(os.path.join(folder, "started"), "w") as f:
            f.write(str(time.monotonic()))
        threading.Thread(target=sample_iterations, daemon=True).start()

    def on_train_end(self, logs=None):
        with open(os.path.join(folder, "train_ends"), "a") as f:
            f.write(f"{trainer.progress.global_step}\n")


class EveryStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        pass


def counters() -> dict:
    return dict(global_step=trainer.progress.global_step, iterations=int(model.optimizer.iterations.numpy()))


callbacks = [Started(), *([EveryStep()] if os.environ.get("PER_STEP") else [])]
try:
    history = trainer.fit(
        x, y, batch_size=32, epochs=int(os.environ.get("EPOCHS", "4")), verbose=0, callbacks=callbacks
    )
except TrainingPreempted as stop:
    running.set()
    with open(out_path, "w") as f:
        json.dump(dict(preempted=True, checkpoint=stop.checkpoint, timeline=timeline, **counters()), f)
    raise
except KeyboardInterrupt:
    running.set()
    with open(out_path, "w") as f:
        json.dump(dict(interrupted=True, timeline=timeline, **counters()), f)
    raise
running.set()
weights = [float(np.abs(w).sum()) for w in model.get_weights()]
with open(out_path, "w") as f:
    json.dump(dict(history=history.history, epoch=history.epoch, weights=weights, **counters()), f)
