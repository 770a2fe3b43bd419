"""One worker of a 2-worker MultiWorkerMirroredStrategy run on localhost (tests/test_distributed.py starts two).

Usage: python tests/scripts/multi_worker.py SCENARIO WORKDIR INDEX PORT0,PORT1
       python tests/scripts/multi_worker.py single WORKDIR       (the same training on one device)
Prints one line "RESULT {json}" at the end.

Scenarios:
  train    4 epochs with a Checkpoint policy, CSVLogger, ModelCheckpoint and progress bars (verbose=1)
  first    2 epochs with Checkpoint + re-hydration every epoch (ClearSession); `resume` then runs to 4
  resume   the same command with epochs=4: resumes from `first`'s checkpoint
  memory   worker 1 leaks 40 MiB per epoch; LeakDetector and MemoryBudget(action="stop") on both
  die      worker 1 exits abruptly at the end of epoch 1; worker 0 must stop with WorkerFailure
"""

import json
import os
import sys
import time

scenario, workdir = sys.argv[1], sys.argv[2]
if scenario != "single":
    index, ports = int(sys.argv[3]), sys.argv[4].split(",")
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy() if scenario != "single" else None

import keras  # noqa: E402
import numpy as np  # noqa: E402

import safetrain  # noqa: E402
from safetrain import Checkpoint, ClearSession, LeakDetector, MemoryBudget, SafeTrainer  # noqa: E402
from safetrain import distributed, memory  # noqa: E402

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 8)).astype("float32")
y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((512, 1))).astype("float32")


def factory():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return m


def fit(trainer, **kwargs):
    keras.utils.set_random_seed(0)
    args = dict(batch_size=64, epochs=4, shuffle=True, validation_data=(x[:128], y[:128]), verbose=0)
    args.update(kwargs)
    return trainer.fit(x, y, **args).history


out = {"worker": 0 if strategy is None else distributed.worker_index(strategy),
       "chief": distributed.is_chief(strategy)}
t0 = time.perf_counter()

if scenario == "single":
    trainer = SafeTrainer(factory)
    history = fit(trainer)
elif scenario == "train":
    ckpt = Checkpoint(os.path.join(workdir, "ckpt"))
    trainer = SafeTrainer(factory, strategy=strategy, policies=[ckpt])
    callbacks = [keras.callbacks.CSVLogger(os.path.join(workdir, "log.csv")),
                 keras.callbacks.ModelCheckpoint(os.path.join(workdir, "model.keras"))]
    history = fit(trainer, verbose=1, callbacks=callbacks)
    out["written"] = [os.path.basename(p) for p in ckpt.written]
elif scenario in ("first", "resume"):
    ckpt = Checkpoint(os.path.join(workdir, "ckpt"))
    trainer = SafeTrainer(factory, strategy=strategy, policies=[ckpt, ClearSession()])
    history = fit(trainer, epochs=2 if scenario == "first" else 4)
    out["resumed_from"] = os.path.basename(ckpt.resumed_from or "")
    out["rehydrations"] = trainer.rehydrations
    out["variable_type"] = type(trainer.model.trainable_variables[0].value).__name__
elif scenario == "memory":
    leak = []

    class Leak(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            leak.append(np.ones(40 * 2**20 // 8))  # 40 MiB, touched

    trainer = SafeTrainer(factory, strategy=strategy)
    fit(trainer, epochs=1)  # warm-up: traces and first-epoch growth out of the way
    budget = distributed.min_across_workers(strategy, memory.rss_mb()) + 180
    detector = LeakDetector(window=3, threshold_mb_per_epoch=10)
    trainer.policies = safetrain.policies.PolicyList([detector, MemoryBudget(budget, action="stop")])
    history = fit(trainer, epochs=12, callbacks=[Leak()] if out["worker"] == 1 else [])
    out["budget"] = budget
    out["own_rss_mb"] = memory.rss_mb()
    out["leak_report"] = None if detector.report is None else detector.report["slope_mb_per_epoch"]
    out["worker_rss_mb"] = [list(s.worker_rss_mb or ()) for s in trainer.memory]
    out["rss_series"] = trainer.memory.series("rss_mb")
elif scenario == "die":
    class Die(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                os._exit(3)

    trainer = SafeTrainer(factory, strategy=strategy)
    try:
        fit(trainer, epochs=50, callbacks=[Die()] if out["worker"] == 1 else [])
        out["error"] = None
    except safetrain.WorkerFailure as error:
        out["error"] = type(error).__name__
        out["message"] = str(error)
    out["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out), flush=True)
    sys.exit(0)
else:
    raise SystemExit(f"unknown scenario {scenario!r}")

out["history"] = {k: v for k, v in history.items()}
out["weights"] = [w.tolist() for w in trainer.model.get_weights()]
out["traces"] = dict(trainer.trace_counts)
out["seconds"] = time.perf_counter() - t0
print("RESULT " + json.dumps(out), flush=True)
