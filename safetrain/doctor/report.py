"""The doctor's parent side: the diagnosis rules and their thresholds, the text report, `run` and the CLI.

>>> report = run("examples/leaky/retracing.py", echo=False)   # the script in a child process
>>> report["diagnosis"]["causes"][0]["cause"], report["text"].splitlines()[0]
('retracing', 'safetrain doctor: examples/leaky/retracing.py')
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

# The rules, their thresholds and fix texts live in `safetrain.diagnostics`, shared with `LeakDetector`.
from safetrain.diagnostics import CAUSES, WARNINGS
from safetrain.diagnostics import diagnose as diagnose_record

__all__ = ["run", "diagnose", "format_report", "main", "CAUSES", "WARNINGS"]


def diagnose(data: dict) -> dict:
    """Causes and warnings found in a recorded run (what `instrument.child_main` wrote), with the readings the
    report prints: memory at the start, after warm-up (the baseline), at the end and at its peak."""
    diagnosis = diagnose_record(data)
    diagnosis.update(
        mem_start_mb=diagnosis["start_mb"],
        mem_baseline_mb=diagnosis["baseline_mb"],
        mem_end_mb=diagnosis["end_mb"],
        mem_peak_mb=diagnosis["peak_mb"],
        censuses=len(data["census"]),
        traces={fn["name"]: len(fn["traces"]) for fn in data["functions"]},
        counts=data["counts"],
    )
    return diagnosis


def format_report(script: str, data: dict, diagnosis: dict) -> str:
    """The text `main` prints: what ran, memory at the start, after warm-up and at the end, then each cause
    (a leak: memory grew with it) and each warning (a problem that does not grow memory)."""
    lines = [f"safetrain doctor: {script}", ""]
    c = diagnosis["counts"]
    ran = [f"{c.get('fits', 0)} fit call(s)", f"{c.get('epochs', 0)} epochs", f"{c.get('models', 0)} model(s) built"]
    ran += [f"{c[k]} {label}" for k, label in _COUNTED if c.get(k)]
    lines.append(f"ran {data['wall_s']:.1f} s, exit code {data['exit_code']}; " + ", ".join(ran))
    kind = "anonymous memory" if diagnosis["memory_key"] == "anon_mb" else "RSS"
    if diagnosis["mem_start_mb"] is not None:
        parts = [
            f"{kind} {diagnosis['mem_start_mb']:.0f} MiB at start, {diagnosis['mem_baseline_mb']:.0f} after warm-up "
            f"({diagnosis['baseline_reason']}), {diagnosis['mem_end_mb']:.0f} at the end (peak "
            f"{diagnosis['mem_peak_mb']:.0f})"
        ]
        if diagnosis["unit"]:
            parts.append(f"{diagnosis['slope_mb_per_unit']:+.2f} MiB per {diagnosis['unit']}")
        if diagnosis["censuses"] == 2:
            parts.append(f"live objects {diagnosis['object_growth_mb']:+.1f} MiB")
        lines.append("; ".join(parts))
    if diagnosis["retraced"]:
        lines.append(
            "traced for more than one signature: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(diagnosis["retraced"].items(), key=lambda kv: -kv[1])[:6])
        )
    if data.get("error"):
        lines.append(f"the script failed: {data['error']}")
    lines.append("")
    if not diagnosis["causes"]:
        lines.append(
            "no leak found: memory did not grow after warm-up with epochs, traces, compiles, models, predict calls, "
            "the data or live objects."
        )
    for i, cause in enumerate(diagnosis["causes"], 1):
        lines.append(f"{i}. {cause['title']}")
        lines.append(f"   evidence: {cause['evidence']}")
        lines.extend(_where_lines(cause))
        lines.append(f"   fix:      {cause['fix']}")
    for warning in diagnosis["warnings"]:
        lines.append(f"warning: {warning['title']}")
        lines.append(f"   evidence: {warning['evidence']}")
        lines.extend(_where_lines(warning))
        lines.append(f"   fix:      {warning['fix']}")
    return "\n".join(lines)


def _where_lines(cause: dict) -> list[str]:
    """`   where:    train.py:42  model = build()   (20 times; constructed)` for each line a cause names."""
    out = []
    for n, site in enumerate(cause.get("lines") or ()):
        notes = [f"{site['count']} times" if site.get("count", 1) > 1 else "", site.get("role") or ""]
        note = "; ".join(x for x in notes if x)
        label = "where:   " if n == 0 else "         "
        out.append(f"   {label} {site['file']}:{site['line']}  {site['source']}" + (f"   ({note})" if note else ""))
    return out


_COUNTED = (
    ("compiles", "compile call(s)"),
    ("predicts", "predict call(s)"),
    ("batches", "*_on_batch call(s)"),
    ("gradients", "eager tape.gradient call(s)"),
    ("calls", "call(s) of the script's tf.functions"),
    ("model_calls", "eager model call(s)"),
)


def run(
    script: str,
    args: Sequence[str] = (),
    *,
    json_path: str | None = None,
    plot_path: str | None = None,
    echo: bool = True,
    env: dict | None = None,
    timeout: float | None = None,
) -> dict:
    """Run `script` with `args` under the doctor in a child process; returns the report (a dict).

    The report has the recorded `events`, `functions` (every traced function with each trace's signature),
    `diagnosis` (causes, each with evidence and fix) and `text` (what `main` prints).

    Example:
        >>> report = run("train.py", ["--epochs", "5"], plot_path="memory.png")
        >>> report["diagnosis"]["leak"]
        False
    """
    if not os.path.isfile(script):
        raise ValueError(f"`script`: no such file: {script!r}")
    with tempfile.TemporaryDirectory(prefix="safetrain_doctor_") as tmp:
        out = os.path.join(tmp, "record.json")
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, "-m", "safetrain.doctor", "--child", out, script, *args]  # doctor/__main__.py
        kwargs: dict[str, Any] = {} if echo else dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = subprocess.run(cmd, env=child_env, timeout=timeout, **kwargs)
        if not os.path.exists(out):
            raise RuntimeError(
                f"the doctor's child process ended (exit {proc.returncode}) without a record; "
                "it was probably killed (out of memory?)"
            )
        with open(out) as f:
            data = json.load(f)
    diagnosis = diagnose(data)
    report = dict(
        script=script,
        args=list(args),
        exit_code=data["exit_code"],
        wall_s=data["wall_s"],
        events=data["events"],
        functions=data["functions"],
        stateful=data["stateful"],
        samples=data.get("samples", []),
        census_seconds={k: v["seconds"] for k, v in data["census"].items()},
        holders=data.get("holders", []),
        diagnosis=diagnosis,
    )
    report["text"] = format_report(script, data, diagnosis)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    if plot_path:
        from safetrain.plots import plot_timeline

        plot_timeline(report, plot_path)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m safetrain doctor [--json F] [--plot F] [--fail-on-leak] script.py [script args]`."""
    p = argparse.ArgumentParser(
        prog="safetrain doctor", description="Run a training script, unmodified, and diagnose why its memory grows."
    )
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--plot", help="write a PNG of memory over time with epochs, model builds and retraces marked")
    p.add_argument(
        "--fail-on-leak",
        action="store_true",
        help="exit 1 when a cause is found, memory that grew (for CI); warnings (a stateful layer never reset, "
        "retracing with memory flat) do not count",
    )
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    a = p.parse_args(argv)
    if a.plot:
        from safetrain.plots import require_matplotlib

        require_matplotlib()
    try:
        report = run(a.script, a.args, json_path=a.json, plot_path=a.plot)
    except ValueError as e:
        p.error(str(e))
    print("\n" + report["text"])
    diagnosis = report["diagnosis"]
    if a.fail_on_leak:
        print(
            f"\n--fail-on-leak: {len(diagnosis['causes'])} cause(s) counted"
            + (f", {len(diagnosis['warnings'])} warning(s) not counted" if diagnosis["warnings"] else "")
        )
    if a.json:
        print(f"\nreport: {a.json}")
    if a.plot:
        print(f"plot:   {a.plot}")
    if report["exit_code"]:
        return int(report["exit_code"])
    return 1 if a.fail_on_leak and report["diagnosis"]["leak"] else 0
