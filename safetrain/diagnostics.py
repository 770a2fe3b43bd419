"""Leak diagnosis from inside a run: an object census, and what grew since a baseline, with the fix.

`LeakDetector` takes a `baseline()` after the first epoch and calls `diagnose()` when memory keeps growing.

Example:
    >>> base = baseline(trainer, sample)
    >>> report = diagnose(trainer, base, growth=3.2, window=10, threshold=1.0, sample=later)
    >>> report["suggestion"]
"""

from __future__ import annotations

import collections
import gc
import sys

import keras

from safetrain import hooks

__all__ = ["object_stats", "live_models", "baseline", "diagnose"]


def object_stats() -> dict[str, tuple[int, int]]:
    """Live Python objects by type: `{type name: (count, bytes)}`.

    `gc.get_objects()` only lists containers; objects without references (bytes, bytearray, NumPy
    buffers) are found one level down, as referents of those containers.
    """
    seen: set[int] = set()
    stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def add(o) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        entry = stats[type(o).__name__]
        entry[0] += 1
        try:
            entry[1] += sys.getsizeof(o)
        except TypeError:
            pass

    for o in gc.get_objects():
        add(o)
        for r in gc.get_referents(o):
            if not gc.is_tracked(r):
                add(r)
    return {k: (v[0], v[1]) for k, v in stats.items()}


def live_models() -> int:
    """How many Keras models are alive now."""
    return sum(1 for o in gc.get_objects() if isinstance(o, keras.Model))


def baseline(trainer, sample) -> dict:
    """What is alive after the first epoch (tracing and warm-up done): what grows from here on is the leak."""
    return dict(objects=object_stats(), models=live_models(), epoch=sample.epoch, rss_mb=sample.rss_mb)


def diagnose(trainer, base: dict, growth: float, window: int, threshold: float, sample, resets: bool) -> dict:
    """What is growing since `base` and what would help; `text` is what `LeakDetector`'s warning shows.

    `resets`: whether the trainer already resets stateful layers (a `ResetStates` policy).
    """
    now = object_stats()
    grew = sorted(
        (
            (k, n - base["objects"].get(k, (0, 0))[0], b - base["objects"].get(k, (0, 0))[1])
            for k, (n, b) in now.items()
        ),
        key=lambda t: -t[2],
    )
    grew = [g for g in grew if g[2] > 0][:8]
    object_mb = sum(g[2] for g in grew) / 2**20
    rss_mb = sample.rss_mb - base["rss_mb"]
    models = live_models() - base["models"]
    graphs = now.get("FuncGraph", (0, 0))[0] - base["objects"].get("FuncGraph", (0, 0))[0]
    traces = dict(trainer.steps.total_trace_counts)
    stateful = any(getattr(layer, "stateful", False) for layer in hooks.layers_of(trainer.model))
    if any(n > 1 for n in trainer.steps.trace_counts.values()):
        suggestion = (
            "RetraceGuard(max_traces=1): steps are being traced again; give the data one dtype and "
            "make dimensions that vary None"
        )
    elif models > 0:
        suggestion = (
            f"ClearSession(every_n_epochs=...), and build models with a factory: {models} more "
            "Keras models are alive than after the first epoch"
        )
    elif stateful and not resets:
        suggestion = "ResetStates('epoch'): the model has stateful layers that are never reset"
    elif grew and object_mb >= 0.5 * max(rss_mb, 1e-9):
        suggestion = (
            f"something accumulates Python objects ({grew[0][0]}: +{grew[0][1]} objects, "
            f"+{grew[0][2] / 2**20:.1f} MiB); look at callbacks and custom layers that keep "
            "per-batch results (give layers a release_memory hook)"
        )
    else:
        suggestion = (
            "TrimMalloc() or GarbageCollect(): no live objects account for the growth, so the "
            "allocator is keeping freed memory; memory only a new process returns needs a fresh "
            "process per run"
        )
    top = ", ".join(f"{k} +{n} ({b / 2**20:.1f} MiB)" for k, n, b in grew[:5]) or "none"
    text = (
        f"RSS grows {growth:.2f} MiB/epoch over the last {window} epochs (threshold "
        f"{threshold:.2f}); +{rss_mb:.1f} MiB since epoch {base['epoch'] + 1}, of which "
        f"live Python objects account for {object_mb:.1f} MiB. Traces: {traces}. Keras models alive: "
        f"{models:+d}, function graphs: {graphs:+d} since epoch {base['epoch'] + 1}. Grew most: {top}. "
        f"Suggested: {suggestion}."
    )
    return dict(
        slope_mb_per_epoch=growth,
        traces=traces,
        grew=grew,
        object_mb=object_mb,
        rss_mb=rss_mb,
        live_models=models,
        func_graphs=graphs,
        suggestion=suggestion,
        text=text,
    )
