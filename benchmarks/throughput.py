"""Training throughput: SafeTrainer.fit against model.fit, measured in the same process, interleaved.

    python benchmarks/throughput.py                 # MLP and CNN, 5 runs of each variant
    python benchmarks/throughput.py --reps 7 --json results/throughput.json

Variants (each a fresh model, `--epochs` epochs, verbose=0 unless named; the first epoch, which traces, is
dropped; a run's steps/s is the median of its remaining epochs; the table shows the median over runs):

    fit            model.fit, Keras defaults (steps_per_execution=1)
    safe           SafeTrainer.fit, defaults (steps_per_execution="auto")
    fit_spe        model.fit, compiled with steps_per_execution=N
    safe_spe       SafeTrainer.fit, steps_per_execution=N
    safe_verbose1  SafeTrainer.fit, defaults, verbose=1 (progress bar written to /dev/null)
    floor          one tf.function running a whole epoch of the same train step in a graph loop

Targets (from the issue): safe/fit >= 1.5 (MLP) and >= 1.1 (CNN); safe_spe/fit_spe >= 1.0;
safe/floor >= 0.9; safe_verbose1/safe >= 0.97.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from safetrain import SafeTrainer  # noqa: E402
from safetrain.data import as_batches  # noqa: E402

BATCH = 32


def mlp_problem(n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32)).astype("float32")
    y = (x @ rng.standard_normal((32, 1)) + 0.1 * rng.standard_normal((n, 1))).astype("float32")

    def build(spe=1):
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        m.compile(optimizer="adam", loss="mse", steps_per_execution=spe)
        return m

    return x, y, build


def cnn_problem(n):
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=(n,)).astype("int32")

    def build(spe=1):
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Conv2D(16, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        m.compile(
            optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=spe
        )
        return m

    return x, y, build


PROBLEMS = {"mlp": (mlp_problem, 20_000), "cnn": (cnn_problem, 10_000)}


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def floor_run(x, y, build, epochs):
    """The same train step, a whole epoch per call: no Python between steps at all."""
    model = build()
    batches = as_batches(x, y, batch_size=BATCH, shuffle=True, seed=0)
    model._symbolic_build(data_batch=batches.element_spec)

    @tf.function(autograph=False)
    def run_epoch(iterator, n):
        def body(i):
            model.train_step(iterator.get_next())
            return i + 1

        return tf.while_loop(lambda i: i < n, body, [tf.constant(0)])

    n = tf.constant(batches.num_batches)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        run_epoch(iter(batches.dataset(epoch)), n)
        float(model.optimizer.iterations.numpy())  # sync
        times.append(time.perf_counter() - t0)
    return times


def run_variant(name, x, y, build, epochs, spe):
    timer = EpochTimer()
    kwargs = dict(x=x, y=y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[timer])
    if name == "fit":
        build().fit(**kwargs)
    elif name == "fit_spe":
        build(spe).fit(**kwargs)
    elif name == "safe":
        SafeTrainer(build()).fit(**kwargs)
    elif name == "safe_spe":
        SafeTrainer(build(), steps_per_execution=spe).fit(**kwargs)
    elif name == "safe_verbose1":
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            SafeTrainer(build()).fit(**dict(kwargs, verbose=1))
    elif name == "floor":
        timer.times = floor_run(x, y, build, epochs)
    else:
        raise ValueError(name)
    return timer.times


VARIANTS = ["fit", "safe", "fit_spe", "safe_spe", "safe_verbose1", "floor"]
RATIOS = [("safe", "fit"), ("safe_spe", "fit_spe"), ("safe", "floor"), ("safe_verbose1", "safe")]


def measure(problem, reps, epochs, spe, samples=None, variants=None):
    make, default_n = PROBLEMS[problem]
    x, y, build = make(samples or default_n)
    steps = int(np.ceil(len(x) / BATCH))
    chosen = variants or VARIANTS
    runs = {v: [] for v in chosen}
    for rep in range(reps):
        # Interleaved, and rotated each rep: drift on the machine, and whatever the previous run leaves
        # behind (a run right after model.fit measured slower), hit every variant alike.
        order = chosen[rep % len(chosen) :] + chosen[: rep % len(chosen)]
        for v in order:
            times = run_variant(v, x, y, build, epochs, spe)
            runs[v].append(steps / statistics.median(times[1:]))
            keras.backend.clear_session()
            gc.collect()
            time.sleep(0.5)  # let the previous run's tf.data threads wind down
            print(f"  {problem} rep {rep + 1}/{reps} {v:14s} {runs[v][-1]:8.1f} steps/s", file=sys.stderr, flush=True)
    med = {v: statistics.median(r) for v, r in runs.items()}
    ratios = {f"{a}/{b}": med[a] / med[b] for a, b in RATIOS if a in med and b in med}
    return dict(problem=problem, samples=len(x), steps_per_epoch=steps, runs=runs, median=med, ratios=ratios)


TARGETS = {"mlp": {"safe/fit": 1.5}, "cnn": {"safe/fit": 1.1}}
COMMON_TARGETS = {"safe_spe/fit_spe": 1.0, "safe/floor": 0.9, "safe_verbose1/safe": 0.97}


def table(results, spe):
    shown = [v for v in VARIANTS if v in results[0]["median"]]
    lines = [f"| problem | {' | '.join(shown)} |", "|---" * (len(shown) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['problem']} steps/s | " + " | ".join(f"{r['median'][v]:.0f}" for v in shown) + " |")
    lines.append("")
    lines.append("| problem | ratio | measured | target | met |")
    lines.append("|---|---|---|---|---|")
    for r in results:
        targets = dict(COMMON_TARGETS, **TARGETS.get(r["problem"], {}))
        for k, v in r["ratios"].items():
            t = targets.get(k)
            lines.append(f"| {r['problem']} | {k} | {v:.3f} | >= {t} | {'yes' if v >= t else 'NO'} |")
    lines.append("")
    lines.append(
        f"(batch {BATCH}, steps_per_execution N={spe} for *_spe, medians of {len(results[0]['runs'][shown[0]])} "
        f"runs; TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()})"
    )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="mlp,cnn")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--spe", type=int, default=10, help="steps_per_execution for the *_spe variants")
    p.add_argument("--samples", type=int, default=None, help="override the data size (smoke tests)")
    p.add_argument(
        "--variants", default=None, help=f"comma list, for a focused A/B run (default: all of {','.join(VARIANTS)})"
    )
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    variants = a.variants.split(",") if a.variants else None
    results = [measure(prob, a.reps, a.epochs, a.spe, a.samples, variants) for prob in a.problems.split(",")]
    print(table(results, a.spe))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(
                dict(results=results, tf=tf.__version__, keras=keras.__version__, cores=os.cpu_count()), f, indent=1
            )
    return results


if __name__ == "__main__":
    main()
