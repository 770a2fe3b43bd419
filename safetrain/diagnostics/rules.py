"""The rules: one per cause of memory growth, each with its thresholds and fix, over a recorded run.

Example:
    >>> diagnose(record)["causes"][0]["title"]
    'retracing: `train_step` was traced 21 times'
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from safetrain.diagnostics.measure import census_growth, slope
from safetrain.diagnostics.sites import describe, events_lines, kept_lines, model_lines

__all__ = ["CAUSES", "WARNINGS", "FIXES", "DATA_TYPES", "diagnose", "retraced"]

CAUSES = (
    "retracing",
    "recompiling",
    "models_in_loop",
    "predict_in_loop",
    "data_copies",
    "python_accumulation",
    "allocator_growth",
)
# Found and reported, but memory does not grow with them: `--fail-on-leak` does not count them.
WARNINGS = ("stateful_not_reset", "retraced")

# Thresholds (MiB unless named otherwise). Every cause needs its own evidence and memory that grew with it,
# measured after warm-up (the baseline).
MIN_RETRACES = 3  # traces of one function with distinct signatures
RETRACE_GROWTH_MB = 10.0  # ... and memory grown over the traces after warm-up
MIN_COMPILES = 4  # compile() calls on one model
COMPILE_SLOPE_MB = 1.0  # memory per compile, from the second on
MIN_MODELS = 4  # models constructed
MODEL_SLOPE_MB = 1.0  # memory per model built, from the second on
MIN_PREDICTS = 25  # predict calls (20 after the first 5: fewer give no slope above the noise)
PREDICT_SLOPE_MB = 0.02  # memory per predict call after the first 5, not held by live objects
PREDICT_GROWTH_MB = 2.0  # ... and in all over those calls
KEPT_OUTPUTS_RATIO = 4.0  # not predict in a loop: the outputs the script keeps per call are this many times that
DATA_MIN_MB = 64.0  # arrays handed to fit / tf.data at least this big ...
DATA_WARMUP_MB = 64.0  # ... and anonymous memory grew by at least one more copy of them beyond this warm-up
OBJECT_GROWTH_MB = 10.0  # live objects (by the bytes they hold) grown between the two censuses
EPOCH_SLOPE_MB = 1.0  # memory per epoch
UNEXPLAINED_GROWTH_MB = 30.0  # growth no other cause accounts for

# Types whose census bytes are data (what a leak of results is made of), not framework structure.
DATA_TYPES = frozenset({"ndarray", "EagerTensor", "bytes", "bytearray", "memmap"})

FIXES = {
    "retracing": "SafeTrainer(model).fit(...)  # one trace: a fixed input signature with the batch and varying dims "
    "as None; RetraceGuard(max_traces=1) makes a retrace an error. For a hand-written step: "
    "@tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32), ...]) or "
    "@tf.function(reduce_retracing=True); pass numbers that change (a learning rate) as tensors or variables",
    "recompiling": "compile once, outside the loop; to start each fold afresh keep the first weights "
    "(w = model.get_weights(); model.set_weights(w)) and reset the optimizer's variables, or "
    "SafeTrainer(build_model) with a factory per fold",
    "models_in_loop": "trainer = SafeTrainer(build_model)  # a factory per fold/trial: earlier models are released "
    "(keras.backend.clear_session() alone is not enough: each traced train step stays in TensorFlow's gradient "
    "registry); or safetrain.run_isolated(train_one, i) for a fresh process per model",
    "predict_in_loop": "y = model(x, training=False)  # for small inputs in a loop: no pipeline per call; or collect "
    "the inputs and predict once (SafeTrainer(model).predict(all_x): one trace, one pipeline)",
    "data_copies": "SafeTrainer(model).fit(x, y)  # arrays are streamed by index, never copied whole; keep one "
    "copy (np.load(path, mmap_mode='r') for data on disk) and give tf.data a generator or indices, not "
    "from_tensor_slices of the whole array",
    "python_accumulation": "keep numbers, not tensors or arrays, in callbacks and lists (float(logs['loss']), "
    "float(loss)); copy what must be kept to a file; SafeTrainer(model, policies=[safetrain.LeakDetector()]) "
    "names the types that grow",
    "allocator_growth": "SafeTrainer(model, policies=[safetrain.TrimMalloc()])  # malloc_trim after each epoch; or "
    "MALLOC_ARENA_MAX=2, or safetrain.run_isolated(...) for work whose memory must go back",
    "stateful_not_reset": "SafeTrainer(model, policies=[safetrain.ResetStates()])  # or every=N batches",
    "retraced": "nothing for memory; for speed, give the function one signature (tensors, not Python values, "
    "for arguments that change)",
}


def _kept_per_call(rec: Mapping[str, Any], predicts: Sequence[Mapping]) -> float | None:
    """MiB per predict call of the arrays predict returned that the script still holds at the end (None when
    nobody looked: no holders recorded)."""
    if "holders" not in rec or not predicts:
        return None
    return sum(h.get("watched_bytes", 0) for h in rec["holders"]) / 2**20 / len(predicts)


def _slope0(values: Sequence[float]) -> float:
    s = slope(values)
    return 0.0 if s != s else s  # NaN -> 0


def _keeps_growing(values: Sequence[float], per_unit: float) -> bool:
    """Whether memory still grows in the second half of `values` (one reading per pass of a loop): a few
    passes of warm-up that step memory up, then flat, give a slope but are not a leak."""
    if len(values) < 4:
        return True
    return _slope0(values[len(values) // 2 :]) >= 0.25 * per_unit


# -- the rules -------------------------------------------------------------------------------------------


class _Run:
    """Readings of one record, as the rules need them: memory at a time, growth after warm-up."""

    def __init__(self, rec: Mapping[str, Any]) -> None:
        self.rec = rec
        self.events: list[dict] = list(rec.get("events", ()))
        samples = list(rec.get("samples", ()))
        points = self.events + samples
        self.key = "anon_mb" if points and all("anon_mb" in p for p in points) else "rss_mb"
        self.readings = sorted(((p["t"], p[self.key]) for p in points), key=lambda r: r[0])
        self.census = rec.get("census", {})
        first = self.census.get("first")
        base = rec.get("baseline") or {}
        started = [e for e in self.events if e["kind"] in ("model", "trace", "fit_begin", "predict", "epoch")]
        if base.get(self.key) is not None:
            self.base_t, self.base_m = base["t"], base[self.key]
        elif first is not None and not base:
            self.base_t, self.base_m = first.get("t", 0.0), first.get(self.key, first.get("rss_mb"))
        else:
            self.base_t = base.get("t", started[0]["t"] if started else 0.0)
            self.base_m = self.at(self.base_t)
        self.base_reason = base.get("reason", "the first census" if first else "the first model, trace or fit")
        end = [e for e in self.events if e["kind"] == "end"]
        self.end_m = end[-1][self.key] if end else (self.readings[-1][1] if self.readings else 0.0)
        self.growth = (self.end_m - self.base_m) if self.readings else 0.0
        # Memory grown between the first census (taken once memory grew after warm-up) and the end.
        self.census_growth = (self.end_m - first.get(self.key, first.get("rss_mb"))) if first else self.growth
        self.epochs = [e for e in self.events if e["kind"] == "epoch"]

    def at(self, t: float) -> float:
        """The last reading at or before `t` (the first reading if none is)."""
        value = self.readings[0][1] if self.readings else 0.0
        for rt, m in self.readings:
            if rt > t:
                break
            value = m
        return value

    def peak_between(self, t0: float, t1: float) -> float:
        inside = [m for t, m in self.readings if t0 < t <= t1]
        return max(inside) if inside else self.at(t0)

    def of(self, kind: str, **match) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


def _effective_traces(fn: Mapping[str, Any]) -> list[dict]:
    """A function's traces less TensorFlow's variable-free second trace (not a retrace: no new signature)."""
    out = []
    for tr in fn.get("traces", ()):
        tr = tr if "args" in tr or "t" in tr else {"args": tr}  # records from before traces carried times
        if not tr.get("lifted"):
            out.append(tr)
    return out


def _varied(traces: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Arguments whose description differs across traces: {name: distinct values, in order seen}."""
    sigs = [t.get("args", {}) for t in traces]
    varied = {}
    for n in sorted({n for s in sigs for n in s}):
        seen: list[str] = []
        for s in sigs:
            v = s.get(n, "-")
            if v not in seen:
                seen.append(v)
        if len(seen) > 1:
            varied[n] = seen
    return varied


