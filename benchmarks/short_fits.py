"""Short fits, one after another: per-fit time and memory per model, `model.fit` against `SafeTrainer(model).fit`.

    python benchmarks/short_fits.py                          # 1, 8 and 100 steps per fit, 5 rounds of 8 fits
    python benchmarks/short_fits.py --steps 8 --rounds 3 --json results/short_fits.json
    python benchmarks/short_fits.py --loops                  # also issue 21's loop patterns (benchmarks/loops.py)

Issue 14's pattern: many small models trained one after another (k-fold, hyper-parameter search). An 8-16-1
Dense model, batch 32, one epoch of `steps` steps. In one process, for each step count:

- fresh model per fit: build, compile and fit a new model, the two runners alternated fit by fit;
- repeated fit: fit the same model (or the same trainer) again.

Times are per fit: the mean of each round of `--block` fits (SafeTrainer's collection runs every few trainers,
so a median of single fits would leave it out), then the median over `--rounds` rounds, after `--warmup`
warm-ups. Memory per model is the slope of anonymous memory (RssAnon) over `--models` fresh-model fits, each
runner in a fresh process of its own.
Targets (issue 14): fresh model, 8 steps: SafeTrainer at most 1.0x model.fit's time, memory per model under
0.5 MiB; repeated fit at least 2x faster than model.fit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _model():
    import keras

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _data(steps: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32 * steps, 8)).astype("float32")
    return x, x[:, :1] * 2.0


def _fit(runner: str, model, x, y, trainer=None) -> float:
    from safetrain import SafeTrainer

    t0 = time.perf_counter()
    if runner == "fit":
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    else:
        (trainer or SafeTrainer(model)).fit(x, y, batch_size=32, epochs=1, verbose=0)
    return time.perf_counter() - t0


def _per_round(times: list[float], block: int) -> list[float]:
    """Mean seconds per fit of each round of `block` fits: a collection paid every few trainers is counted."""
    return [statistics.mean(times[i : i + block]) for i in range(0, len(times) - block + 1, block)]


def timings(steps: int, rounds: int, block: int, warmup: int) -> dict:
    """Per-fit seconds for fresh models (alternated) and repeated fits, both runners, in this process.

    Each runner's fits are taken in `rounds` rounds of `block` fits; a round's time is its mean per fit (so
    the work safetrain paces over several trainers is in it) and the result is the median over rounds.
    """
    from safetrain import SafeTrainer, reclaim

    x, y = _data(steps)
    fresh: dict[str, list[float]] = {"fit": [], "safe": []}
    before = reclaim.stats()
    for i in range(warmup + rounds * block):
        order = ("fit", "safe") if i % 2 == 0 else ("safe", "fit")
        for runner in order:
            seconds = _fit(runner, _model(), x, y)
            if i >= warmup:
                fresh[runner].append(seconds)
    after = reclaim.stats()
    collections = dict(
        trainers=after["trainers"] - before["trainers"],
        collections=after["collections"] - before["collections"],
        seconds=round(after["collect_s"] - before["collect_s"], 3),
    )
    again: dict[str, list[float]] = {"fit": [], "safe": []}
    model_fit, model_safe = _model(), _model()
    trainer = SafeTrainer(model_safe)
    for i in range(warmup + rounds * block):
        for runner, model in (("fit", model_fit), ("safe", model_safe)):
            seconds = _fit(runner, model, x, y, trainer=trainer if runner == "safe" else None)
            if i >= warmup:
                again[runner].append(seconds)
    med = {
        k: {r: statistics.median(_per_round(v, block)) for r, v in d.items()}
        for k, d in (("fresh", fresh), ("again", again))
    }
    return dict(steps=steps, fresh=fresh, again=again, median=med, collections=collections)


def memory_child(runner: str, steps: int, models: int) -> None:
    """In a fresh process: anonymous memory after each of `models` fresh-model fits, as JSON on stdout."""
    from safetrain.diagnostics import read_memory

    x, y = _data(steps)
    series = []
    for _ in range(models):
        _fit(runner, _model(), x, y)
        series.append(read_memory()[1])
    print(json.dumps(series))


def memory_per_model(runner: str, steps: int, models: int) -> dict:
    from safetrain.diagnostics import slope

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", runner, str(steps), str(models)],
        capture_output=True,
        text=True,
        check=True,
    )
    series = json.loads(out.stdout.strip().splitlines()[-1])
    warm = min(3, len(series) // 3)  # the first models trace and warm up
    return dict(series=series, mb_per_model=slope(series[warm:]))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="1,8,100", help="steps per fit, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds per runner and kind of fit")
    p.add_argument("--block", type=int, default=8, help="fits per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", type=int, default=30, help="fresh models per memory measurement")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--loops", action="store_true", help="also benchmarks/loops.py: every loop pattern, widths 64-256, 60 models"
    )
    a = p.parse_args(argv)
    if a.loops:
        import loops  # benchmarks/loops.py, beside this file: time per fold and memory per model, per pattern

        loops.main(["--runners", "safe,fit"])
    rows = []
    for steps in (int(s) for s in a.steps.split(",")):
        t = timings(steps, a.rounds, a.block, a.warmup)
        mem = {r: memory_per_model(r, steps, a.models) for r in ("fit", "safe")}
        rows.append(dict(t, memory=mem))
        print(f"  {steps} steps done", file=sys.stderr, flush=True)
    print("| steps per fit | fresh model: model.fit | SafeTrainer | ratio | repeated fit: model.fit | SafeTrainer |"
          " ratio | MiB per model: model.fit | SafeTrainer |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, g = r["median"]["fresh"], r["median"]["again"]
        print(
            f"| {r['steps']} | {1000 * f['fit']:.0f} ms | {1000 * f['safe']:.0f} ms | {f['safe'] / f['fit']:.2f}x | "
            f"{1000 * g['fit']:.0f} ms | {1000 * g['safe']:.0f} ms | {g['safe'] / g['fit']:.2f}x | "
            f"{r['memory']['fit']['mb_per_model']:+.2f} | {r['memory']['safe']['mb_per_model']:+.2f} |"
        )
    print(f"\n(per fit: median over {a.rounds} rounds of the mean of {a.block} fits, after {a.warmup} warm-ups; "
          f"fresh-model fits alternated; memory: RssAnon slope over {a.models} fresh models, each runner in its "
          "own process)")  # fmt: skip
    for r in rows:
        c = r["collections"]
        print(f"{r['steps']} steps: {c['collections']} collections for {c['trainers']} fresh trainers, "
              f"{c['seconds']:.2f} s in all")  # fmt: skip
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
