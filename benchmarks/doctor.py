"""The doctor: its overhead on clean scripts, and its verdicts on examples/leaky/ and the corpus (tests/corpus/).

    python benchmarks/doctor.py                 # 5 interleaved runs of each clean script, then every verdict
    python benchmarks/doctor.py --reps 7 --json results/doctor.json
    python benchmarks/doctor.py --reps 0 --only corpus     # verdicts only

Overhead: wall time of `python SCRIPT` against `python -m safetrain doctor SCRIPT`, each in a fresh
process, alternated, medians (TensorFlow's import is in both). Target (issue 13): under 10%.
Verdicts: the causes and warnings the doctor names for each script against the known answer (for the corpus,
the `Known answer:` and `Warnings:` lines of each script's docstring; `retraced` warnings are informational).
Lines (issue 24): for each cause found in a corpus script, whether it names one of the script's `Expected lines:`.
Target: at least 95% of the corpus's causes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
LEAKY = ROOT / "examples" / "leaky"
CORPUS = ROOT / "tests" / "corpus"
EXPECTED = {  # examples/leaky/: (causes, warnings)
    "retracing.py": ({"retracing"}, set()),
    "models_in_loop.py": ({"models_in_loop"}, set()),
    "predict_in_loop.py": ({"predict_in_loop"}, set()),
    "stateful_not_reset.py": (set(), {"stateful_not_reset"}),
    "python_accumulation.py": ({"python_accumulation"}, set()),
    "allocator_growth.py": ({"allocator_growth"}, set()),
    "clean.py": (set(), set()),
}


def known_answer(path: pathlib.Path) -> dict:
    """A corpus script's docstring lines `Report:`, `Known answer:` (causes, or `none`), `Warnings:` and
    `Expected lines:` (the lines of the script a cause may name, any of them; None where not stated)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    fields = {}
    for line in doc.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Report", "Known answer", "Warnings", "Expected lines"):
            fields[key.strip()] = value.strip()

    def names(value: str) -> set[str]:
        return {n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"}

    return dict(
        report=fields.get("Report", ""),
        causes=names(fields["Known answer"]) if "Known answer" in fields else None,
        warnings=names(fields.get("Warnings", "")),
        lines={int(n) for n in names(fields["Expected lines"])} if "Expected lines" in fields else None,
    )


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


def verdicts(which: str) -> list[dict]:
    """Each script of examples/leaky/ and/or the corpus under the doctor, against its known answer."""
    from safetrain import doctor

    scripts = []
    if which in ("all", "leaky"):
        scripts += [(LEAKY / name, causes, warnings, None) for name, (causes, warnings) in EXPECTED.items()]
    if which in ("all", "corpus"):
        for path in sorted(CORPUS.glob("*.py")):
            answer = known_answer(path)
            scripts.append((path, answer["causes"], answer["warnings"], answer["lines"]))
    rows = []
    for path, causes, warnings, *expected_lines in scripts:
        report = doctor.run(str(path), echo=False, timeout=600)
        found = {c["cause"] for c in report["diagnosis"]["causes"]}
        warned = {w["cause"] for w in report["diagnosis"]["warnings"]} - {"retraced"}
        rows.append(
            dict(
                script=str(path.relative_to(ROOT)),
                expected=sorted(causes) + [f"warning {w}" for w in sorted(warnings)],
                found=sorted(found) + [f"warning {w}" for w in sorted(warned)],
                correct=(found, warned) == (causes, warnings),
                wall_s=report["wall_s"],
                evidence=[c["evidence"] for c in report["diagnosis"]["causes"]],
                # Per cause found: whether it names one of the corpus's expected lines (None: none stated).
                lines={
                    c["cause"]: None
                    if not expected_lines[0]
                    else bool(
                        {s["line"] for s in c.get("lines") or () if s["file"].endswith(path.name)} & expected_lines[0]
                    )
                    for c in report["diagnosis"]["causes"]
                },
            )
        )
        print(
            f"  {rows[-1]['script']:60s} {rows[-1]['found']} {'' if rows[-1]['correct'] else 'WRONG'}", file=sys.stderr
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--scripts",
        default="examples/quickstart.py,examples/leaky/clean.py,examples/leaky/clean.py 60",
        help="clean scripts to time (with their arguments), comma-separated, relative to the repository",
    )
    p.add_argument("--only", choices=("all", "leaky", "corpus", "none"), default="all", help="which verdicts to run")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    timing = [overhead(s, a.reps) for s in a.scripts.split(",")] if a.reps > 0 else []
    rows = verdicts(a.only)
    print("| clean script | plain s | under the doctor s | overhead | target |")
    print("|---|---|---|---|---|")
    for t in timing:
        print(
            f"| {t['script']} | {t['median']['plain']:.2f} | {t['median']['doctor']:.2f} | "
            f"{100 * t['overhead']:+.1f}% | < 10% |"
        )
    print(f"\n(medians of {a.reps} alternated runs, each a fresh process; TensorFlow's import is in both)\n")
    print("| script | known answer | doctor's verdict | correct | names an expected line |")
    print("|---|---|---|---|---|")
    for r in rows:
        named = [ok for ok in r["lines"].values() if ok is not None]
        line = "-" if not named else "yes" if all(named) else "NO"
        print(
            f"| {r['script']} | {', '.join(r['expected']) or 'no leak'} | {', '.join(r['found']) or 'no leak'} | "
            f"{'yes' if r['correct'] else 'NO'} | {line} |"
        )
    print(f"\n{sum(r['correct'] for r in rows)} of {len(rows)} correct")
    judged = [ok for r in rows for ok in r["lines"].values() if ok is not None]
    if judged:
        print(
            f"{sum(judged)} of {len(judged)} causes found in the corpus name one of the script's expected lines "
            f"({100 * sum(judged) / len(judged):.0f}%; target >= 95%)"
        )
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(overhead=timing, verdicts=rows), f, indent=1)


if __name__ == "__main__":
    main()
