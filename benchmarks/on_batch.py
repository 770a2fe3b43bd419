"""Per-call time of `train_on_batch`, `test_on_batch` and `predict_on_batch`: SafeTrainer against Keras's own
methods on the same model, alternated in one process; `trainer.predict` / `trainer.evaluate` on an input that is
one batch against Keras's `predict_on_batch` / `test_on_batch` (and `model.predict`, for reference); and RSS
over many `train_on_batch` calls.

    python benchmarks/on_batch.py                       # 5 rounds of 300 calls each, then 10,000 calls
    python benchmarks/on_batch.py --calls 50 --rounds 2 --memory-calls 500 --json results/on_batch.json

Model: Dense 16-64-4, batches of one row (where the per-call set-up dominates). Each figure is the median
over rounds of the mean time per call. Targets (issue 11): the `*_on_batch` methods within 1.1x of Keras's;
`trainer.predict` on one small batch within 2x of `model.predict_on_batch`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from safetrain import SafeTrainer, memory  # noqa: E402


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory-calls", type=int, default=10000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 16)).astype("float32")
    y = np.zeros((1, 4), "float32")
    model, trainer = build(), SafeTrainer(build())
    cases = {  # name: (Keras's call, SafeTrainer's call, target ratio)
        "train_on_batch": (lambda: model.train_on_batch(x, y), lambda: trainer.train_on_batch(x, y), 1.1),
        "test_on_batch": (lambda: model.test_on_batch(x, y), lambda: trainer.test_on_batch(x, y), 1.1),
        "predict_on_batch": (lambda: model.predict_on_batch(x), lambda: trainer.predict_on_batch(x), 1.1),
        "trainer.predict(x, verbose=0) vs model.predict_on_batch": (
            lambda: model.predict_on_batch(x),
            lambda: trainer.predict(x, verbose=0),
            2.0,
        ),
        "trainer.evaluate(x, y, verbose=0) vs model.test_on_batch": (
            lambda: model.test_on_batch(x, y),
            lambda: trainer.evaluate(x, y, verbose=0),
            2.0,
        ),
        "trainer.predict(x, verbose=0) vs model.predict(x, verbose=0)": (
            lambda: model.predict(x, verbose=0),
            lambda: trainer.predict(x, verbose=0),
            None,
        ),
    }
    rows = []
    for name, (keras_call, safe_call, target) in cases.items():
        for f in (keras_call, safe_call):  # trace and warm up
            f()
            f()
        times: dict[str, list[float]] = {"keras": [], "safetrain": []}
        for _ in range(args.rounds):
            for runner, f in (("keras", keras_call), ("safetrain", safe_call)):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f()
                times[runner].append((time.perf_counter() - t0) / args.calls * 1000)
        k, s = statistics.median(times["keras"]), statistics.median(times["safetrain"])
        rows.append({"method": name, "keras_ms": k, "safetrain_ms": s, "ratio": s / k, "target": target})
    rss = []
    every = max(1, args.memory_calls // 10)
    for i in range(args.memory_calls):
        trainer.train_on_batch(x, y)
        if (i + 1) % every == 0:
            rss.append(memory.rss_mb())
    growth = memory.slope(rss[3:]) / every * 1000 if len(rss) > 4 else float("nan")
    print("| call | Keras ms/call | SafeTrainer ms/call | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        target = r["target"]
        met = "-" if target is None else f"<= {target} {'yes' if r['ratio'] <= target else 'NO'}"
        print(f"| {r['method']} | {r['keras_ms']:.3f} | {r['safetrain_ms']:.3f} | {r['ratio']:.2f} | {met} |")
    print(
        f"\nRSS over {args.memory_calls} train_on_batch calls: {rss[0]:.1f} -> {rss[-1]:.1f} MiB, "
        f"slope {growth:+.3f} MiB per 1000 calls after the first 3 samples; traces {trainer.trace_counts}"
    )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rss_mb": rss, "traces": trainer.trace_counts}, f, indent=1)


if __name__ == "__main__":
    main()