def _signatures(traces: Sequence[Mapping[str, Any]]) -> set[str]:
    """The distinct argument signatures among `traces`."""
    return {json.dumps(t.get("args", {}), sort_keys=True) for t in traces}


def retraced(rec: Mapping[str, Any]) -> dict[str, int]:
    """Functions traced for more than one signature: {name: traces}, TensorFlow's variable-free retrace left out."""
    out: dict[str, int] = {}
    for fn in rec.get("functions", ()):
        traces = _effective_traces(fn)
        if len(_signatures(traces)) > 1 or len(traces) > 2:
            out[fn["name"]] = max(out.get(fn["name"], 0), len(traces))
    return out


@dataclasses.dataclass
class _Found:
    """What the rules have found so far in one record: causes, warnings, the growth they account for, and the
    object census's growth they read."""

    run: _Run
    rec: Mapping[str, Any]
    causes: list[dict] = dataclasses.field(default_factory=list)
    warnings: list[dict] = dataclasses.field(default_factory=list)
    explained: float = 0.0
    grew: list = dataclasses.field(default_factory=list)  # census_growth between the two censuses
    counted: bool = False  # whether both censuses were taken
    object_mb: float = 0.0  # live objects grown between them, by the bytes they hold
    data_mb: float = 0.0  # of which data (DATA_TYPES)

    def cause(self, explains: float, **fields: Any) -> None:
        """Add a cause that accounts for `explains` MiB of the growth."""
        self.causes.append(fields)
        self.explained += explains

    def loop_causes(self) -> bool:
        """Whether a cause that repeats work in a loop was found (graphs and models leave objects too)."""
        return any(c["cause"] in ("retracing", "recompiling", "models_in_loop", "predict_in_loop") for c in self.causes)


