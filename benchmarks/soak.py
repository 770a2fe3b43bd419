"""Soak test: a long run with re-hydration and checkpoints, checkpoint overhead, and kill/resume trials.

    python benchmarks/soak.py                          # 300 epochs, 5 overhead runs, 10 kill trials
    python benchmarks/soak.py --epochs 60 --trials 3   # quicker

1. Soak: a small MLP for `--epochs` epochs with ClearSession(every_n_epochs=10) and Checkpoint every epoch
   (keep=2): RSS slope per epoch (after 10 warm-up epochs), the most checkpoint folders ever on disk.
   Target: slope under 0.1 MiB/epoch; folders bounded by keep.
2. Overhead: the ~1M-parameter MLP, epochs with and without Checkpoint(every_n_epochs=1), interleaved runs;
   what checkpointing adds per epoch, as a share of an epoch. Target: under 5%.
3. Kill/resume: `--trials` runs of tests/scripts/checkpointed_run.py, each killed with SIGKILL at a random
   moment of its training (every third one half-way through its 2nd to 6th checkpoint write), restarted
   until it finishes, and compared with an uninterrupted run. Target: every trial bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from scripts.killer import run_script  # noqa: E402  (the same kill-and-restart runner the tests use)


def soak(epochs: int, workdir: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from safetrain import Checkpoint, ClearSession, Policy, SafeTrainer, checkpoint

    class CountFolders(Policy):
        def __init__(self, directory):
            self.directory, self.most = directory, 0

        def on_epoch_end(self, trainer, epoch, logs, sample):
            self.most = max(self.most, len(checkpoint.list_checkpoints(self.directory)))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype("float32")
    y = x[:, :3].sum(axis=1, keepdims=True)

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dropout(0.1),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        m.compile(optimizer="adam", loss="mse", metrics=["mae"])
        return m

    directory = os.path.join(workdir, "soak")
    ckpt = Checkpoint(directory, every_n_epochs=1, keep=2)
    folders = CountFolders(directory)
    trainer = SafeTrainer(build, policies=[ClearSession(every_n_epochs=10), ckpt, folders])
    t0 = time.perf_counter()
    trainer.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    rss = trainer.memory.series("rss_mb")
    return dict(
        epochs=epochs,
        seconds=time.perf_counter() - t0,
        rehydrations=trainer.rehydrations,
        slope_mb_per_epoch=trainer.memory.slope(skip=10),
        rss_first=rss[0],
        rss_last=rss[-1],
        most_folders=folders.most,
        checkpoints_written=len(ckpt.written),
        checkpoint_seconds_per_epoch=ckpt.seconds / epochs,
        rss=rss,
    )


def overhead(runs: int, epochs: int, workdir: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from safetrain import Checkpoint, SafeTrainer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6400, 512)).astype("float32")
    y = x[:, :4].sum(axis=1, keepdims=True)

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((512,)),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(512, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        m.compile(optimizer="adam", loss="mse")
        return m

    plain, with_ckpt, save_times = [], [], []
    params = None
    for run in range(runs):
        for variant in ("plain", "ckpt") if run % 2 == 0 else ("ckpt", "plain"):
            policies = []
            if variant == "ckpt":
                directory = os.path.join(workdir, f"overhead-{run}")
                policies = [Checkpoint(directory, every_n_epochs=1, keep=2)]
            trainer = SafeTrainer(build(), policies=policies)
            params = trainer.model.count_params()
            # The checkpoint is written after on_epoch_end, so time whole epochs: end of one to end of next.
            ends = []

            timer = keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs, ends=ends: ends.append(time.perf_counter())
            )
            trainer.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[timer])
            t_epochs = [b - a for a, b in zip(ends[1:-1], ends[2:])]  # drop the tracing epoch
            (with_ckpt if variant == "ckpt" else plain).append(statistics.median(t_epochs))
            if variant == "ckpt":
                save_times.append(policies[0].seconds / epochs)
    epoch_plain, epoch_ckpt = statistics.median(plain), statistics.median(with_ckpt)
    save = statistics.median(save_times)
    return dict(
        params=params,
        epoch_seconds=epoch_plain,
        epoch_seconds_with_checkpoint=epoch_ckpt,
        save_seconds=save,
        save_share=save / epoch_plain,
        epoch_share=(epoch_ckpt - epoch_plain) / epoch_plain,
        runs=runs,
    )


def trials(count: int, workdir: str, seed: int = 0) -> dict:
    ref_dir = os.path.join(workdir, "reference")
    os.makedirs(ref_dir)
    assert run_script(os.path.join(ref_dir, "out.json"), os.path.join(ref_dir, "ckpt"), {"NO_CHECKPOINT": "1"}) == 0
    with open(os.path.join(ref_dir, "out.json")) as f:
        reference = json.load(f)
    rng = random.Random(seed)
    outcomes = []
    for i in range(count):
        tdir = os.path.join(workdir, f"trial-{i}")
        os.makedirs(tdir)
        out, ckpt_dir = os.path.join(tdir, "out.json"), os.path.join(tdir, "ckpt")
        mid_write = i % 3 == 2
        env = {"SLOW_CHECKPOINT_WRITE": "0.3"} if mid_write else {}
        kill = dict(kill_at_write=rng.randint(2, 6)) if mid_write else dict(kill_after=rng.uniform(0.05, 1.1))
        codes = [run_script(out, ckpt_dir, env, **kill)]
        while codes[-1] != 0 and len(codes) < 10:
            codes.append(run_script(out, ckpt_dir, env))
        result = None
        if codes[-1] == 0:
            with open(out) as f:
                result = json.load(f)
        identical = result is not None and all(
            result[k] == reference[k] for k in ("history", "epochs", "weights", "iterations")
        )
        outcomes.append(
            dict(
                trial=i,
                kind="mid-write" if mid_write else "random",
                exit_codes=codes,
                killed=codes[0] == -signal.SIGKILL,
                identical=identical,
            )
        )
        print(
            f"  trial {i}: {outcomes[-1]['kind']}, exit codes {codes}, bit-identical: {identical}",
            file=sys.stderr,
            flush=True,
        )
    return dict(
        trials=len(outcomes),
        killed=sum(o["killed"] for o in outcomes),
        identical=sum(o["identical"] for o in outcomes),
        outcomes=outcomes,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--overhead-runs", type=int, default=5)
    p.add_argument("--overhead-epochs", type=int, default=6)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--json", default=os.path.join("results", "soak.json"))
    a = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="safetrain-soak-")
    try:
        s = soak(a.epochs, workdir)
        print(f"  soak done in {s['seconds']:.0f}s", file=sys.stderr, flush=True)
        o = overhead(a.overhead_runs, a.overhead_epochs, workdir) if a.overhead_runs else None
        t = trials(a.trials, workdir) if a.trials else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [
        "| measure | value | target |",
        "|---|---|---|",
        f"| soak: {s['epochs']} epochs, ClearSession(10) + Checkpoint every epoch | {s['seconds']:.0f} s, "
        f"{s['rehydrations']} re-hydrations, {s['checkpoints_written']} checkpoints | |",
        f"| soak: RSS slope (after 10 epochs) | {s['slope_mb_per_epoch']:+.4f} MiB/epoch "
        f"({s['rss_first']:.0f} -> {s['rss_last']:.0f} MiB) | < 0.1 |",
        f"| soak: most checkpoint folders on disk | {s['most_folders']} | <= keep = 2 |",
    ]
    if o:
        lines += [
            f"| checkpoint of the {o['params']:,}-parameter MLP: time in Checkpoint.save | "
            f"{1000 * o['save_seconds']:.0f} ms = {100 * o['save_share']:.1f}% of a {o['epoch_seconds']:.2f} s "
            f"epoch | < 5% |",
            f"| same, epoch time with vs without checkpoints (medians of {o['runs']} runs each) | "
            f"{o['epoch_seconds_with_checkpoint']:.3f} s vs {o['epoch_seconds']:.3f} s "
            f"({100 * o['epoch_share']:+.1f}%, noise included) | |",
        ]
    if t:
        lines.append(
            f"| kill/resume trials (SIGKILL; {sum(o_['kind'] == 'mid-write' for o_ in t['outcomes'])} "
            f"of them mid-checkpoint-write) | {t['identical']} of {t['trials']} bit-identical "
            f"({t['killed']} actually killed before finishing) | all |"
        )
    print("\n".join(lines))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(soak=s, overhead=o, trials=t), f)


if __name__ == "__main__":
    main()
