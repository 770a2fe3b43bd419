"""The doctor: its overhead on a clean script, and its verdicts on examples/leaky/.

    python benchmarks/doctor.py                 # 5 interleaved runs of each, then every leaky example
    python benchmarks/doctor.py --reps 7 --json results/doctor.json

Overhead: wall time of `python SCRIPT` against `python -m safetrain doctor SCRIPT`, each in a fresh
process, alternated, medians (TensorFlow's import is in both). Target (issue 6): under 10%.
Verdicts: the causes the doctor names for each script in examples/leaky/ against the known answer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
LEAKY = ROOT / "examples" / "leaky"
EXPECTED = {
    "retracing.py": ["retracing"],
    "models_in_loop.py": ["models_in_loop"],
    "predict_in_loop.py": ["predict_in_loop"],
    "stateful_not_reset.py": ["stateful_not_reset"],
    "python_accumulation.py": ["python_accumulation"],
    "allocator_growth.py": ["allocator_growth"],
    "clean.py": [],
}


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def overhead(command: str, reps: int) -> dict:
    script, *args = command.split()
    script = ROOT / script
    runs: dict[str, list[float]] = {"plain": [], "doctor": []}
    commands = {
        "plain": [sys.executable, str(script), *args],
        "doctor": [sys.executable, "-m", "safetrain", "doctor", str(script), *args],
    }
    for rep in range(reps):
        for name in ("plain", "doctor") if rep % 2 == 0 else ("doctor", "plain"):
            runs[name].append(timed(commands[name]))
            print(f"  rep {rep + 1}/{reps} {name:6s} {runs[name][-1]:6.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return dict(script=command, runs=runs, median=med, overhead=med["doctor"] / med["plain"] - 1)


def verdicts() -> list[dict]:
    from safetrain import doctor

    rows = []
    for name, expected in EXPECTED.items():
        report = doctor.run(str(LEAKY / name), echo=False)
        found = [c["cause"] for c in report["diagnosis"]["causes"]]
        rows.append(
            dict(
                script=name,
                expected=expected,
                found=found,
                correct=found == expected,
                evidence=[c["evidence"] for c in report["diagnosis"]["causes"]],
            )
        )
        print(f"  {name:24s} {found}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--scripts",
        default="examples/quickstart.py,examples/leaky/clean.py,examples/leaky/clean.py 60",
        help="clean scripts to time (with their arguments), comma-separated, relative to the repository",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    timing = [overhead(s, a.reps) for s in a.scripts.split(",")]
    rows = verdicts()
    print("| clean script | plain s | under the doctor s | overhead | target |")
    print("|---|---|---|---|---|")
    for t in timing:
        print(
            f"| {t['script']} | {t['median']['plain']:.2f} | {t['median']['doctor']:.2f} | "
            f"{100 * t['overhead']:+.1f}% | < 10% |"
        )
    print(f"\n(medians of {a.reps} alternated runs, each a fresh process; TensorFlow's import is in both)\n")
    print("| examples/leaky/ | expected | doctor's verdict | correct |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['script']} | {', '.join(r['expected']) or 'no leak'} | {', '.join(r['found']) or 'no leak'} | "
            f"{'yes' if r['correct'] else 'NO'} |"
        )
    print(f"\n{sum(r['correct'] for r in rows)} of {len(rows)} correct")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(overhead=timing, verdicts=rows), f, indent=1)


if __name__ == "__main__":
    main()
