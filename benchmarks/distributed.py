"""Distributed throughput: SafeTrainer.fit against model.fit under tf.distribute, interleaved, medians.

    python benchmarks/distributed.py                       # both setups, 5 runs of each variant
    python benchmarks/distributed.py --setups mirrored --reps 7 --json results/distributed.json

Setups (each in fresh processes, since devices and TF_CONFIG are fixed when TensorFlow starts):

    mirrored      MirroredStrategy over 2 logical CPU devices in one process
    multi_worker  MultiWorkerMirroredStrategy, 2 worker processes on localhost (TF_CONFIG, free ports)

Variants, alternated within each process (fresh model in the strategy's scope, `--epochs` epochs, the
first, which traces, dropped; a run's steps/s is the median of the remaining epochs; the table shows the
median over runs). Steps are global steps (one global batch of `--batch` split over the replicas):

    fit   model.fit with Keras's defaults (steps_per_execution=1)
    safe  SafeTrainer.fit with its defaults (steps_per_execution="auto")

Keras 3's own model.fit does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: its
symbolic build reduces a per-replica data batch, and its "auto" reduction of scalar logs asks for axis 0);
for the multi_worker baseline both are patched as the issue thread suggests (see `patch_keras_fit`), and
the table says so. Target (issue 5): safe/fit >= 1.0 in both setups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys

HERE = os.path.abspath(__file__)
VARIANTS = ("fit", "safe")


# -- inside a benchmark process -----------------------------------------------------------------------


def patch_keras_fit(strategy):
    """Let Keras 3's model.fit run under MultiWorkerMirroredStrategy (keras-team/keras#20585)."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as keras_trainer

    from safetrain.steps import _reduce_per_replica

    keras_trainer.reduce_per_replica = lambda values, s, reduction="auto": _reduce_per_replica(values, s, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], batch)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build


def measure(strategy, reps: int, epochs: int, batch: int, samples: int) -> dict:
    import keras
    import numpy as np

    from safetrain import SafeTrainer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 32)).astype("float32")
    y = (x @ rng.standard_normal((32, 1)) + 0.1 * rng.standard_normal((samples, 1))).astype("float32")
    steps = samples // batch
    x, y = x[: steps * batch], y[: steps * batch]

    def build():
        keras.utils.set_random_seed(0)
        with strategy.scope():
            m = keras.Sequential(
                [
                    keras.Input((32,)),
                    keras.layers.Dense(256, activation="relu"),
                    keras.layers.Dense(256, activation="relu"),
                    keras.layers.Dense(1),
                ]
            )
            m.compile(optimizer="adam", loss="mse")
        return m

    sys.path.insert(0, os.path.dirname(HERE))
    from throughput import EpochTimer  # the same timing as the single-device benchmark

    runs = {v: [] for v in VARIANTS}
    for rep in range(reps):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # alternate who goes first
        for variant in order:
            timer = EpochTimer()
            kwargs = dict(x=x, y=y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[timer])
            if variant == "fit":
                build().fit(**kwargs)
            else:
                SafeTrainer(build()).fit(**kwargs)
            runs[variant].append(steps / statistics.median(timer.times[1:]))
            keras.backend.clear_session()
            print(f"  rep {rep + 1}/{reps} {variant:5s} {runs[variant][-1]:8.1f} steps/s", file=sys.stderr, flush=True)
    return dict(runs=runs, steps_per_epoch=steps)


def role_mirrored(args) -> None:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print("RESULT " + json.dumps(measure(strategy, args.reps, args.epochs, args.batch, args.samples)), flush=True)


def role_worker(args) -> None:
    ports = args.ports.split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": args.index}}
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    patch_keras_fit(strategy)
    print("RESULT " + json.dumps(measure(strategy, args.reps, args.epochs, args.batch, args.samples)), flush=True)


# -- the driver ---------------------------------------------------------------------------------------


def _child(extra: list[str], args) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    cmd = [
        sys.executable,
        HERE,
        "--reps",
        str(args.reps),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
        "--samples",
        str(args.samples),
    ] + extra
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=3600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"benchmark process failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def summarize(setup: str, result: dict) -> dict:
    med = {v: statistics.median(r) for v, r in result["runs"].items()}
    return dict(
        setup=setup,
        runs=result["runs"],
        median=med,
        ratio=med["safe"] / med["fit"],
        steps_per_epoch=result["steps_per_epoch"],
    )


def table(rows: list[dict], args) -> str:
    import keras
    import tensorflow as tf

    lines = [
        "| setup | model.fit steps/s | SafeTrainer steps/s | safe/fit | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = " (fit patched for keras#20585)" if r["setup"] == "multi_worker" else ""
        lines.append(
            f"| {r['setup']}{note} | {r['median']['fit']:.1f} | {r['median']['safe']:.1f} | "
            f"{r['ratio']:.3f} | >= 1.0 | {'yes' if r['ratio'] >= 1.0 else 'NO'} |"
        )
    lines.append("")
    lines.append(
        f"(MLP 32-256-256-1, global batch {args.batch}, {args.samples // args.batch} steps/epoch, "
        f"{args.epochs} epochs with the first dropped, medians of {args.reps} interleaved runs; "
        f"multi_worker: worker 0's numbers; TF {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="mirrored,multi_worker")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--samples", type=int, default=6400)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--role", choices=("driver", "mirrored", "worker"), default="driver", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.role == "mirrored":
        return role_mirrored(args)
    if args.role == "worker":
        return role_worker(args)

    rows = []
    for setup in args.setups.split(","):
        print(f"{setup}:", file=sys.stderr, flush=True)
        if setup == "mirrored":
            rows.append(summarize(setup, _result(_child(["--role", "mirrored"], args))))
        elif setup == "multi_worker":
            ports = ",".join(map(str, _free_ports(2)))
            procs = [_child(["--role", "worker", "--index", str(i), "--ports", ports], args) for i in range(2)]
            results = [_result(proc) for proc in procs]
            rows.append(summarize(setup, results[0]))
        else:
            raise SystemExit(f"unknown setup {setup!r}")
    print(table(rows, args))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
