"""One worker of a 2-worker MultiWorkerMirroredStrategy run on localhost (tests/test_distributed.py starts two).

Usage: python tests/scripts/multi_worker.py SCENARIO WORKDIR INDEX PORT0,PORT1
       python tests/scripts/multi_worker.py single WORKDIR       (the same training on one device)
Prints one line "RESULT {json}" at the end.

SCENARIO is one or more steps joined by "+", run one after another in the same two processes:
  train    4 epochs with a Checkpoint policy, CSVLogger, ModelCheckpoint and progress bars (verbose=1),
           into WORKDIR/train
  first    2 epochs with Checkpoint + re-hydration every epoch (ClearSession), into WORKDIR/resume
  resume   the same with epochs=4, in new processes: resumes from `first`'s checkpoint
  memory   worker 1 leaks 40 MiB per epoch; LeakDetector and MemoryBudget(action="stop") on both
  die      worker 1 exits abruptly at the end of epoch 1; worker 0 must stop with WorkerFailure
  prefull  20 epochs with a Checkpoint, never stopped, into WORKDIR/prefull (the preemption reference)
  preempt  the same into WORKDIR/preempt; worker 1 sends itself SIGTERM 1.5 s into training: both workers
           stop at the same step, save once and exit with TrainingPreempted (143) after printing RESULT
  preresume  the same again in new processes: resumes from `preempt`'s checkpoint and finishes
Results are under their step's name.
"""

import json
import os
import signal
import sys
import threading
import time

scenario, workdir = sys.argv[1], sys.argv[2]
if scenario != "single":
    index, ports = int(sys.argv[3]), sys.argv[4].split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy() if scenario != "single" else None

import keras  # noqa: E402
import numpy as np  # noqa: E402

import safetrain  # noqa: E402
from safetrain import Checkpoint, ClearSession, LeakDetector, MemoryBudget, SafeTrainer, distributed, memory  # noqa: E402  # noqa: E402

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


def train_run(folder):
    os.makedirs(folder, exist_ok=True)
    ckpt = Checkpoint(os.path.join(folder, "ckpt"))
    trainer = SafeTrainer(factory, strategy=strategy, policies=[ckpt])
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(folder, "log.csv")),
        keras.callbacks.ModelCheckpoint(os.path.join(folder, "model.keras")),
    ]
    history = fit(trainer, verbose=1, callbacks=callbacks)
    return trainer, history, {"written": [os.path.basename(p) for p in ckpt.written]}


def resumable_run(folder, epochs):
    ckpt = Checkpoint(os.path.join(folder, "ckpt"))
    trainer = SafeTrainer(factory, strategy=strategy, policies=[ckpt, ClearSession()])
    history = fit(trainer, epochs=epochs)
    return (
        trainer,
        history,
        {
            "resumed_from": os.path.basename(ckpt.resumed_from or ""),
            "rehydrations": trainer.rehydrations,
            "variable_type": type(trainer.model.trainable_variables[0].value).__name__,
        },
    )


def memory_run(worker):
    leak = []

    class Leak(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            leak.append(np.ones(40 * 2**20 // 8))  # 40 MiB, touched

    trainer = SafeTrainer(factory, strategy=strategy)
    fit(trainer, epochs=1)  # warm-up: traces and first-epoch growth out of the way
    budget = distributed.min_across_workers(strategy, memory.rss_mb()) + 180
    detector = LeakDetector(window=3, threshold_mb_per_epoch=10)
    trainer.policies = safetrain.policies.PolicyList([detector, MemoryBudget(budget, action="stop")])
    history = fit(trainer, epochs=12, callbacks=[Leak()] if worker == 1 else [])
    return (
        trainer,
        history,
        {
            "budget": budget,
            "own_rss_mb": memory.rss_mb(),
            "leak_report": None if detector.report is None else detector.report["slope_mb_per_epoch"],
            "worker_rss_mb": [list(s.worker_rss_mb or ()) for s in trainer.memory],
            "rss_series": trainer.memory.series("rss_mb"),
        },
    )


def preemptible_run(folder, worker, signal_after=None):
    ckpt = Checkpoint(os.path.join(folder, "ckpt"))
    trainer = SafeTrainer(factory, strategy=strategy, policies=[ckpt])

    class SignalSelf(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            threading.Timer(signal_after, os.kill, (os.getpid(), signal.SIGTERM)).start()

    callbacks = [SignalSelf()] if signal_after is not None and worker == 1 else []
    extra = {"resumed_from": "", "preempted": False}
    try:
        history = fit(trainer, epochs=20, validation_data=None, callbacks=callbacks)
    except safetrain.TrainingPreempted as stop:
        extra.update(preempted=True, code=stop.code, checkpoint=os.path.basename(stop.checkpoint or ""))
        history = trainer.model.history.history
    extra.update(
        resumed_from=os.path.basename(ckpt.resumed_from or ""),
        global_step=trainer.progress.global_step,
        iterations=int(trainer.model.optimizer.iterations.numpy()),
        written=[os.path.basename(p) for p in ckpt.written],
    )
    return trainer, history, extra


def die_run(worker):
    class Die(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                os._exit(3)

    t0 = time.perf_counter()
    trainer = SafeTrainer(factory, strategy=strategy)
    result = {"error": None}
    try:
        fit(trainer, epochs=50, callbacks=[Die()] if worker == 1 else [])
    except safetrain.WorkerFailure as error:
        result.update(error=type(error).__name__, message=str(error))
    result["seconds"] = time.perf_counter() - t0
    return result


out = {"worker": 0 if strategy is None else distributed.worker_index(strategy), "chief": distributed.is_chief(strategy)}
# Steps joined by "+" run one after another in the same processes (one cluster start-up for several).
for step in scenario.split("+"):
    t0 = time.perf_counter()
    if step == "die":
        out[step] = die_run(out["worker"])
        continue
    if step == "single":
        trainer = SafeTrainer(factory)
        trainer, history, extra = trainer, fit(trainer), {}
    elif step == "train":
        trainer, history, extra = train_run(os.path.join(workdir, "train"))
    elif step in ("first", "resume"):
        trainer, history, extra = resumable_run(os.path.join(workdir, "resume"), 2 if step == "first" else 4)
    elif step == "memory":
        trainer, history, extra = memory_run(out["worker"])
    elif step in ("prefull", "preempt", "preresume"):
        folder = os.path.join(workdir, "prefull" if step == "prefull" else "preempt")
        trainer, history, extra = preemptible_run(folder, out["worker"], 1.5 if step == "preempt" else None)
    else:
        raise SystemExit(f"unknown scenario {step!r}")
    out[step] = dict(
        extra,
        history={k: v for k, v in history.items()},
        weights=[w.tolist() for w in trainer.model.get_weights()],
        traces=dict(trainer.trace_counts),
        seconds=time.perf_counter() - t0,
    )
print("RESULT " + json.dumps(out), flush=True)
if out.get("preempt", {}).get("preempted"):
    sys.exit(out["preempt"]["code"])  # as TrainingPreempted would have exited
