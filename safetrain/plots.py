"""Pictures of memory: a doctor run over time with its events, a trainer's MemoryLog, side-by-side runs.

All need matplotlib (`pip install "safetrain[plot]"`); without it they raise an ImportError saying so.

Example:
    >>> trainer.memory.plot("memory.png")            # RSS per epoch, traces and re-hydrations marked
    >>> plot_timeline(doctor.run("train.py"), "doctor.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["plot_timeline", "plot_memory_log", "plot_side_by_side", "require_matplotlib"]


def require_matplotlib():
    """A function making matplotlib Figures on their own Agg canvas, or an ImportError that says how to install it.

    No pyplot and no backend switch: a notebook's inline (or any other) backend stays as it was, and no
    figure is left open in pyplot's registry.

    Example:
        >>> figure = require_matplotlib()
        >>> fig = figure(figsize=(8, 4), dpi=110)
        >>> fig.subplots().plot([1, 2, 3]); fig.savefig("x.png")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'Plotting needs matplotlib: pip install "safetrain[plot]" (or pip install matplotlib).'
        ) from None

    def figure(**kwargs) -> Figure:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)  # attaches itself as fig.canvas
        return fig

    return figure


def plot_timeline(report: Mapping, path: str) -> str:
    """A doctor report as a PNG: memory over time (what the diagnosis read: anonymous memory, or RSS); epochs,
    model builds, compiles, predict calls and retraces marked, and where warm-up ended."""
    figure = require_matplotlib()
    key = report["diagnosis"].get("memory_key", "rss_mb")
    events = [e for e in report["events"] if key in e]
    points = sorted(events + [s for s in report.get("samples", ()) if key in s], key=lambda p: p["t"])
    fig = figure(figsize=(10, 4.8), dpi=110)
    ax = fig.subplots()
    label = "anonymous memory" if key == "anon_mb" else "RSS"
    ax.plot([p["t"] for p in points], [p[key] for p in points], color="#333333", lw=1.2, label=label)
    retraced = {c["function"] for c in report["diagnosis"]["causes"] if c["cause"] == "retracing"}
    styles = [
        ("epoch", lambda e: True, dict(marker="o", s=14, color="#1f77b4", label="epoch end")),
        ("model", lambda e: True, dict(marker="^", s=40, color="#d62728", label="model built")),
        ("compile", lambda e: True, dict(marker="v", s=30, color="#8c564b", label="compile")),
        ("predict", lambda e: True, dict(marker="|", s=60, color="#9467bd", label="predict call")),
        (
            "trace",
            lambda e: e["function"] in retraced,
            dict(marker="x", s=30, color="#ff7f0e", label="retrace of " + ", ".join(sorted(retraced))[:60]),
        ),
    ]
    for kind, keep, style in styles:
        chosen = [e for e in events if e["kind"] == kind and keep(e)]
        if chosen:
            ax.scatter([e["t"] for e in chosen], [e[key] for e in chosen], zorder=3, **style)
    for e in events:
        if e["kind"] == "fit_begin":
            ax.axvline(e["t"], color="#bbbbbb", lw=0.6, zorder=1)
    if report["diagnosis"].get("baseline_t") is not None:
        ax.axvline(report["diagnosis"]["baseline_t"], color="#2ca02c", lw=1.0, ls="--", zorder=1, label="warm-up ends")
    causes = [c["cause"] for c in report["diagnosis"]["causes"]]
    verdict = ", ".join(causes) if causes else "no leak found"
    ax.set_title(f"safetrain doctor: {report['script']}  ({verdict})", fontsize=10)
    ax.set_xlabel("seconds since start (grey lines: fit calls)")
    ax.set_ylabel(f"{label} (MiB)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_memory_log(log, path: str, title: str | None = None) -> str:
    """A trainer's MemoryLog as a PNG: RSS (and device memory, on GPU) per epoch; epochs whose trace count
    went up are marked, as are the epochs where the process's re-hydrations happened (`events`)."""
    figure = require_matplotlib()
    samples = list(log)
    if not samples:
        raise ValueError("plot: the memory log is empty (no epoch has ended yet).")
    xs = [s.epoch + 1 if s.epoch is not None else i + 1 for i, s in enumerate(samples)]
    fig = figure(figsize=(8, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot(xs, [s.rss_mb for s in samples], marker="o", ms=3, color="#1f77b4", label="RSS")
    if any(s.device_mb is not None for s in samples):
        ax.plot(xs, [s.device_mb or 0.0 for s in samples], marker="s", ms=3, color="#2ca02c", label="device memory")
    traced, previous = [], None
    for x, s in zip(xs, samples):
        total = sum((s.traces or {}).values())
        if previous is not None and total > previous:
            traced.append((x, s.rss_mb))
        previous = total
    if traced:
        ax.scatter(*zip(*traced), marker="x", s=50, color="#ff7f0e", zorder=3, label="new trace")
    slope = log.slope() if len(samples) > 4 else float("nan")
    ax.set_title(title or f"memory per epoch (RSS slope {slope:+.3f} MiB/epoch after warm-up)", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MiB")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_side_by_side(
    panels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: str,
    *,
    xlabel: str,
    ylabel: str = "resident memory (MiB)",
    suptitle: str | None = None,
) -> str:
    """Several runs in panels with a shared y axis: `panels` = [(title, xs, ys), ...]."""
    figure = require_matplotlib()
    fig = figure(figsize=(5 * len(panels), 4), dpi=110)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, xs, ys) in zip(axes if len(panels) > 1 else [axes], panels):
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    (axes[0] if len(panels) > 1 else axes).set_ylabel(ylabel)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return path
