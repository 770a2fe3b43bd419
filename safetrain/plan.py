"""The memory plan: the peak a fit will reach at a batch size, from a few probe steps that leave no trace.

    plan = trainer.plan_memory(x, y, batch_size=256)
    print(plan)                       # what does not grow with the batch, what does, the predicted peak
    plan.max_batch_size(4096)         # the largest batch whose fit stays under 4096 MiB of process memory
    SafeTrainer(model, memory_budget_mb=4096).fit(x, y, batch_size=1024)   # microbatches if it would not fit

The probes run the trainer's own train step (a separate compiled copy of it, so no trace is counted) on batches
of the user's data at a few sizes up to the batch size, each under `diagnostics.PeakMemory`, and fit a line to
the peaks: what the step holds per sample (activations and their gradients) and what it holds whatever the
batch (weights, optimizer slots, the traced step, TensorFlow's first-step cost). Every value the probes change
(weights, optimizer slots and iterations, metric state, the seed-generator states, `trainer.progress`) is put
back from a `Snapshot` taken before them, so the fit that follows runs exactly as it would have.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import numpy as np
import psutil
import tensorflow as tf
from keras import tree

from safetrain import _compat
from safetrain.data.specs import relax_spec
from safetrain.data.streaming import READ_AHEAD_BYTES, read_ahead
from safetrain.diagnostics import PeakMemory, read_memory, slope
from safetrain.errors import ConfigurationError, MemoryBudgetExceeded
from safetrain.memory import trim_malloc

__all__ = ["MemoryPlan", "make_plan", "available_mb", "auto_budget_mb", "apply_budget", "MARGIN_MB"]

#: probe batch sizes: the batch size divided by these (at least 1 sample, each size once)
PROBE_DIVISORS = (8, 4, 2, 1)
#: the least that "auto" keeps free, and the share of the process's memory it keeps free beyond that
MARGIN_MB, MARGIN_SHARE = 256.0, 0.10
#: batches a `tf.data` pipeline over a dataset, generator or `PyDataset` holds besides the step's own
ADAPTER_PIPELINE_BATCHES = 2
#: batches a streamed pipeline holds beyond what it reads ahead (the batch being converted, tf.data's buffers)
STREAM_EXTRA_BATCHES = 2
#: what a budget keeps free beyond the prediction: the fixed part and the share of the growth
MARGIN_FIXED_MB, MARGIN_GROWTH = 32.0, 0.10
#: the fixed part of the margin kept beside a measured microbatched step (the growth share as above)
MEASURED_MARGIN_MB = 24.0
#: under a budget, the share of its room the one-piece probes may take (the microbatched step needs the rest)
PROBE_SHARE = 0.5
#: the time the probes may take after the first two: this many seconds, or this share of the predicted epoch
PROBE_SECONDS, PROBE_EPOCH_SHARE = 2.5, 0.045


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a fit at `batch_size` will hold, in MiB of anonymous memory (RssAnon) of the whole process.

    Attributes:
        batch_size: the batch size planned for.
        base_mb: anonymous memory of the process when planning began.
        fixed_mb: what does not grow with the batch (weights, optimizer slots, the traced step, TensorFlow's
            first-step cost), on top of `base_mb`.
        activation_mb_per_sample: what the step holds per sample (activations, their gradients, the batch).
        pipeline_mb: what the input pipeline holds besides the step's own batch (batches read ahead), at
            `batch_size`; microbatches do not shrink it.
        device_peak_mb: the predicted peak of the accelerator's memory at `batch_size` (TensorFlow's peak
            memory info), or None without one.
        probes: `(batch size, peak MiB)` of each probe step.
        seconds: what planning took.

    Example:
        >>> plan = trainer.plan_memory(x, y, batch_size=512)
        >>> plan.peak_mb, plan.max_batch_size(8192), plan.microbatch_size(2048)
        (1437.2, 3310, 384)
    """

    batch_size: int
    base_mb: float
    fixed_mb: float
    activation_mb_per_sample: float
    pipeline_mb: float
    device_peak_mb: float | None
    probes: tuple[tuple[int, float], ...]
    seconds: float
    device_mb_per_sample: float | None = None
    least_pipeline_mb: float | None = None  # the pipeline reading one batch at a time (None: as pipeline_mb)

    @property
    def per_sample_mb(self) -> float:
        """What grows with the batch, per sample: the step's activations and the pipeline's batches."""
        return self.activation_mb_per_sample + self.pipeline_mb / self.batch_size

    @property
    def peak_mb(self) -> float:
        """The predicted peak anonymous memory of the process during `fit` at `batch_size`, in MiB."""
        return self.predict()

    def predict(
        self, batch_size: int | None = None, microbatch_size: int | None = None, least_pipeline: bool = False
    ) -> float:
        """The predicted peak (MiB) at `batch_size` (default: the planned one), in microbatches of
        `microbatch_size` samples if given (the pipeline still holds whole batches); `least_pipeline`: with
        the input pipeline reading one batch at a time (what a budget falls back to)."""
        b = self.batch_size if batch_size is None else int(batch_size)
        m = b if microbatch_size is None else min(int(microbatch_size), b)
        pipeline = self.least_pipeline_mb if least_pipeline and self.least_pipeline_mb is not None else self.pipeline_mb
        return self.base_mb + self.fixed_mb + self.activation_mb_per_sample * m + pipeline / self.batch_size * b

    def margin_mb(self, peak_mb: float) -> float:
        """How far a measured peak may lie above the prediction `peak_mb`: `MARGIN_FIXED_MB` plus
        `MARGIN_GROWTH` of the growth over `base_mb` (the allocator's pools vary that much from run to run)."""
        return MARGIN_FIXED_MB + MARGIN_GROWTH * max(0.0, peak_mb - self.base_mb)

    def fits(self, budget_mb: float, **predict_args: Any) -> bool:
        """True when the prediction plus its margin is at or under `budget_mb`."""
        peak = self.predict(**predict_args)
        return peak + self.margin_mb(peak) <= budget_mb

    def max_batch_size(self, budget_mb: float) -> int:
        """The largest batch size whose fit, margin included, stays at or under `budget_mb` (0: none)."""
        lo, hi = 0, 1
        while self.fits(budget_mb, batch_size=hi) and hi < 2**31:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(budget_mb, batch_size=mid) else (lo, mid)
        return lo

    def microbatch_size(self, budget_mb: float, batch_size: int | None = None, least_pipeline: bool = False) -> int:
        """The largest microbatch (at most the batch) under which a fit at `batch_size` stays, margin included,
        at or under `budget_mb`: the batch size itself when whole batches fit, 0 when not even one sample does."""
        b = self.batch_size if batch_size is None else int(batch_size)
        args = dict(batch_size=b, least_pipeline=least_pipeline)
        if not self.fits(budget_mb, microbatch_size=1, **args):
            return 0
        lo, hi = 1, b
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(budget_mb, microbatch_size=mid, **args) else (lo, mid - 1)
        return lo

    def choose(self, budget_mb: float) -> tuple[int, bool]:
        """What a budget runs: `(microbatch size, least pipeline)`. Whole batches with the pipeline as it is
        where they fit; else the pipeline reading one batch at a time (streamed arrays), and then the largest
        microbatch that fits; size 0 when not even one sample does."""
        size = self.microbatch_size(budget_mb)
        if size < self.batch_size and self.least_pipeline_mb is not None:
            return self.microbatch_size(budget_mb, least_pipeline=True), True
        return size, False

    def table(self, budget_mb: float | None = None) -> str:
        """A short table: the parts, the predicted peak, and what `budget_mb` allows."""
        sizes = ", ".join(str(b) for b, _ in self.probes)
        rows = [
            f"Memory plan for batches of {self.batch_size} (probes at {sizes}; {self.seconds:.2f} s)",
            f"  process before planning   {self.base_mb:9.1f} MiB",
            f"  fixed                     {self.fixed_mb:+9.1f} MiB   weights, optimizer, traced step, runtime",
            f"  per sample                {self.activation_mb_per_sample:+9.3f} MiB   activations and gradients",
            f"  input pipeline            {self.pipeline_mb:+9.1f} MiB   batches read ahead",
            f"  predicted peak            {self.peak_mb:9.1f} MiB",
        ]
        if self.device_peak_mb is not None:
            rows.append(f"  device peak               {self.device_peak_mb:9.1f} MiB")
        if budget_mb is not None:
            m, least = self.choose(budget_mb)
            reads = ", reading one batch at a time" if least else ""
            verdict = (
                "not even one sample fits"
                if m == 0
                else f"whole batches{reads}"
                if m >= self.batch_size
                else f"microbatches of {m}{reads}"
            )
            if m:
                verdict += f" (predicted {self.predict(microbatch_size=m, least_pipeline=least):.1f} MiB)"
            rows.append(f"  budget                    {budget_mb:9.1f} MiB   {verdict}")
            rows.append(f"  largest batch in budget   {self.max_batch_size(budget_mb):9d}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# -- the memory there is ------------------------------------------------------------------------------------


def _cgroup_room_mb() -> float | None:
    """What the process's cgroup (a container's memory limit) still allows, in MiB; None without a limit."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        return (int(limit) - usage) / 2**20
    return None


def available_mb() -> float:
    """Memory the process could still take, in MiB: the system's available memory (psutil), or what the
    container's cgroup limit leaves, whichever is less."""
    room = psutil.virtual_memory().available / 2**20
    cgroup = _cgroup_room_mb()
    return room if cgroup is None else min(room, cgroup)


def auto_budget_mb() -> float:
    """`memory_budget_mb="auto"`: the process's anonymous memory now plus what it could still take, less a
    margin (`MARGIN_MB`, or `MARGIN_SHARE` of that total if more)."""
    total = read_memory()[1] + available_mb()
    return total - max(MARGIN_MB, MARGIN_SHARE * total)


# -- probes ---------------------------------------------------------------------------------------------------


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


def _line(points: list[tuple[int, float]], floor_per_sample: float) -> tuple[float, float]:
    """(intercept, per sample) of a line over `(batch, peak)` points that no point lies above: the slope by
    least squares (at least `floor_per_sample`), the intercept raised to the highest point."""
    if len(points) >= 2:
        per = slope([p for _, p in points], [b for b, _ in points])
        per = max(floor_per_sample, per if per == per else 0.0)
    else:
        per = floor_per_sample
    return max(p - per * b for b, p in points), per


def _device_names() -> list[str]:
    return [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices("GPU")]


class _Probes:
    """Probe steps on `trainer` that leave no trace: values captured on entry and put back on exit.

    `peak(size)` runs the one-piece train step on a probe batch of `size` samples and returns the peak
    anonymous memory (MiB) during it; `peak(size, microbatch=m)` the microbatched step. Each step is traced on
    its first use, on a small batch, outside the measurement (`trace_mb` says what the first trace kept).
    """

    def __init__(self, trainer, batches) -> None:
        self.trainer, self.batches = trainer, batches
        self.spec = relax_spec(batches.element_spec)
        self.steps: dict = {}
        self.trace_mb = 0.0
        self.devices = _device_names()
        self.device_peak_mb = 0.0
        self.seconds_per_sample = 0.0  # of the last probe

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

        trainer = self.trainer
        step = self.steps.get(microbatch is not None)
        if step is None:
            if microbatch is None:

                def method():  # the one-piece step: microbatching would hide what a sample costs
                    return trainer.step_method("train", microbatched=False)

            else:
                pieces = Microbatches()
                pieces.set_size(microbatch)
                self.pieces = pieces

                def method():
                    return functools.partial(pieces.train_step, trainer)

            step = CompiledStep("train", method, trainer.strategy, trainer.jit_compile)
            before = read_memory()[1]
            first = 1 if microbatch is None else microbatch
            step.run_step(_probe_batch(self.batches, self.spec, first), self.spec)  # the trace
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
        t0 = time.perf_counter()
        with PeakMemory() as peak:
            step.run_step(data, self.spec)
        self.seconds_per_sample = (time.perf_counter() - t0) / size
        del data
        if self.devices:
            info = tf.config.experimental.get_memory_info
            self.device_peak_mb = sum(info(d)["peak"] for d in self.devices) / 2**20
        return peak.mb - self.held_mb


def make_plan(trainer, batches, batch_size: int | None = None, budget_mb: float | None = None) -> MemoryPlan:
    """Probe `trainer`'s train step on batches of `batches` and return the `MemoryPlan` for `batch_size`
    (default: the batches' own). With `budget_mb`, no probe predicted to take more than `PROBE_SHARE` of what
    the budget leaves (less the least pipeline and `MARGIN_FIXED_MB`) is run: an allocator that keeps a pool
    (oneDNN's does) keeps what the probes took, and the fit must still fit beside it."""
    t0 = time.perf_counter()
    batch_size = int(batch_size or batches.batch_size or _first_dim(batches.step_spec) or 32)
    trainer.build(batches.element_spec)
    row_bytes = _row_bytes(relax_spec(batches.element_spec))
    row_mb = row_bytes / 2**20
    points: list[tuple[int, float]] = []
    device_points: list[tuple[int, float]] = []
    with _Probes(trainer, batches) as probes:
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
                intercept, per = _line(points, row_mb)
                if intercept + per * size + probes.held_mb > limit_mb:
                    break
            points.append((size, probes.peak(size)))
            if probes.devices:
                device_points.append((size, probes.device_peak_mb))
    if os.environ.get("SAFETRAIN_PLAN_DEBUG"):
        left = read_memory()[1] - probes.base_mb
        print(f"plan debug: base {probes.base_mb:.1f} trace {probes.trace_mb:.1f} left {left:.1f}")
    floor = row_mb
    if len(points) == 1:  # one probe (a budget stopped the next): all it grew beyond the trace, per sample
        size, peak = points[0]
        floor = max(row_mb, (peak - probes.base_mb - probes.trace_mb) / size)
    intercept, per = _line(points, floor)
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
        seconds=time.perf_counter() - t0,
        device_mb_per_sample=device_per,
    )


