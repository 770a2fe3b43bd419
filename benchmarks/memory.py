"""Memory growth: model.fit against SafeTrainer, each scenario in a fresh subprocess.

    python benchmarks/memory.py                       # all scenarios, table + results/memory.png
    python benchmarks/memory.py --only c,d --png out.png --json out.json

Scenarios (RSS sampled after every unit; slope = least squares after a 3-unit warm-up):
    a  40 epochs of an MLP                                   (unit: epoch)
    b  200 steps over 200 sequence lengths, random order     (unit: step)  + a plain @tf.function step
    c  30 fresh models in a loop: build, fit, evaluate, predict (unit: model)
    d  predict called 300 times                              (unit: call)
    e  a stateful LSTM over 40 epochs, state reset per epoch (unit: epoch)
    r  re-hydration time of a ~1M-parameter model (median of 5)

    python benchmarks/memory.py --loops               # also models in a loop, written the ways users write it

--loops runs benchmarks/loops.py's patterns (nothing between folds, gc.collect(), clear_session(), both,
install(), a trainer per fit(epochs=1)) at widths 64, 128 and 256, 60 models each, SafeTrainer and model.fit.

Target (from the issue): SafeTrainer's slope under 0.5 MiB per unit everywhere; re-hydration under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = {
    "a": ("MLP, 40 epochs", "epoch"),
    "b": ("variable-length sequences, 200 steps", "step"),
    "c": ("30 fresh models in a loop", "model"),
    "d": ("predict called 300 times", "call"),
    "e": ("stateful LSTM, 40 epochs", "epoch"),
}
RUNNERS = {
    "a": ["fit", "safe"],
    "b": ["tf_function", "fit", "safe", "safe_second_pass"],
    "c": ["fit", "safe"],
    "d": ["fit", "safe"],
    "e": ["fit", "safe"],
}
WARMUP = 3


# -- inside the subprocess ---------------------------------------------------------------------------------


def _child(scenario: str, runner: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gc

    import keras
    import numpy as np
    import tensorflow as tf

    from safetrain import ResetStates, SafeTrainer
    from safetrain.memory import rss_mb

    rng = np.random.default_rng(0)
    series: list[float] = []
    extra: dict = {}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            series.append(rss_mb())

    def mlp():
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dropout(0.1),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        m.compile(optimizer="adam", loss="mse", metrics=["mae"])
        return m

    x = rng.standard_normal((4000, 32)).astype("float32")
    y = (x[:, :4].sum(axis=1, keepdims=True)).astype("float32")

    if scenario == "a":
        if runner == "fit":
            mlp().fit(x, y, batch_size=64, epochs=40, validation_split=0.1, verbose=0, callbacks=[Record()])
        else:
            SafeTrainer(mlp()).fit(
                x, y, batch_size=64, epochs=40, validation_split=0.1, verbose=0, callbacks=[Record()]
            )
    elif scenario == "b":
        # 200 different lengths in random order: the largest working set shows up early, so what still
        # grows later is kept memory, not a bigger batch.
        lengths = [int(n) for n in rng.permutation(np.arange(10, 210))]
        batches = [
            (rng.standard_normal((16, n, 8)).astype("float32"), rng.standard_normal((16, 1)).astype("float32"))
            for n in lengths
        ]

        def seq_model():
            keras.utils.set_random_seed(0)
            m = keras.Sequential(
                [
                    keras.Input((None, 8)),
                    keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
                    keras.layers.LSTM(16),
                    keras.layers.Dense(1),
                ]
            )
            m.compile(optimizer="adam", loss="mse")
            return m

        class PerStep(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                series.append(rss_mb())

        if runner == "tf_function":
            m = seq_model()
            m.optimizer.build(m.trainable_variables)
            loss_fn = keras.losses.MeanSquaredError()

            @tf.function
            def step(xb, yb):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb, m(xb, training=True))
                grads = tape.gradient(loss, m.trainable_variables)
                m.optimizer.apply_gradients(zip(grads, m.trainable_variables))

            for xb, yb in batches:
                step(xb, yb)
                series.append(rss_mb())
            extra["traces"] = step.experimental_get_tracing_count()
        elif runner == "fit":
            seq_model().fit((b for b in batches), epochs=1, verbose=0, callbacks=[PerStep()])
        else:
            # safe_second_pass: the same 200 lengths again, recording only the second pass. What grows in the
            # first pass and not in the second is per-shape caching below TensorFlow (oneDNN's primitive
            # cache, 1024 entries by default), not a retrace.
            passes = 2 if runner == "safe_second_pass" else 1
            trainer = SafeTrainer(seq_model())
            trainer.fit((b for b in batches * passes), epochs=1, verbose=0, callbacks=[PerStep()])
            del series[: len(batches) * (passes - 1)]
            extra["traces"] = trainer.trace_counts["train"]
    elif scenario == "c":
        xs, ys = x[:2000], y[:2000]
        for _ in range(30):
            if runner == "fit":
                m = mlp()
                m.fit(xs, ys, batch_size=64, epochs=1, verbose=0)
                m.evaluate(xs, ys, verbose=0)
                m.predict(xs, verbose=0)
                del m
            else:
                trainer = SafeTrainer(mlp)
                trainer.fit(xs, ys, batch_size=64, epochs=1, verbose=0)
                trainer.evaluate(xs, ys, verbose=0)
                trainer.predict(xs, verbose=0)
                del trainer
            gc.collect()  # both runners alike: measure what survives, not what is merely uncollected
            series.append(rss_mb())
    elif scenario == "d":
        m = mlp()
        trainer = SafeTrainer(m)
        xs = x[:1000]
        for _ in range(300):
            if runner == "fit":
                m.predict(xs, verbose=0)
            else:
                trainer.predict(xs, verbose=0)
            series.append(rss_mb())
    elif scenario == "e":
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [keras.Input((20, 4), batch_size=16), keras.layers.LSTM(32, stateful=True), keras.layers.Dense(1)]
        )
        m.compile(optimizer="adam", loss="mse")
        xs = rng.standard_normal((320, 20, 4)).astype("float32")
        ys = rng.standard_normal((320, 1)).astype("float32")
        if runner == "fit":
            reset = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: m.layers[0].reset_state())
            m.fit(xs, ys, batch_size=16, epochs=40, shuffle=False, verbose=0, callbacks=[reset, Record()])
        else:
            SafeTrainer(m, policies=[ResetStates("epoch")]).fit(
                xs, ys, batch_size=16, epochs=40, shuffle=False, verbose=0, callbacks=[Record()]
            )
    elif scenario == "r":
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((512,)),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dropout(0.1),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        m.compile(optimizer="adam", loss="mse")
        trainer = SafeTrainer(m)
        xs = rng.standard_normal((256, 512)).astype("float32")
        trainer.fit(xs, xs[:, :1], epochs=1, verbose=0)
        times, retrace = [], []
        for _ in range(5):
            trainer.rehydrate()
            times.append(trainer.last_rehydration_seconds)
            t0 = time.perf_counter()
            trainer.fit(xs, xs[:, :1], epochs=trainer.epoch + 1, initial_epoch=trainer.epoch, verbose=0)
            retrace.append(time.perf_counter() - t0)
        extra = dict(
            params=trainer.model.count_params(),
            rehydrate_s=times,
            median_s=statistics.median(times),
            first_epoch_after_s=statistics.median(retrace),
        )
    return dict(scenario=scenario, runner=runner, series=series, **extra)


# -- the parent ----------------------------------------------------------------------------------------


def _slope(values):
    from safetrain.diagnostics import slope  # the package's one slope, after the warm-up

    return slope(values[WARMUP:])


def run_child(scenario: str, runner: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", scenario, runner],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scenario {scenario}/{runner} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SCENARIOS if any(r["scenario"] == k for r in results)]
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    style = {
        "fit": ("model.fit", "tab:red"),
        "safe": ("SafeTrainer", "tab:blue"),
        "tf_function": ("plain @tf.function", "tab:gray"),
        "safe_second_pass": ("SafeTrainer, 2nd pass", "tab:cyan"),
    }
    for ax, key in zip(axes.flat, keys):
        title, unit = SCENARIOS[key]
        for r in (r for r in results if r["scenario"] == key):
            label, color = style[r["runner"]]
            base = r["series"][0]
            ax.plot([v - base for v in r["series"]], label=f"{label} ({_slope(r['series']):+.2f}/{unit})", color=color)
        ax.set_title(f"({key}) {title}", fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylabel("RSS growth (MiB)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="a,b,c,d,e,r")
    p.add_argument("--png", default=os.path.join("results", "memory.png"))
    p.add_argument("--json", default=os.path.join("results", "memory.json"))
    p.add_argument("--loops", action="store_true", help="also benchmarks/loops.py's loop patterns (about 20 min)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(_child(*a.child)), flush=True)
        return None
    results = []
    for key in a.only.split(","):
        for runner in RUNNERS.get(key) or ["safe"]:
            t0 = time.perf_counter()
            r = run_child(key, runner)
            r["seconds"] = time.perf_counter() - t0
            results.append(r)
            print(f"  {key}/{runner}: {r['seconds']:.0f}s", file=sys.stderr, flush=True)
    lines = ["| scenario | unit | runner | slope MiB/unit | total MiB | target < 0.5 |", "|---|---|---|---|---|---|"]
    names = {
        "fit": "model.fit",
        "safe": "SafeTrainer",
        "tf_function": "plain @tf.function",
        "safe_second_pass": "SafeTrainer, same lengths again",
    }
    for r in results:
        if r["scenario"] == "r":
            continue
        title, unit = SCENARIOS[r["scenario"]]
        s = _slope(r["series"])
        total = r["series"][-1] - r["series"][0]
        met = ("yes" if s < 0.5 else "NO") if r["runner"].startswith("safe") else ""
        traces = f" ({r['traces']} trace{'s' if r['traces'] != 1 else ''})" if "traces" in r else ""
        lines.append(
            f"| ({r['scenario']}) {title} | {unit} | {names[r['runner']]}{traces} | {s:+.3f} | {total:+.1f} | {met} |"
        )
    for r in results:
        if r["scenario"] == "r":
            lines.append("")
            lines.append(
                f"Re-hydration of a {r['params']:,}-parameter model: median {r['median_s']:.3f} s "
                f"(runs: {', '.join(f'{t:.3f}' for t in r['rehydrate_s'])}); the first epoch after it, "
                f"which traces the new steps: {r['first_epoch_after_s']:.3f} s. Target: under 1 s."
            )
    print("\n".join(lines))
    if a.png and any(r["scenario"] != "r" for r in results):
        plot([r for r in results if r["scenario"] != "r"], a.png)
        print(f"\nplot: {a.png}")
    if a.loops:
        import loops  # benchmarks/loops.py, beside this file

        print("\nModels in a loop (benchmarks/loops.py):")
        results.append(dict(scenario="loops", rows=loops.main(["--runners", "safe,fit"])))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main()
