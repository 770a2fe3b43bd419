"""Models trained in a loop, written the ways users write it: memory per model and time per fold.

    python benchmarks/loops.py                                  # every pattern, widths 64,128,256, 60 models
    python benchmarks/loops.py --patterns gc,plain --widths 128 --models 40 --json results/loops.json

Issue 21's loop: for each fold a fresh Dense 32-w-w-1 model (Adam, 6000 rows of 32 features, batch 64),
`fit(epochs=1, validation_split=0.2)`, then `evaluate` and `predict`; anonymous memory (RssAnon) after each
fold; each (pattern, width, runner) in a fresh process. Patterns (what the loop does between folds):

    plain           nothing
    gc              gc.collect() (the most common advice)
    clear_session   keras.backend.clear_session()
    both            gc.collect() and clear_session()
    install         model.fit under safetrain.install(), nothing between folds
    per_fit         one model; a new SafeTrainer(model).fit(epochs=1) per fold ("one more epoch")

Runners: `safe` (SafeTrainer(model).fit/evaluate/predict; `install` and `per_fit` are SafeTrainer by
construction) and `fit` (model.fit, the same loop, for comparison, in a process that never imports the
trainer: nothing frozen). Reported per run: slope of RssAnon over
folds 20-60 (MiB per model), its range there (max - min, MiB), median seconds per fold, and SafeTrainer's
`reclaim.stats()` (collections, seconds collecting, kernel-cache clears).
Targets (issue 21): every pattern, SafeTrainer: slope under 0.1 MiB/model and range at most 24 MiB, widths 64-256.
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

PATTERNS = ("plain", "gc", "clear_session", "both", "install", "per_fit")
FROM, TO = 20, 60  # folds the slope and range are taken over (the first ones trace and warm up)


def child(pattern: str, runner: str, width: int, models: int) -> dict:
    """In a fresh process: RssAnon after each fold, seconds per fold, reclaim stats."""
    import gc

    import keras
    import numpy as np

    from safetrain.diagnostics import read_memory  # does not import the trainer (nor freeze: reclaim.py)

    if runner == "safe" or pattern in ("install", "per_fit"):
        import safetrain
        from safetrain import SafeTrainer, reclaim

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, 32)).astype("float32")
    y = (x[:, :1] * 2.0 + 0.1 * rng.standard_normal((6000, 1))).astype("float32")

    def build():
        model = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(width, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
        return model

    if pattern == "install":
        safetrain.install()
    shared = build() if pattern == "per_fit" else None
    series, seconds = [], []
    for _ in range(models):
        t0 = time.perf_counter()
        if pattern == "per_fit":
            SafeTrainer(shared).fit(x, y, batch_size=64, epochs=1, validation_split=0.2, verbose=0)
        else:
            model = build()
            if runner == "safe" and pattern != "install":
                trainer = SafeTrainer(model)
                trainer.fit(x, y, batch_size=64, epochs=1, validation_split=0.2, verbose=0)
                trainer.evaluate(x, y, batch_size=64, verbose=0)
                trainer.predict(x, batch_size=64, verbose=0)
                del trainer
            else:
                model.fit(x, y, batch_size=64, epochs=1, validation_split=0.2, verbose=0)
                model.evaluate(x, y, batch_size=64, verbose=0)
                model.predict(x, batch_size=64, verbose=0)
            del model
            if pattern in ("gc", "both"):
                gc.collect()
            if pattern in ("clear_session", "both"):
                keras.backend.clear_session()
        seconds.append(time.perf_counter() - t0)
        series.append(read_memory()[1])
    stats = reclaim.stats() if runner == "safe" else {}
    return dict(series=series, seconds=seconds, reclaim=stats)


def run(pattern: str, runner: str, width: int, models: int) -> dict:
    """One (pattern, runner, width) in a fresh process: slope and range over folds FROM-TO, time per fold."""
    from safetrain.diagnostics import slope

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", pattern, runner, str(width), str(models)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    window = r["series"][min(FROM, len(r["series"]) // 3) : TO]
    return dict(
        pattern=pattern,
        runner=runner,
        width=width,
        models=models,
        slope=slope(window),
        range=max(window) - min(window),
        fold_s=statistics.median(r["seconds"][3:]),
        **r,
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| pattern | width | runner | slope (MiB/model) | range (MiB) | s per fold | collections | s collecting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["reclaim"]
        coll = f"{c['collections']}/{c['trainers']}" if r["runner"] == "safe" else "-"
        secs = f"{c['collect_s']:.2f}" if r["runner"] == "safe" else "-"
        lines.append(
            f"| {r['pattern']} | {r['width']} | {r['runner']} | {r['slope']:+.3f} | {r['range']:.1f} | "
            f"{r['fold_s']:.3f} | {coll} | {secs} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--widths", default="64,128,256")
    p.add_argument("--runners", default="safe", help="safe, fit or both (comma-separated)")
    p.add_argument("--models", type=int, default=60)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    for width in (int(w) for w in a.widths.split(",")):
        for pattern in a.patterns.split(","):
            if pattern not in PATTERNS:
                raise SystemExit(f"--patterns: unknown pattern {pattern!r}; expected some of {PATTERNS}")
            for runner in a.runners.split(","):
                if runner == "fit" and pattern in ("install", "per_fit"):
                    continue  # SafeTrainer by construction
                rows.append(run(pattern, runner, width, a.models))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n(RssAnon after each fold; slope and range over folds {FROM}-{TO}; each row a fresh process)")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