def _retracing(found: _Found) -> None:
    """One function traced again and again for new signatures, memory growing with the traces (else a warning)."""
    run = found.run
    for fn in found.rec.get("functions", ()):
        traces = _effective_traces(fn)
        if len(traces) < MIN_RETRACES or len(_signatures(traces)) < MIN_RETRACES:
            continue
        varied = _varied(traces)
        arg_text = (
            "; ".join(
                f"`{n}` took {len(v)} forms ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})"
                for n, v in list(varied.items())[:3]
            )
            or "its arguments changed"
        )
        all_traces = run.of("trace", function=fn["name"])
        after = [e for e in all_traces if e["t"] > run.base_t]
        lines = events_lines(all_traces, 0, "call")
        if fn.get("defined"):
            where, line = fn["defined"]
            lines.append(describe(where, line, role="definition"))
        growth = (after[-1][run.key] - run.base_m) if after else 0.0
        per = growth / max(1, len(after))
        if len(after) >= 2 and growth >= RETRACE_GROWTH_MB:
            found.cause(
                max(growth, 0.0),
                cause="retracing",
                title=f"retracing: `{fn['name']}` was traced {len(traces)} times",
                evidence=f"{arg_text}; {len(after)} traces after warm-up with memory {growth:+.1f} MiB over "
                f"them ({per:+.2f} MiB per trace): a traced graph is never freed while its function lives",
                fix=FIXES["retracing"],
                function=fn["name"],
                traces=len(traces),
                traces_after_warmup=len(after),
                varied=varied,
                growth_mb=growth,
                lines=lines,
            )
        else:
            found.warnings.append(
                dict(
                    cause="retraced",
                    title=f"retraced without growing memory: `{fn['name']}` traced {len(traces)} times",
                    evidence=f"{arg_text}; {len(after)} of the traces came after warm-up and memory grew "
                    f"{growth:+.1f} MiB over them: each trace costs time, not a leak",
                    fix=FIXES["retraced"],
                    function=fn["name"],
                    traces=len(traces),
                    varied=varied,
                    lines=lines,
                )
            )


