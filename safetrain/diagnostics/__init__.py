"""Why memory grew, from a recorded run: memory readings, the object census, and one rule per cause with its fix.

One engine for both diagnosers: the doctor (`python -m safetrain doctor`, a script in a child process) and
`LeakDetector` (inside a `SafeTrainer` run) both describe what they saw as a *record* and call `diagnose`.
This package imports neither TensorFlow nor Keras, so the doctor's parent stays fast: `measure` (memory
readings, slope, census) and `rules` (one rule per cause, its thresholds and fix text).

Example:
    >>> before = census(); grow(); after = census()
    >>> census_growth(before, after)[0]          # (bytes, count, type name), largest first
    (104857600, 100, 'EagerTensor')
    >>> diagnose(record)["causes"][0]["cause"]
    'python_accumulation'

A record is a dict:
    events     [{t, kind, rss_mb, anon_mb?, ...}] in time order; kinds the rules read: "model", "compile"
               (model=key), "trace" (function=name), "epoch", "predict" (rows=...), "data" (nbytes=...,
               source=...), "fit_begin", "fit_end", "end"
    samples    [{t, rss_mb, anon_mb?}] readings between events (optional)
    functions  [{name, traces: [{t, args: {argument: description}, lifted: bool}]}], one per tf.function
               object; `lifted`: TensorFlow's variable-free second trace after a first that made variables
    stateful   {key: {layer, class, epochs, resets}}
    census     {"first": {stats, t, rss_mb, anon_mb?}, "last": {...}}: `census()` after warm-up (once memory
               grew) and at the end; object growth is compared with the memory grown between the two
    counts     {models, compiles, fits, epochs, predicts, batches, gradients, calls}
    baseline   {t, reason, rss_mb?, anon_mb?}: where warm-up ended; growth is measured from here (without
               one, from the first census)
    live_models_growth  (optional) Keras models alive beyond the baseline, for callers that cannot time builds
"""

from __future__ import annotations

from safetrain.diagnostics.measure import PeakMemory, census, census_growth, read_memory, slope
from safetrain.diagnostics.rules import CAUSES, FIXES, WARNINGS, diagnose, retraced

__all__ = [
    "CAUSES",
    "WARNINGS",
    "FIXES",
    "read_memory",
    "PeakMemory",
    "slope",
    "census",
    "census_growth",
    "diagnose",
    "retraced",
]
