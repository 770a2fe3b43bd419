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

__all__ = ["run", "diagnose", "format_report", "main", "CAUSES"]

CAUSES = (
    "retracing",
    "models_in_loop",
    "predict_in_loop",
    "stateful_not_reset",
    "python_accumulation",
    "allocator_growth",
)

# Thresholds (MiB). A cause needs both its own evidence and memory that grew with it.
MIN_RETRACES = 3  # traces of one function with distinct signatures
MIN_MODELS = 4  # models constructed
MODEL_SLOPE_MB = 1.0  # RSS per model built
MIN_PREDICTS = 20  # predict calls
PREDICT_SLOPE_MB = 0.02  # RSS per predict call, after the first 5 (Keras 3.15: 0.015-0.05 per call)
PREDICT_GROWTH_MB = 1.0  # ... and in all over those calls
OBJECT_GROWTH_MB = 10.0  # live Python objects grown between the two censuses
EPOCH_SLOPE_MB = 1.0  # RSS per epoch
UNEXPLAINED_GROWTH_MB = 30.0  # RSS growth no other cause accounts for


def _slope(ys: Sequence[float]) -> float:
    """Least-squares slope of `ys` against 0, 1, 2, ... (0.0 with fewer than 2 points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    return sum((i - mean_x) * (y - mean_y) for i, y in enumerate(ys)) / sum((i - mean_x) ** 2 for i in range(n))


def _varied(traces: list[dict]) -> dict[str, list[str]]:
    """Arguments whose description differs across traces: {name: distinct values, in order seen}."""
    names = {n for t in traces for n in t}
    varied = {}
    for n in sorted(names):
        seen: list[str] = []
        for t in traces:
            v = t.get(n, "-")
            if v not in seen:
                seen.append(v)
        if len(seen) > 1:
            varied[n] = seen
    return varied


def _growth_between(events: list[dict], kind: str, **match) -> tuple[list[float], float]:
    selected = [e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]
    rss = [e["rss_mb"] for e in selected]
    return rss, (rss[-1] - rss[0]) if len(rss) > 1 else 0.0


def diagnose(data: dict) -> dict:
    """Causes found in a recorded run (what `instrument.child_main` wrote): a list of {cause, title, evidence, fix}.

    Each cause needs its own evidence (traces, models, predict calls, stateful layers, object census) and,
    except for a stateful layer never reset (a correctness problem that also keeps state alive), memory
    that grew with it. Allocator growth is what is left: RSS that grew while no live objects did.
    """
    events = data["events"]
    causes: list[dict] = []
    rss_all = [e["rss_mb"] for e in events]
    explained_mb = 0.0

    # Retracing: one function traced again and again for new argument shapes.
    for fn in data["functions"]:
        traces = fn["traces"]
        distinct = {json.dumps(t, sort_keys=True) for t in traces}
        if len(traces) < MIN_RETRACES or len(distinct) < MIN_RETRACES:
            continue
        rss, growth = _growth_between(events, "trace", function=fn["name"])
        varied = _varied(traces)
        arg_text = (
            "; ".join(
                f"`{n}` took {len(v)} forms ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})"
                for n, v in list(varied.items())[:3]
            )
            or "its arguments changed"
        )
        per = growth / max(1, len(traces) - 1)
        causes.append(
            dict(
                cause="retracing",
                title=f"retracing: `{fn['name']}` was traced {len(traces)} times",
                evidence=f"{arg_text}; RSS {growth:+.1f} MiB over those traces ({per:+.2f} MiB per trace), and a "
                "traced graph is never freed while its function lives",
                fix="SafeTrainer(model).fit(...)  # one trace: a fixed input signature with the batch and varying "
                "dims as None. For a hand-written step: @tf.function(input_signature=[tf.TensorSpec([None, None, "
                "4], tf.float32), ...]) or @tf.function(reduce_retracing=True)",
                function=fn["name"],
                traces=len(traces),
                varied=varied,
                growth_mb=growth,
            )
        )
        explained_mb += max(growth, 0.0)

    # Models built in a loop.
    models = [e for e in events if e["kind"] == "model"]
    if len(models) >= MIN_MODELS:
        rss = [e["rss_mb"] for e in models]
        per_model = _slope(rss[1:]) if len(rss) > 3 else _slope(rss)
        if per_model > MODEL_SLOPE_MB:
            growth = rss[-1] - rss[0]
            causes.append(
                dict(
                    cause="models_in_loop",
                    title=f"models built in a loop: {len(models)} models, memory never returned",
                    evidence=f"RSS {per_model:+.1f} MiB per model built ({rss[0]:.0f} -> {rss[-1]:.0f} MiB over "
                    f"{len(models)} models); each fit leaves its traced train step and optimizer "
                    "functions alive",
                    fix="trainer = SafeTrainer(build_model)  # a factory per fold/trial: earlier models are released; "
                    "or safetrain.run_isolated(train_one, i) for a fresh process per model",
                    models=len(models),
                    slope_mb_per_model=per_model,
                    growth_mb=growth,
                )
            )
            explained_mb += max(growth, 0.0)

    # predict in a loop.
    predicts = [e for e in events if e["kind"] == "predict"]
    if len(predicts) >= MIN_PREDICTS:
        rss = [e["rss_mb"] for e in predicts[5:]]  # the first calls trace and warm up
        per_call = _slope(rss)
        growth = rss[-1] - rss[0]
        seconds = sum(e.get("seconds", 0.0) for e in predicts) / len(predicts)
        if per_call > PREDICT_SLOPE_MB and growth > PREDICT_GROWTH_MB:
            causes.append(
                dict(
                    cause="predict_in_loop",
                    title=f"predict in a loop: {len(predicts)} calls of {predicts[0].get('api', 'predict')}",
                    evidence=f"RSS {per_call:+.3f} MiB per call after the first 5 ({growth:+.1f} MiB over "
                    f"{len(predicts) - 5} calls, not returned during the run), {seconds * 1000:.0f} ms per call: "
                    "each predict builds a new input pipeline, iterator and callbacks for one small input",
                    fix="y = model(x, training=False)  # for small inputs in a loop: no pipeline per call; or collect "
                    "the inputs and predict once (SafeTrainer(model).predict(all_x): one trace, one pipeline)",
                    calls=len(predicts),
                    slope_mb_per_call=per_call,
                    growth_mb=growth,
                )
            )
            explained_mb += max(growth, 0.0)

    # Stateful layers never reset.
    for key, entry in data["stateful"].items():
        if entry["epochs"] >= 2 and entry["resets"] == 0:
            causes.append(
                dict(
                    cause="stateful_not_reset",
                    title=f"stateful layer never reset: {entry['class']} `{key}`",
                    evidence=f"it carried its state across {entry['epochs']} epochs and reset_state() was never "
                    "called: every epoch starts from the last batch of the previous one",
                    fix="SafeTrainer(model, policies=[safetrain.ResetStates()])  # or every=N batches",
                    layer=key,
                    epochs=entry["epochs"],
                )
            )

    # Python-side accumulation: live objects that grew between the two censuses.
    first, last = data["census"].get("first"), data["census"].get("last")
    object_growth_mb = 0.0
    if first and last:
        grew = []
        for name, (count, size) in last["stats"].items():
            c0, s0 = first["stats"].get(name, (0, 0))
            if size - s0 > 0:
                grew.append((size - s0, count - c0, name))
        grew.sort(reverse=True)
        object_growth_mb = sum(g[0] for g in grew) / 2**20
        top = [g for g in grew if g[0] / 2**20 >= 1.0][:4]
        rss_growth = last["rss_mb"] - first["rss_mb"]
        # Objects must account for much of the growth: traced graphs and models also leave dicts and lists.
        if object_growth_mb > OBJECT_GROWTH_MB and top and object_growth_mb >= 0.5 * rss_growth:
            causes.append(
                dict(
                    cause="python_accumulation",
                    title="Python-side accumulation: live objects keep growing",
                    evidence="grew between the first epoch and the end: "
                    + ", ".join(f"{name} {count:+d} objects ({size / 2**20:+.1f} MiB)" for size, count, name in top)
                    + f"; {object_growth_mb:+.1f} MiB of live objects in all",
                    fix="keep numbers, not tensors or arrays, in callbacks and lists (float(logs['loss'])); "
                    "SafeTrainer(model, policies=[safetrain.LeakDetector()]) names the types that grow",
                    types=[name for _, _, name in top],
                    growth_mb=object_growth_mb,
                )
            )
            explained_mb += object_growth_mb

    # Allocator growth: RSS grew, and neither live objects nor any cause above accounts for it.
    epochs = [e for e in events if e["kind"] == "epoch"]
    epoch_slope = _slope([e["rss_mb"] for e in epochs[1:]]) if len(epochs) > 3 else 0.0
    total = (max(rss_all[len(rss_all) // 3 :]) - rss_all[min(len(rss_all) - 1, len(rss_all) // 3)]) if rss_all else 0
    # The baseline: after the first epoch (the first census), else at the first model, trace, fit or predict
    # (after the imports, which are not a leak).
    started = [e["rss_mb"] for e in events if e["kind"] in ("model", "trace", "fit_begin", "predict", "epoch")]
    baseline = first["rss_mb"] if first else (started[0] if started else (rss_all[0] if rss_all else 0.0))
    end_rss = last["rss_mb"] if last else (rss_all[-1] if rss_all else 0.0)
    unexplained = (end_rss - baseline) - explained_mb
    if (
        not any(c["cause"] in ("retracing", "models_in_loop", "predict_in_loop") for c in causes)
        and unexplained > UNEXPLAINED_GROWTH_MB
        and (epoch_slope > EPOCH_SLOPE_MB or len(epochs) <= 3)
        and object_growth_mb < 0.25 * (end_rss - baseline)
    ):
        causes.append(
            dict(
                cause="allocator_growth",
                title="allocator growth with no live-object growth",
                evidence=f"RSS {end_rss - baseline:+.1f} MiB after the first epoch ({epoch_slope:+.2f} MiB per epoch) "
                f"while live Python objects grew {object_growth_mb:+.1f} MiB and no traces or models "
                "piled up: memory freed inside the process but kept by the allocator (or native code)",
                fix="SafeTrainer(model, policies=[safetrain.TrimMalloc()])  # malloc_trim after each epoch; or "
                "MALLOC_ARENA_MAX=2, or safetrain.run_isolated(...) for work whose memory must go back",
                growth_mb=end_rss - baseline,
                slope_mb_per_epoch=epoch_slope,
            )
        )

    return dict(
        causes=causes,
        leak=bool(causes),
        rss_start_mb=rss_all[0] if rss_all else None,
        rss_baseline_mb=baseline,
        censuses=len(data["census"]),
        rss_end_mb=end_rss,
        rss_peak_mb=max(rss_all) if rss_all else None,
        epoch_slope_mb=epoch_slope,
        object_growth_mb=object_growth_mb,
        total_growth_mb=total,
        traces={fn["name"]: len(fn["traces"]) for fn in data["functions"]},
        counts=data["counts"],
    )


def format_report(script: str, data: dict, diagnosis: dict) -> str:
    lines = [f"safetrain doctor: {script}", ""]
    c = diagnosis["counts"]
    lines.append(
        f"ran {data['wall_s']:.1f} s, exit code {data['exit_code']}; {c['fits']} fit call(s), "
        f"{c['epochs']} epochs, {c['models']} model(s) built, {c['predicts']} predict call(s)"
    )
    if diagnosis["rss_start_mb"] is not None:
        parts = [
            f"RSS {diagnosis['rss_start_mb']:.0f} MiB at start, {diagnosis['rss_baseline_mb']:.0f} once "
            f"training began, {diagnosis['rss_end_mb']:.0f} at the end (peak {diagnosis['rss_peak_mb']:.0f})"
        ]
        if c["epochs"] > 3:
            parts.append(f"{diagnosis['epoch_slope_mb']:+.2f} MiB per epoch")
        if diagnosis["censuses"] == 2:
            parts.append(f"live Python objects {diagnosis['object_growth_mb']:+.1f} MiB")
        lines.append("; ".join(parts))
    retraced = {k: v for k, v in diagnosis["traces"].items() if v > 1}
    if retraced:
        lines.append(
            "traced more than once: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(retraced.items(), key=lambda kv: -kv[1])[:6])
        )
    if data.get("error"):
        lines.append(f"the script failed: {data['error']}")
    lines.append("")
    if not diagnosis["causes"]:
        lines.append("no leak found: memory did not grow with epochs, traces, models or predict calls.")
    for i, cause in enumerate(diagnosis["causes"], 1):
        lines.append(f"{i}. {cause['title']}")
        lines.append(f"   evidence: {cause['evidence']}")
        lines.append(f"   fix:      {cause['fix']}")
    return "\n".join(lines)


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
        census_seconds={k: v["seconds"] for k, v in data["census"].items()},
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
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when any cause is found (for CI)")
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
    if a.json:
        print(f"\nreport: {a.json}")
    if a.plot:
        print(f"plot:   {a.plot}")
    if report["exit_code"]:
        return int(report["exit_code"])
    return 1 if a.fail_on_leak and report["diagnosis"]["leak"] else 0