def _recompiling(found: _Found) -> None:
    """Re-compiling one model again and again: new train/test functions each time, each traced anew."""
    run = found.run
    compiles: dict[str, list[dict]] = {}
    for e in run.of("compile"):
        compiles.setdefault(e.get("model", "?"), []).append(e)
    for model, events in compiles.items():
        if len(events) < MIN_COMPILES:
            continue
        ms = [e[run.key] for e in events]
        per_compile = _slope0(ms[1:])
        growth = run.end_m - ms[1]
        if per_compile > COMPILE_SLOPE_MB and growth > OBJECT_GROWTH_MB and _keeps_growing(ms[1:], per_compile):
            since = events[0]["t"]
            made = [
                fn
                for fn in found.rec.get("functions", ())
                if any(t.get("t", 0.0) >= since for t in fn.get("traces", ()) if isinstance(t, Mapping))
            ]
            n_traces = sum(len(fn.get("traces", ())) for fn in made)
            found.cause(
                max(growth, 0.0),
                cause="recompiling",
                title=f"re-compiling in a loop: `{model}` compiled {len(events)} times",
                evidence=f"each compile() drops the model's train/test functions and the next fit traces new "
                f"ones: {len(made)} tf.functions traced {n_traces} times since the first compile; memory "
                f"{per_compile:+.1f} MiB per compile ({growth:+.1f} MiB from the second compile to the end)",
                fix=FIXES["recompiling"],
                model=model,
                compiles=len(events),
                functions=len(made),
                slope_mb_per_compile=per_compile,
                growth_mb=growth,
                lines=events_lines(events, 0, "compile"),
            )


def _models_in_loop(found: _Found) -> None:
    """Models built in a loop, memory growing with each; or, where builds are not timed, more models alive."""
    run = found.run
    models = run.of("model")
    live_growth = int(found.rec.get("live_models_growth", 0))
    if len(models) >= MIN_MODELS:
        ms = [e[run.key] for e in models]
        per_model = _slope0(ms[1:]) if len(ms) > 3 else _slope0(ms)
        growth = run.end_m - ms[1]
        if per_model > MODEL_SLOPE_MB and growth > OBJECT_GROWTH_MB and _keeps_growing(ms[1:], per_model):
            found.cause(
                max(growth, 0.0),
                cause="models_in_loop",
                title=f"models built in a loop: {len(models)} models, memory never returned",
                evidence=f"memory {per_model:+.1f} MiB per model built ({ms[0]:.0f} -> {run.end_m:.0f} MiB over "
                f"{len(models)} models); each model keeps its weights, optimizer and traced functions alive "
                "as long as Keras's global state does",
                fix=FIXES["models_in_loop"],
                models=len(models),
                slope_mb_per_model=per_model,
                growth_mb=growth,
                lines=model_lines(models),
            )
    elif live_growth > 0 and run.growth > OBJECT_GROWTH_MB:
        found.cause(
            max(run.growth, 0.0),
            cause="models_in_loop",
            title=f"models kept alive: {live_growth} more Keras models than after warm-up",
            evidence=f"memory {run.growth:+.1f} MiB since {run.base_reason} while {live_growth} more models "
            "stayed alive",
            fix=FIXES["models_in_loop"],
            models=live_growth,
            growth_mb=run.growth,
            lines=model_lines(models),
        )