def check_microbatches(trainer, batches, plan: MemoryPlan, budget_mb: float, size: int, least: bool) -> int:
    """The microbatch size the budget allows, from the step the fit will run: the microbatched step is probed
    at the plan's batch size in microbatches of a quarter and a half of `size` (ascending: an allocator that
    keeps a pool, as oneDNN's does, only grows), and the largest size at most `size` whose peak on the line
    through them, plus the pipeline and the plan's margin, stays at or under `budget_mb` is returned (0: none).
    A probe predicted to exceed the budget is not run."""
    pipeline = plan.least_pipeline_mb if least and plan.least_pipeline_mb is not None else plan.pipeline_mb
    room = budget_mb - pipeline - MEASURED_MARGIN_MB - MARGIN_GROWTH * max(0.0, budget_mb - plan.base_mb)
    points: list[tuple[int, float]] = []
    with _Probes(trainer, batches) as probes:
        for m in sorted({max(1, size // 4), max(1, size // 2)}):
            if points:
                intercept, per = _line(points, plan.activation_mb_per_sample)
                if intercept + per * m > room:
                    break
            points.append((m, probes.peak(plan.batch_size, microbatch=m)))
            if os.environ.get("SAFETRAIN_PLAN_DEBUG"):
                print(f"plan debug: microbatches of {m}: peak {points[-1][1]:.1f}, room {room:.1f}")
    intercept, per = _line(points, plan.activation_mb_per_sample)
    if intercept + per * points[0][0] > room:
        return 0
    return max(1, min(size, int((room - intercept) // per) if per > 0 else size))


def _first_dim(spec) -> int | None:
    for s in tree.flatten(spec):
        shape = getattr(s, "shape", None)
        if shape is not None and shape.rank:
            return shape[0]
    return None


# -- the budget --------------------------------------------------------------------------------------------


def resolve_budget(budget: float | str | None) -> float | None:
    """A `memory_budget_mb` argument as MiB (None: no budget)."""
    if budget is None:
        return None
    if budget == "auto":
        return auto_budget_mb()
    return float(budget)


def check_budget_argument(budget: Any) -> None:
    """`memory_budget_mb` must be a positive number, "auto" or None."""
    if budget is None or budget == "auto":
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) or budget <= 0:
        raise ValueError(f'`memory_budget_mb` must be a positive number of MiB, "auto" or None, got {budget!r}.')


def apply_budget(trainer, batches, verbose: int = 0) -> MemoryPlan:
    """Before `fit`'s first step: plan (again when the input's signature, batch size or model changed), and
    run each batch as microbatches sized to fit the budget where whole batches would not; refuse, with the
    numbers, when not even one sample fits."""
    budget = resolve_budget(trainer.memory_budget_mb)
    assert budget is not None
    # The argument, not its value: "auto" resolves to a slightly different number each time.
    key = (
        id(trainer.model),
        relax_spec(batches.element_spec),
        batches.batch_size,
        trainer.rehydrations,
        trainer.memory_budget_mb,
    )
    if trainer._plan_key == key:
        plan, (size, least) = trainer.memory_plan, trainer._plan_choice
    else:
        plan = make_plan(trainer, batches, budget_mb=budget)
        size, least = plan.choose(budget)
        if 0 < size < plan.batch_size and not trainer.has_custom("train_step"):
            predicted = size
            size = check_microbatches(trainer, batches, plan, budget, size, least)  # measured, not predicted
            if size == 0:
                raise MemoryBudgetExceeded(
                    f"memory_budget_mb={budget:.0f}: microbatches of {predicted} were predicted to fit, but the "
                    "microbatched step, measured, does not (with the input pipeline and the margin). Raise the "
                    "budget, or use a smaller batch_size or model.",
                    plan=plan,
                )
        trainer.memory_plan, trainer._plan_key, trainer._plan_choice = plan, key, (size, least)
        if verbose and os.environ.get("SAFETRAIN_QUIET") != "1":
            print(plan.table(budget), flush=True)
            if 0 < size < plan.batch_size:
                print(f"  measured                  microbatches of {size}", flush=True)
    if size == 0:
        one = plan.predict(microbatch_size=1, least_pipeline=least)
        raise MemoryBudgetExceeded(
            f"memory_budget_mb={budget:.0f}: not even one sample per step fits. Predicted for microbatches of 1 "
            f"sample: {one:.0f} MiB, plus a margin of {plan.margin_mb(one):.0f} (the process held "
            f"{plan.base_mb:.0f} MiB before planning, the step {plan.fixed_mb:+.0f} MiB whatever the batch, "
            f"{plan.activation_mb_per_sample:.3f} MiB per sample, the input pipeline for batches of "
            f"{plan.batch_size} {plan.least_pipeline_mb if least else plan.pipeline_mb:+.0f} MiB). Raise the "
            "budget, or use a smaller batch_size or model.",
            plan=plan,
        )
    if size < plan.batch_size and trainer.has_custom("train_step"):
        raise MemoryBudgetExceeded(
            f"memory_budget_mb={budget:.0f}: whole batches of {plan.batch_size} are predicted to peak at "
            f"{plan.peak_mb:.0f} MiB, and microbatches of {size} would fit, but this model or trainer overrides "
            "train_step, which cannot be split into microbatches; use batch_size <= "
            f"{plan.max_batch_size(budget)} or a larger budget.",
            plan=plan,
        )
    if batches.reader is not None:
        batches.reader.read_ahead_bytes = 0 if least else READ_AHEAD_BYTES
    if size < plan.batch_size:
        chosen = size if trainer.user_microbatch_size is None else min(size, trainer.user_microbatch_size)
        if chosen != trainer.progress.microbatch_size:
            trainer.set_microbatch_size(chosen)
    elif trainer.progress.microbatch_size != trainer.user_microbatch_size:
        trainer.clear_microbatch_size(trainer.user_microbatch_size)
    return plan
