"""What each of safetrain's fixes for models trained in a loop is worth (scenario c of memory.py).

    python benchmarks/loop_fixes.py          # runs every variant in its own process

30 fresh models: build (factory), fit 1 epoch, evaluate, predict, `del`, `gc.collect()`; RSS slope per model
after a 3-model warm-up, and the FuncGraph / AtomicFunction objects still alive at the end. Variants switch
safetrain's fixes off by patching them out (the optimizer is always built eagerly):
    none       no gradient-registry cleanup, no kernel-cache clearing
    registry   + the gradient-registry entries of each trace removed
    all        + the eager kernel cache cleared with the paced collection when a new trainer starts (reclaim.py):
               safetrain as shipped
"""

import collections
import gc
import os
import subprocess
import sys

VARIANTS = ["none", "registry", "all"]


def child(mode: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import safetrain.reclaim as reclaim
    import safetrain.steps as steps
    from safetrain import SafeTrainer, memory

    if mode == "none":
        steps.CompiledStep._release_gradient_entries = lambda self, before: None
    if mode in ("none", "registry"):
        reclaim.on_new_trainer = lambda trainer: None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype("float32")
    y = x[:, :4].sum(axis=1, keepdims=True)

    def build():
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

    values = []
    for _ in range(30):
        trainer = SafeTrainer(build)
        trainer.fit(x, y, batch_size=64, epochs=1, verbose=0)
        trainer.evaluate(x, y, verbose=0)
        trainer.predict(x, verbose=0)
        del trainer
        gc.collect()
        values.append(memory.rss_mb())
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    print(
        f"| {mode} | {memory.slope(values[3:]):+.3f} | {values[-1] - values[0]:+.1f} | {counts['FuncGraph']} | "
        f"{counts['AtomicFunction']} |",
        flush=True,
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    print("| variant | slope MiB/model | total MiB | FuncGraph left | AtomicFunction left |\n|---|---|---|---|---|")
    for mode in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        rows = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
        print(rows[-1] if rows else f"| {mode} | failed: {out.stderr[-500:]} |", flush=True)


if __name__ == "__main__":
    main()
