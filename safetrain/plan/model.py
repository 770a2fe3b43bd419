"""`MemoryPlan`: what a fit, an evaluation or a prediction at a batch size will hold, and what a budget allows."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["MemoryPlan", "MARGIN_FIXED_MB", "MARGIN_GROWTH"]

#: what a budget keeps free beyond the prediction: the fixed part and the share of the growth
MARGIN_FIXED_MB, MARGIN_GROWTH = 32.0, 0.10


_WHAT = {"train": "training", "test": "evaluation", "predict": "prediction"}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a fit (or an evaluation, or a prediction: `kind`) at `batch_size` will hold, in MiB of anonymous
    memory (RssAnon) of the whole process.

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
        kind: the step planned: "train" (`fit`), "test" (`evaluate`, validation) or "predict".
        outputs_mb: what `predict` keeps of the outputs (one array for all samples), whatever the batch size.
        allocator_probes: `(batch size, MiB)`: the peak of TensorFlow's CPU allocator in each probe step over
            what it held before it (None where it keeps no statistics). Not part of the prediction: what a pool
            allocator takes from the process is more than its peak, by an amount that differs by model.

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
    kind: str = "train"
    outputs_mb: float = 0.0
    allocator_probes: tuple[tuple[int, float | None], ...] = ()

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
        step = self.base_mb + self.fixed_mb + self.activation_mb_per_sample * m
        return step + pipeline / self.batch_size * b + self.outputs_mb

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
            f"Memory plan for {_WHAT[self.kind]} batches of {self.batch_size} (probes at {sizes}; "
            f"{self.seconds:.2f} s)",
            f"  process before planning   {self.base_mb:9.1f} MiB",
            f"  fixed                     {self.fixed_mb:+9.1f} MiB   weights, optimizer, traced step, runtime",
            f"  per sample                {self.activation_mb_per_sample:+9.3f} MiB   activations"
            + (" and gradients" if self.kind == "train" else ""),
            f"  input pipeline            {self.pipeline_mb:+9.1f} MiB   batches read ahead",
        ]
        if self.outputs_mb:
            rows.append(f"  outputs kept              {self.outputs_mb:+9.1f} MiB   one array for all samples")
        rows.append(f"  predicted peak            {self.peak_mb:9.1f} MiB")
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
                else f"{'microbatches' if self.kind == 'train' else 'slices'} of {m}{reads}"
            )
            if m:
                verdict += f" (predicted {self.predict(microbatch_size=m, least_pipeline=least):.1f} MiB)"
            rows.append(f"  budget                    {budget_mb:9.1f} MiB   {verdict}")
            rows.append(f"  largest batch in budget   {self.max_batch_size(budget_mb):9d}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()