def _predict_in_loop(found: _Found) -> None:
    """predict in a loop: growth per call that live objects do not hold, and not what the script keeps of it."""
    run, rec = found.run, found.rec
    predicts = run.of("predict")
    if len(predicts) < MIN_PREDICTS:
        return
    # Memory as each call began (`before_mb`, where recorded): the call's own result, alive when it
    # returns, is not growth. The first calls trace and warm up.
    before = all(e.get("before_mb") is not None for e in predicts) and run.key == "anon_mb"
    ms = [e["before_mb"] if before else e[run.key] for e in predicts[5:]]
    held = found.data_mb if found.counted else 0.0
    growth = ms[-1] - ms[0] - held
    per_call = _slope0(ms) - held / max(1, len(ms))
    seconds = sum(e.get("seconds", 0.0) for e in predicts) / len(predicts)
    rows = sorted(e.get("rows", 0) or 0 for e in predicts)[len(predicts) // 2]
    size = f"{rows} rows per call" if rows else "small inputs"
    keeps = _kept_per_call(rec, predicts)
    if (
        per_call > PREDICT_SLOPE_MB
        and growth > PREDICT_GROWTH_MB
        and _keeps_growing(ms, _slope0(ms))
        # The script keeps what each call returns, and that (not predict) accounts for the growth.
        and not (keeps is not None and keeps >= KEPT_OUTPUTS_RATIO * per_call)
    ):
        found.cause(
            max(growth, 0.0),
            cause="predict_in_loop",
            title=f"predict in a loop: {len(predicts)} calls of {predicts[0].get('api', 'predict')}",
            evidence=f"memory {per_call:+.3f} MiB per call after the first 5 that no live object holds "
            f"({growth:+.1f} MiB over {len(predicts) - 5} calls), {seconds * 1000:.0f} ms per call for "
            f"{size}: each predict builds a new input pipeline, iterator and callbacks",
            fix=FIXES["predict_in_loop"],
            calls=len(predicts),
            slope_mb_per_call=per_call,
            growth_mb=growth,
            lines=events_lines(predicts, 0, "predict"),
        )


def _data_copies(found: _Found) -> None:
    """The data held several times: anonymous memory jumping by a multiple of the arrays handed over."""
    run = found.run
    for e in run.of("data"):
        nbytes_mb = e.get("nbytes", 0) / 2**20
        if nbytes_mb < DATA_MIN_MB:
            continue
        later = [x["t"] for x in run.events if x["t"] > e["t"] and x["kind"] in ("epoch", "fit_end", "data", "end")]
        t1 = later[0] if later else float("inf")
        jump = run.peak_between(e["t"], t1) - e[run.key]
        copies = (jump - DATA_WARMUP_MB) / nbytes_mb
        if copies >= 1.0:
            found.cause(
                jump if e["t"] >= run.base_t else 0.0,  # after warm-up began, the jump is part of the growth
                cause="data_copies",
                title=f"the data held several times: {nbytes_mb:.0f} MiB of arrays given to {e.get('source')}",
                evidence=f"memory jumped {jump:+.0f} MiB when {nbytes_mb:.0f} MiB of arrays were given to "
                f"{e.get('source')}: about {jump / nbytes_mb:.1f} more copies of them held at once, beside "
                "the arrays themselves",
                fix=FIXES["data_copies"],
                source=e.get("source"),
                nbytes_mb=nbytes_mb,
                jump_mb=jump,
                copies=jump / nbytes_mb,
                growth_mb=jump,
                lines=events_lines([e], 0, "copy"),
            )


def _python_accumulation(found: _Found) -> None:
    """Live objects, by the bytes they hold, grew and account for the growth."""
    run, rec = found.run, found.rec
    others = found.loop_causes()
    unexplained = max(run.growth - found.explained, 0.0)
    # Beside another cause, only data (arrays, tensors, bytes) counts: graphs and models leave objects too.
    held_mb = found.data_mb if others else found.object_mb
    types = [g for g in found.grew if g[0] / 2**20 >= 1.0 and (g[2] in DATA_TYPES or not others)][:4]
    window = min(unexplained, run.census_growth) if others else run.census_growth
    if held_mb > OBJECT_GROWTH_MB and types and held_mb >= 0.5 * window:
        found.cause(
            held_mb,
            cause="python_accumulation",
            title="Python-side accumulation: live objects keep growing",
            evidence="grew between warm-up and the end: "
            + ", ".join(f"{name} {count:+d} objects ({size / 2**20:+.1f} MiB)" for size, count, name in types)
            + f"; {held_mb:+.1f} MiB held by live objects, of {run.growth:+.1f} MiB memory growth"
            + "".join(
                f"; {h['holder']} holds {h['bytes'] / 2**20:.1f} MiB in {h['objects']} objects"
                for h in rec.get("holders") or ()
            ),
            fix=FIXES["python_accumulation"],
            types=[name for _, _, name in types],
            growth_mb=held_mb,
            lines=kept_lines(rec.get("holders") or ()),
            holders=[h["holder"] for h in rec.get("holders") or ()],
        )


def _allocator_growth(found: _Found, epoch_slope: float, unit: str | None, per_unit: float) -> None:
    """Memory grew after warm-up and nothing above, live objects included, accounts for it."""
    run = found.run
    epoch_ms = [e[run.key] for e in run.epochs[1:]]
    unexplained = run.growth - found.explained
    if (
        not found.loop_causes()
        and unexplained > UNEXPLAINED_GROWTH_MB
        and (epoch_slope > EPOCH_SLOPE_MB and _keeps_growing(epoch_ms, epoch_slope) or len(run.epochs) <= 3)
        and found.object_mb < 0.25 * run.growth
    ):
        rate = f" ({per_unit:+.2f} MiB per {unit})" if unit else ""
        found.cause(
            0.0,
            cause="allocator_growth",
            title="allocator growth with no live-object growth",
            evidence=f"memory {run.growth:+.1f} MiB after warm-up{rate} while "
            + (f"live objects grew {found.object_mb:+.1f} MiB" if found.counted else "no objects were counted")
            + " and no traces, compiles, models or predict calls piled up: memory freed inside the process but "
            "kept by the allocator, or held by native code",
            fix=FIXES["allocator_growth"],
            growth_mb=run.growth,
            slope_mb_per_epoch=epoch_slope,
            lines=_loop_lines(run, unit),
        )


def _stateful_not_reset(found: _Found) -> None:
    """Stateful layers never reset: a correctness problem, not a growing one (a warning)."""
    for key, entry in found.rec.get("stateful", {}).items():
        if entry.get("epochs", 0) >= 2 and entry.get("resets", 0) == 0:
            found.warnings.append(
                dict(
                    cause="stateful_not_reset",
                    title=f"stateful layer never reset: {entry.get('class', 'layer')} `{key}`",
                    evidence=f"it carried its state across {entry['epochs']} epochs and reset_state() was never "
                    "called: every epoch starts from the last batch of the previous one (memory does not grow "
                    "with it)",
                    fix=FIXES["stateful_not_reset"],
                    layer=key,
                    epochs=entry["epochs"],
                )
            )


def diagnose(rec: Mapping[str, Any]) -> dict:
    """Causes and warnings found in a record (see the module docstring): `{causes, warnings, leak, ...}`.

    Each cause is `{cause, title, evidence, fix, growth_mb, ...}`; every one needs its own evidence and memory
    that grew after warm-up by what it accounts for. Warnings (a stateful layer never reset, retracing with
    memory flat) are problems that do not grow memory. `leak` is whether any cause was found. The rules run in
    order: the causes that repeat work in a loop first, then the data, then what live objects hold, and
    allocator growth only for what none of them accounts for.

    Example:
        >>> diagnose(record)["causes"][0]["title"]
        'retracing: `train_step` was traced 21 times'
    """
    run = _Run(rec)
    found = _Found(run, rec)
    first, last = run.census.get("first"), run.census.get("last")
    if first and last:
        found.counted = True
        found.grew = census_growth(first["stats"], last["stats"])
        found.object_mb = sum(g[0] for g in found.grew) / 2**20
        found.data_mb = sum(g[0] for g in found.grew if g[2] in DATA_TYPES) / 2**20
    unit, per_unit = _loop_unit(run, rec)
    epoch_slope = _slope0([e[run.key] for e in run.epochs[1:]]) if len(run.epochs) > 3 else 0.0
    for rule in (_retracing, _recompiling, _models_in_loop, _predict_in_loop, _data_copies, _python_accumulation):
        rule(found)
    _allocator_growth(found, epoch_slope, unit, per_unit)
    _stateful_not_reset(found)
    return dict(
        causes=found.causes,
        warnings=found.warnings,
        leak=bool(found.causes),
        memory_key=run.key,
        start_mb=run.readings[0][1] if run.readings else None,
        peak_mb=max(m for _, m in run.readings) if run.readings else None,
        baseline_t=run.base_t,
        baseline_mb=run.base_m,
        baseline_reason=run.base_reason,
        end_mb=run.end_m,
        growth_mb=run.growth,
        explained_mb=found.explained,
        object_growth_mb=found.object_mb,
        data_growth_mb=found.data_mb,
        grew=found.grew[:8],
        epoch_slope_mb=epoch_slope,
        unit=unit,
        slope_mb_per_unit=per_unit,
        retraced=retraced(rec),
    )


_UNIT_KINDS = {"epoch": "epoch", "predict call": "predict", "model": "model", "compile": "compile"}


def _loop_lines(run: _Run, unit: str | None) -> list[dict]:
    """The line of the loop whose passes grew memory: the call that runs the epochs (`fit`), or the call
    repeated in the script's own loop."""
    kind = _UNIT_KINDS.get(unit or "")
    events = run.of(kind) if kind else []
    return events_lines(events, 0, "loop")


def _loop_unit(run: _Run, rec: Mapping[str, Any]) -> tuple[str | None, float]:
    """The script's main loop (epochs, or else the most repeated call) and memory per pass after warm-up."""
    kinds = {"epoch": "epoch", "predict": "predict call", "model": "model", "compile": "compile"}
    best: tuple[int, str | None, list[float]] = (0, None, [])
    for kind, name in kinds.items():
        ms = [e[run.key] for e in run.of(kind) if e["t"] > run.base_t]
        if len(ms) >= 3 and (len(ms) > best[0] or kind == "epoch"):
            best = (len(ms), name, ms)
            if kind == "epoch":
                break
    if best[1] is None:
        return None, 0.0
    return best[1], _slope0(best[2])
