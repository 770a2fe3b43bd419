"""SIGTERM at random steps: the time from the signal to the exit, the step saved, and the resumed run.

    python benchmarks/preemption.py                   # 10 random signal points, chunked and step by step
    python benchmarks/preemption.py --trials 3 --json results/preemption.json

Each trial runs tests/scripts/preempted_run.py (an MLP with Dropout on 20,000 shuffled rows, batches of 32, 4
epochs, `Checkpoint` every epoch) in a fresh process, sends it SIGTERM at a random time in its training
(uniform over `--window` seconds after training began), and measures the time until the process exited. The
step the signal landed on is read from the run's own timeline of optimizer iterations (sampled every 2 ms);
the checkpoint it wrote must be of that step or a later one. The same command is then run again: it must
resume and end with the History and weights of a run never stopped (bit-identical). "chunked" is the default
fit (many steps per compiled call); "step by step" adds a callback with a batch hook (one step per call).

Targets (issue 23): checkpoint at or after the signal's step, exit within 5 s, resume bit-identical; 10/10.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from scripts import preempt  # noqa: E402


def trial(folder: str, after: float, per_step: bool, reference: dict) -> dict:
    env = {"PER_STEP": "1"} if per_step else {}
    stopped = preempt.run(folder, env, signum=signal.SIGTERM, after=after)
    out = stopped.get("out", {})
    saved = out.get("global_step")
    resumed = preempt.run(folder, env)
    again = resumed.get("out", {})
    identical = (
        resumed["rc"] == 0
        and again.get("history") == reference["history"]
        and again.get("weights") == reference["weights"]
    )
    return dict(
        after_s=after,
        rc=stopped["rc"],
        exit_s=stopped["exit_s"],
        step_at_signal=stopped["step_at_signal"],
        saved_step=saved,
        counted=saved is not None and saved == out.get("iterations"),
        checkpoint=os.path.basename(out.get("checkpoint") or ""),
        identical=identical,
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--window", type=float, default=1.5, help="signal within this many seconds of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="chunked,step")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = preempt.run(os.path.join(tmp, "reference"), {"NO_CHECKPOINT": "1"})["out"]
        for mode in a.modes.split(","):
            for i in range(a.trials):
                r = trial(os.path.join(tmp, f"{mode}{i}"), rng.uniform(0.05, a.window), mode == "step", reference)
                r["mode"] = mode
                rows.append(r)
                ok = (
                    r["rc"] == 143 and r["counted"] and r["identical"] and (r["saved_step"] or 0) >= r["step_at_signal"]
                )
                print(
                    f"{mode} {i}: signal at {r['after_s']:.2f} s (step {r['step_at_signal']}), saved step "
                    f"{r['saved_step']}, exit {r['exit_s']:.2f} s, rc {r['rc']}, resumed identical {r['identical']}"
                    f"{'' if ok else '  <-- NOT OK'}",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(rows))
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| fit | trials | exit 143 | saved at or after the signal's step | steps counted | exit s: median (max) "
        "| within 5 s | resumed bit-identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        n = len(rs)
        times = [r["exit_s"] for r in rs]
        lines.append(
            f"| {'chunked (default)' if mode == 'chunked' else 'step by step (batch callback)'} | {n} | "
            f"{sum(r['rc'] == 143 for r in rs)}/{n} | "
            f"{sum((r['saved_step'] or 0) >= r['step_at_signal'] for r in rs)}/{n} | "
            f"{sum(r['counted'] for r in rs)}/{n} | "
            f"{statistics.median(times):.2f} ({max(times):.2f}) | {sum(t <= 5 for t in times)}/{n} | "
            f"{sum(r['identical'] for r in rs)}/{n} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
