"""Probe steps that leave no trace, and the line through their peaks: `make_plan` and `check_microbatches`.

The probes run the trainer's own step (a separate compiled copy of it, so no trace is counted) on batches of
the user's data at a few sizes up to the batch size, each under `diagnostics.PeakMemory`, and fit a line to
the peaks: what the step holds per sample (activations, and for training their gradients) and what it holds
whatever the batch (weights, optimizer slots, the traced step, TensorFlow's first-step cost). Every value the
probes change (weights, optimizer slots and iterations, metric state, the seed-generator states,
`trainer.progress`) is put back from a `Snapshot` taken before them, so what follows runs exactly as it would
have.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from keras import tree

from safetrain import _compat
from safetrain.data.specs import relax_spec
from safetrain.data.streaming import READ_AHEAD_BYTES, read_ahead
from safetrain.diagnostics import PeakMemory, read_memory, slope
from safetrain.errors import ConfigurationError
from safetrain.memory import trim_malloc
from safetrain.plan.model import MARGIN_FIXED_MB, MARGIN_GROWTH, MemoryPlan

__all__ = ["make_plan", "check_microbatches", "probe_sizes", "batch_size_of", "KINDS"]

#: the steps a plan can be made for
KINDS = ("train", "test", "predict")
#: probe batch sizes: the batch size divided by these (at least 1 sample, each size once)
PROBE_DIVISORS = (8, 4, 2, 1)
#: batches a `tf.data` pipeline over a dataset, generator or `PyDataset` holds besides the step's own
ADAPTER_PIPELINE_BATCHES = 2
#: batches a streamed pipeline holds beyond what it reads ahead (the batch being converted, tf.data's buffers)
STREAM_EXTRA_BATCHES = 2
#: the fixed part of the margin kept beside a measured microbatched step (the growth share as in the plan's)
MEASURED_MARGIN_MB = 24.0
#: under a budget, the share of its room the one-piece probes may take (the microbatched step needs the rest)
PROBE_SHARE = 0.5
#: the time the probes may take after the first two: this many seconds, or this share of the predicted epoch
PROBE_SECONDS, PROBE_EPOCH_SHARE = 2.5, 0.045


def probe_sizes(batch_size: int) -> list[int]:
    """The probe batch sizes for a batch of `batch_size`, ascending (the batch size itself last)."""
    return sorted({max(1, batch_size // d) for d in PROBE_DIVISORS})


def _row_bytes(spec) -> int:
    total = 0
    for s in tree.flatten(spec):
        shape = getattr(s, "shape", None)
        if shape is None or shape.rank is None or shape.rank == 0:
            continue
        n = shape[1:].num_elements()
        total += int(n or 0) * s.dtype.size
    return total


def _pipeline_mb(batches, batch_size: int, row_bytes: int, limit: int = READ_AHEAD_BYTES) -> float:
    """What the input pipeline holds besides the step's batch, at `batch_size` (MiB); for a streamed input,
    with `limit` bytes read ahead."""
    batch_bytes = batch_size * row_bytes
    if batches.path == "stream":
        group, in_flight, waiting = read_ahead(batch_bytes, limit)
        held = (group * (in_flight + waiting) + STREAM_EXTRA_BATCHES) * batch_bytes
        return min(held, (batches.num_samples or 0) * row_bytes) / 2**20  # never more than the data
    return ADAPTER_PIPELINE_BATCHES * batch_bytes / 2**20


def _probe_batch(batches, spec, size: int):
    """A batch of `size` samples for a probe: the first rows of arrays (repeated if there are fewer), else
    zeros of the element spec (a dataset, generator or `PyDataset` is not iterated: that would move it)."""
    n = batches.num_samples
    if batches.path == "stream" and n:
        return batches.reader.batch(np.sort(np.arange(size) % n).astype(np.int64))
    arrays = getattr(batches, "_arrays", None)
    if batches.path == "graph" and n and all(t is None or isinstance(t, tf.Tensor) for t in tree.flatten(arrays)):
        index = tf.constant(np.arange(size) % n, dtype=tf.int64)
        return tree.map_structure(lambda t: None if t is None else tf.gather(t, index), arrays)

    def zeros(s):
        if not isinstance(s, tf.TensorSpec):
            raise ConfigurationError(
                f"plan_memory: cannot make probe batches for an input of {type(s).__name__}; pass NumPy arrays, "
                "or a dataset of dense tensors."
            )
        shape = s.shape.as_list()
        if any(d is None for d in shape[1:]):
            raise ConfigurationError(
                f"plan_memory: the input has dimensions that vary ({s}), so probe batches cannot be made from "
                "its spec; plan with NumPy arrays of the largest shape instead."
            )
        return tf.zeros([size] + shape[1:], s.dtype)

    return tf.nest.map_structure(zeros, spec)


def _line(points: list[tuple[int, float]], floor_per_sample: float, measured: int | None = None) -> tuple[float, float]:
    """(intercept, per sample) of a line over `(batch, peak)` points that no point lies above: the slope by
    least squares (at least `floor_per_sample`), the intercept raised to the highest point. Where the last point
    is at batch `measured` (a probe ran at the batch size planned for), the line goes through it: what that step
    measured is the prediction there, and the slope is the least that keeps the other points under the line
    (a pool allocator makes the smaller probes' peaks lie above a least-squares line through the larger ones)."""
    if len(points) >= 2 and points[-1][0] == measured:
        (last, top), earlier = points[-1], points[:-1]
        per = max(floor_per_sample, min((top - p) / (last - b) for b, p in earlier))
    elif len(points) >= 2:
        per = slope([p for _, p in points], [b for b, _ in points])
        per = max(floor_per_sample, per if per == per else 0.0)
    else:
        per = floor_per_sample
    return max(p - per * b for b, p in points), per


def _floor(points: list[tuple[int, float]], probes: _Probes, row_mb: float) -> float:
    """The least a sample may cost: its bytes; from one probe (a budget stopped the next), all that probe grew
    beyond the trace, per sample (one point gives no slope, and the next probe must not be a leap)."""
    if len(points) != 1:
        return row_mb
    size, peak = points[0]
    return max(row_mb, (peak - probes.base_mb - probes.trace_mb) / size)


def _reset_cpu_allocator() -> float | None:
    """Reset the peak of TensorFlow's CPU allocator and return what it holds now (MiB); None where it does not
    count (an allocator without statistics)."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        return tf.config.experimental.get_memory_info("CPU:0")["current"] / 2**20
    except (ValueError, RuntimeError, tf.errors.OpError, KeyError):
        return None


def _cpu_allocator_peak(start: float | None) -> float | None:
    """The peak of TensorFlow's CPU allocator since `_reset_cpu_allocator` returned `start`, over `start` (MiB)."""
    if start is None:
        return None
    try:
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20 - start
    except (ValueError, RuntimeError, tf.errors.OpError, KeyError):
        return None


def _device_names() -> list[str]:
    return [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices("GPU")]


class _Probes:
    """Probe steps on `trainer` that leave no trace: values captured on entry and put back on exit.

    `peak(size)` runs the one-piece `kind` step on a probe batch of `size` samples and returns the peak
    anonymous memory (MiB) during it; `peak(size, microbatch=m)` the step in microbatches (slices) of `m`. Each
    step is traced on its first use, on a small batch, outside the measurement (`trace_mb` says what the first
    trace kept). `output_row_bytes`: the bytes per sample of what the step returned (a prediction's outputs).
    """

    def __init__(self, trainer, batches, kind: str = "train") -> None:
        self.trainer, self.batches, self.kind = trainer, batches, kind
        self.output_row_bytes = 0
        self.spec = relax_spec(batches.element_spec)
        self.steps: dict = {}
        self.trace_mb = 0.0
        self.graph_mb = 0.0  # what tracing alone kept (the traced graph), before the first run
        self.devices = _device_names()
        self.device_peak_mb = 0.0
        self.seconds_per_sample = 0.0  # of the last probe
        self.allocator_peak_mb: float | None = None  # of the last probe: TensorFlow's CPU allocator, if it counts

    def __enter__(self) -> _Probes:
        from safetrain.snapshot import Snapshot

        self.seed_existed = _compat.global_seed_state() is not None
        trim_malloc(quiet=True)  # heap freed earlier but kept by the allocator is not what this fit will need
        self.base_mb = read_memory()[1]
        self.snapshot = Snapshot.take(self.trainer, structure=False)
        self.held_mb = self.snapshot.nbytes / 2**20  # the copy the probes are undone from: not part of a fit
        return self

    def __exit__(self, *exc: Any) -> None:
        self.snapshot.restore_values(self.trainer, notify=False)
        if not self.seed_existed:
            _compat.drop_global_seed_state()
        self.steps.clear()
        del self.snapshot

    def _step(self, microbatch: int | None):
        from safetrain.microbatch import Microbatches
        from safetrain.steps import CompiledStep

        trainer, kind = self.trainer, self.kind
        step = self.steps.get(microbatch is not None)
        if step is None:
            if microbatch is None:

                def method():  # the one-piece step: microbatching would hide what a sample costs
                    return trainer.step_method(kind, microbatched=False)

            else:
                pieces = Microbatches()
                pieces.set_size(microbatch)
                self.pieces = pieces

                def method():
                    return functools.partial(getattr(pieces, f"{kind}_step"), trainer)

            step = CompiledStep(kind, method, trainer.strategy, trainer.jit_compile)
            before = read_memory()[1]
            step.function_for(self.spec).get_concrete_function(self.spec)  # the trace alone
            self.graph_mb = max(self.graph_mb, read_memory()[1] - before)
            first = 1 if microbatch is None else microbatch
            step.run_step(_probe_batch(self.batches, self.spec, first), self.spec)  # and the first run
            self.trace_mb = max(self.trace_mb, read_memory()[1] - before)
            self.steps[microbatch is not None] = step
        if microbatch is not None:
            self.pieces.set_size(microbatch)
        return step

    def peak(self, size: int, microbatch: int | None = None) -> float:
        step = self._step(microbatch)
        data = _probe_batch(self.batches, self.spec, size)
        for device in self.devices:
            tf.config.experimental.reset_memory_stats(device)
        counted = _reset_cpu_allocator()
        t0 = time.perf_counter()
        with PeakMemory() as peak:
            outputs = step.run_step(data, self.spec)
        self.allocator_peak_mb = _cpu_allocator_peak(counted)
        self.seconds_per_sample = (time.perf_counter() - t0) / size
        if self.kind == "predict":
            shapes = [t for t in tree.flatten(outputs) if isinstance(t, tf.Tensor) and t.shape.rank]
            self.output_row_bytes = sum(t.shape.num_elements() * t.dtype.size for t in shapes) // size
        del data, outputs
        if self.devices:
            info = tf.config.experimental.get_memory_info
            self.device_peak_mb = sum(info(d)["peak"] for d in self.devices) / 2**20
        return peak.mb - self.held_mb


def make_plan(
    trainer, batches, batch_size: int | None = None, budget_mb: float | None = None, kind: str = "train"
) -> MemoryPlan:
    """Probe `trainer`'s `kind` step on batches of `batches` and return the `MemoryPlan` for `batch_size`
    (default: the batches' own). For "predict", the array the outputs of all samples are kept in is part of
    the plan (`outputs_mb`). With `budget_mb`, no probe predicted to take more than `PROBE_SHARE` of what
    the budget leaves (less the least pipeline and `MARGIN_FIXED_MB`) is run: an allocator that keeps a pool
    (oneDNN's does) keeps what the probes took, and the fit must still fit beside it."""
    t0 = time.perf_counter()
    batch_size = int(batch_size or batch_size_of(batches) or 32)
    trainer.build(batches.element_spec, training=kind != "predict")
    row_bytes = _row_bytes(relax_spec(batches.element_spec))
    row_mb = row_bytes / 2**20
    points: list[tuple[int, float]] = []
    device_points: list[tuple[int, float]] = []
    allocator_points: list = []
    with _Probes(trainer, batches, kind) as probes:
        limit_mb = None
        if budget_mb is not None:
            least = _pipeline_mb(batches, batch_size, row_bytes, limit=0)
            room = max(0.0, budget_mb - probes.base_mb - MARGIN_FIXED_MB - least)
            limit_mb = probes.base_mb + PROBE_SHARE * room
        started = time.perf_counter()
        for size in probe_sizes(batch_size):
            if points and len(points) >= 2:
                # Time: at most PROBE_SECONDS, or PROBE_EPOCH_SHARE of the epoch the probes predict.
                epoch = probes.seconds_per_sample * batch_size * (batches.num_batches or 0)
                allowed = max(PROBE_SECONDS, PROBE_EPOCH_SHARE * epoch)
                if time.perf_counter() - started + probes.seconds_per_sample * size > allowed:
                    break
            if limit_mb is not None and points:
                intercept, per = _line(points, _floor(points, probes, row_mb))
                if intercept + per * size + probes.held_mb > limit_mb:
                    break
            points.append((size, probes.peak(size)))
            allocator_points.append((size, probes.allocator_peak_mb))
            if probes.devices:
                device_points.append((size, probes.device_peak_mb))
    if os.environ.get("SAFETRAIN_PLAN_DEBUG"):
        left = read_memory()[1] - probes.base_mb
        print(
            f"plan debug: base {probes.base_mb:.1f} trace {probes.trace_mb:.1f} graph {probes.graph_mb:.1f} "
            f"left {left:.1f} allocator {allocator_points}"
        )
    intercept, per = _line(points, _floor(points, probes, row_mb), measured=batch_size)
    # The fit traces its own step (the probes' compiled copy is dropped): that graph's memory comes on top.
    intercept += probes.graph_mb
    device_peak = device_per = None
    if device_points:
        d_intercept, device_per = _line(device_points, 0.0)
        device_peak = d_intercept + device_per * batch_size
    return MemoryPlan(
        batch_size=batch_size,
        base_mb=probes.base_mb,
        fixed_mb=intercept - probes.base_mb,
        activation_mb_per_sample=per,
        pipeline_mb=_pipeline_mb(batches, batch_size, row_bytes),
        least_pipeline_mb=_pipeline_mb(batches, batch_size, row_bytes, limit=0) if batches.path == "stream" else None,
        device_peak_mb=device_peak,
        probes=tuple(points),
        allocator_probes=tuple(allocator_points),
        seconds=time.perf_counter() - t0,
        device_mb_per_sample=device_per,
        kind=kind,
        outputs_mb=(batches.num_samples or batch_size) * probes.output_row_bytes / 2**20 if kind == "predict" else 0.0,
    )


def check_microbatches(trainer, batches, plan: MemoryPlan, budget_mb: float, size: int, least: bool) -> int:
    """The microbatch (slice) size the budget allows, from the step that will run: the microbatched step is probed
    at the plan's batch size in microbatches of a quarter and a half of `size` (ascending: an allocator that
    keeps a pool, as oneDNN's does, only grows), and the largest size at most `size` whose peak on the line
    through them, plus the pipeline and the plan's margin, stays at or under `budget_mb` is returned (0: none).
    A probe predicted to exceed the budget is not run; after one probe the prediction is the conservative one
    (`_floor`: all it grew, per sample). The pool keeps what the probes took, so where a probe's peak with the
    pipeline went past the budget anyway, no size is safe (0)."""
    pipeline = plan.least_pipeline_mb if least and plan.least_pipeline_mb is not None else plan.pipeline_mb
    margin = MEASURED_MARGIN_MB + MARGIN_GROWTH * max(0.0, budget_mb - plan.base_mb)
    room = budget_mb - pipeline - plan.outputs_mb - margin
    points: list[tuple[int, float]] = []
    with _Probes(trainer, batches, plan.kind) as probes:
        for m in sorted({max(1, size // 4), max(1, size // 2)}):
            if points:
                intercept, per = _line(points, _floor(points, probes, plan.activation_mb_per_sample))
                if intercept + per * m > room:
                    break
            points.append((m, probes.peak(plan.batch_size, microbatch=m)))
            if os.environ.get("SAFETRAIN_PLAN_DEBUG"):
                print(f"plan debug: microbatches of {m}: peak {points[-1][1]:.1f}, room {room:.1f}")
    intercept, per = _line(points, _floor(points, probes, plan.activation_mb_per_sample))
    intercept += probes.graph_mb  # the fit traces its own microbatched step, beside what was measured
    if intercept + per * points[0][0] > room or max(p for _, p in points) > room + margin:
        return 0
    return max(1, min(size, int((room - intercept) // per) if per > 0 else size))


def batch_size_of(batches) -> int | None:
    """The batch size of `batches`: the one it batches with, else the fixed first dimension of its batches."""
    if batches.batch_size:
        return int(batches.batch_size)
    for s in tree.flatten(batches.step_spec):
        shape = getattr(s, "shape", None)
        if shape is not None and shape.rank:
            return shape[0]
    return None
