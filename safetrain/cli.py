"""Command line: `python -m safetrain demo`, `python -m safetrain doctor script.py` and
`python -m safetrain plan script.py` (also the `safetrain` console script)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "demo"]


def _synthetic_regression(n: int, d: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    w = rng.standard_normal((d, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def _retracing_contrast(lengths: int) -> dict:
    """The same LSTM trained on `lengths` different sequence lengths: a plain tf.function vs SafeTrainer."""
    import keras
    import numpy as np
    import tensorflow as tf

    from safetrain import SafeTrainer, memory

    rng = np.random.default_rng(0)
    batches = [
        (rng.standard_normal((8, n, 4)).astype("float32"), rng.standard_normal((8, 1)).astype("float32"))
        for n in range(10, 10 + lengths)
    ]

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(16), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    model = build()
    model.optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    before = memory.rss_mb()
    for xb, yb in batches:
        step(xb, yb)
    plain = dict(traces=step.experimental_get_tracing_count(), growth=memory.rss_mb() - before)

    trainer = SafeTrainer(build())
    before = memory.rss_mb()
    trainer.fit((b for b in batches), epochs=1, verbose=0)
    safe = dict(traces=trainer.trace_counts["train"], growth=memory.rss_mb() - before)
    return dict(plain=plain, safe=safe)


def demo(
    epochs: int = 8,
    samples: int = 20_000,
    lengths: int = 40,
    verbose: int = 2,
    plot: str | None = None,
    models: int = 12,
) -> int:
    """Train a small MLP on built-in synthetic data with SafeTrainer; print memory and trace counts."""
    import keras

    from safetrain import SafeTrainer

    t0 = time.perf_counter()
    x, y = _synthetic_regression(samples, 32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    trainer = SafeTrainer(model)
    print(f"safetrain demo: MLP on {samples} synthetic samples, {epochs} epochs, batch 32\n")
    history = trainer.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.1, verbose=verbose)
    print(f"\n{'epoch':>5} {'loss':>9} {'val_loss':>9} {'rss_mb':>9}  traces")
    for s, loss, val in zip(trainer.memory, history.history["loss"], history.history["val_loss"]):
        print(f"{s.epoch + 1:>5} {loss:>9.4f} {val:>9.4f} {s.rss_mb:>9.1f}  {s.traces}")
    print(
        f"\nRSS slope: {trainer.memory.slope():+.3f} MiB/epoch (after a 3-epoch warm-up); "
        f"trace counts: {trainer.trace_counts}"
    )
    if lengths:
        contrast = _retracing_contrast(lengths)
        print(f"\nVariable-length sequences ({lengths} different lengths, LSTM):")
        print(
            f"  plain @tf.function step : {contrast['plain']['traces']:>3} traces, "
            f"RSS {contrast['plain']['growth']:+.1f} MiB"
        )
        print(
            f"  SafeTrainer.fit          : {contrast['safe']['traces']:>3} trace,  "
            f"RSS {contrast['safe']['growth']:+.1f} MiB"
        )
    if plot:
        from safetrain.plots import plot_side_by_side

        loop = _models_in_a_loop(models)
        print(f"\n{models} fresh models trained in a loop (1 epoch each):")
        for name, run in loop.items():
            print(
                f"  {name:<12}: RSS {run['rss'][0]:.0f} -> {run['rss'][-1]:.0f} MiB, {run['slope']:+.2f} MiB per model"
            )
        xs = list(range(1, models + 1))
        plot_side_by_side(
            [(f"{name}: {run['slope']:+.2f} MiB per model", xs, run["rss"]) for name, run in loop.items()],
            plot,
            xlabel="models trained",
            suptitle="A fresh model per fold or trial: model.fit vs SafeTrainer(factory)",
        )
        print(f"plot: {plot}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return 0


def _models_in_a_loop(models: int) -> dict:
    """RSS after each of `models` fresh models trained with model.fit, then with SafeTrainer (a factory)."""
    import keras
    import numpy as np

    from safetrain import SafeTrainer, memory

    x, y = _synthetic_regression(512, 16)

    def build():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    runs = {}
    for name in ("model.fit", "SafeTrainer"):
        rss = []
        for i in range(models):
            keras.utils.set_random_seed(i)
            if name == "model.fit":
                build().fit(x, y, batch_size=64, epochs=1, verbose=0)
            else:
                SafeTrainer(build).fit(x, y, batch_size=64, epochs=1, verbose=0)
            rss.append(memory.rss_mb())
        runs[name] = rss
    return {k: dict(rss=v, slope=float(memory.slope(v[3:]) if len(v) > 5 else np.nan)) for k, v in runs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # its own parser: everything after the script belongs to the script
        from safetrain.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["plan"]:  # likewise: the script's arguments follow it
        from safetrain.plan_script import main as plan_main

        return plan_main(argv[1:])
    # The demo is our own program: keep TensorFlow's start-up INFO lines out of its output (importing the
    # library itself leaves the environment alone).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="safetrain", description="Memory-safe training for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "doctor", help="run a training script unmodified and diagnose why its memory grows (safetrain doctor -h)"
    )
    sub.add_parser(
        "plan",
        help="run a training script up to its first fit and print that fit's memory plan, untrained "
        "(safetrain plan -h)",
    )
    p = sub.add_parser("demo", help="train a small model on synthetic data; print memory and trace counts")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--lengths", type=int, default=40, help="sequence lengths in the retracing contrast (0 to skip it)")
    p.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2))
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="also train --models fresh models in a loop with model.fit and with SafeTrainer and write "
        "a PNG of memory after each, side by side",
    )
    p.add_argument("--models", type=int, default=12, help="models per runner for --plot (default 12)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.plot:
            from safetrain.plots import require_matplotlib

            require_matplotlib()
        if args.models < 6:
            parser.error("--models must be at least 6 (the slope is fitted after 3 warm-up models)")
        return demo(
            epochs=args.epochs,
            samples=args.samples,
            lengths=args.lengths,
            verbose=args.verbose,
            plot=args.plot,
            models=args.models,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
