"""The budget: how much memory there is (`"auto"`), and what `memory_budget_mb` does before the first step.

SafeTrainer(model, memory_budget_mb=4096).fit(x, y, batch_size=1024)   # microbatches if it would not fit
SafeTrainer(model, memory_budget_mb="auto").predict(x, batch_size=8192) # slices of each batch if need be
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import psutil

from safetrain.data.specs import relax_spec
from safetrain.data.streaming import READ_AHEAD_BYTES
from safetrain.diagnostics import read_memory
from safetrain.errors import MemoryBudgetExceeded
from safetrain.plan.model import MemoryPlan
from safetrain.plan.probes import check_microbatches, make_plan

__all__ = ["available_mb", "auto_budget_mb", "resolve_budget", "check_budget_argument", "apply_budget", "MARGIN_MB"]

#: the least that "auto" keeps free, and the share of the process's memory it keeps free beyond that
MARGIN_MB, MARGIN_SHARE = 256.0, 0.10


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


_PIECES = {"train": "microbatches", "test": "slices", "predict": "slices"}


def apply_budget(trainer, batches, verbose: int = 0, kind: str = "train") -> MemoryPlan:
    """Before the first step of `fit` ("train"), `evaluate` or validation ("test"), or `predict`: plan the
    step (again when the input's signature, batch size or model changed) and, where whole batches would not
    fit the budget, run each batch in microbatches (training: gradients summed into one update) or slices
    (evaluation and prediction: outputs put back together) sized to fit; refuse, with the numbers, when not
    even one sample fits, or when the step that would need splitting is a custom one."""
    budget = resolve_budget(trainer.memory_budget_mb)
    assert budget is not None
    pieces = _PIECES[kind]
    # The argument, not its value: "auto" resolves to a slightly different number each time.
    key = (
        id(trainer.model),
        relax_spec(batches.element_spec),
        batches.batch_size,
        trainer.rehydrations,
        trainer.memory_budget_mb,
    )
    custom = trainer.has_custom(f"{kind}_step")
    known = trainer.plan_state.get(kind)
    if known is not None and known[0] == key:
        plan, (size, least) = trainer.memory_plans[kind], known[1]
    else:
        plan = make_plan(trainer, batches, budget_mb=budget, kind=kind)
        size, least = plan.choose(budget)
        if 0 < size < plan.batch_size and not custom:
            predicted = size
            size = check_microbatches(trainer, batches, plan, budget, size, least)  # measured, not predicted
            if size == 0:
                raise MemoryBudgetExceeded(
                    f"memory_budget_mb={budget:.0f}: {pieces} of {predicted} were predicted to fit, but the step "
                    f"in {pieces}, measured, does not (with the input pipeline and the margin). Raise the budget, "
                    "or use a smaller batch_size or model.",
                    plan=plan,
                )
        trainer.memory_plans[kind], trainer.plan_state[kind] = plan, (key, (size, least))
        if verbose and os.environ.get("SAFETRAIN_QUIET") != "1":
            print(plan.table(budget), flush=True)
            if 0 < size < plan.batch_size:
                print(f"  measured                  {pieces} of {size}", flush=True)
    if size == 0:
        one = plan.predict(microbatch_size=1, least_pipeline=least)
        raise MemoryBudgetExceeded(
            f"memory_budget_mb={budget:.0f}: not even one sample per step fits. Predicted for {pieces} of 1 "
            f"sample: {one:.0f} MiB, plus a margin of {plan.margin_mb(one):.0f} (the process held "
            f"{plan.base_mb:.0f} MiB before planning, the step {plan.fixed_mb:+.0f} MiB whatever the batch, "
            f"{plan.activation_mb_per_sample:.3f} MiB per sample, the input pipeline for batches of "
            f"{plan.batch_size} {plan.least_pipeline_mb if least else plan.pipeline_mb:+.0f} MiB"
            + (f", the outputs kept {plan.outputs_mb:+.0f} MiB" if plan.outputs_mb else "")
            + "). Raise the budget, or use a smaller batch_size or model.",
            plan=plan,
        )
    if size < plan.batch_size and custom:
        raise MemoryBudgetExceeded(
            f"memory_budget_mb={budget:.0f}: whole batches of {plan.batch_size} are predicted to peak at "
            f"{plan.peak_mb:.0f} MiB, and {pieces} of {size} would fit, but this model or trainer overrides "
            f"{kind}_step, which cannot be split into {pieces}; use batch_size <= "
            f"{plan.max_batch_size(budget)} or a larger budget.",
            plan=plan,
        )
    if batches.reader is not None:
        batches.reader.read_ahead_bytes = 0 if least else READ_AHEAD_BYTES
    if kind != "train":
        trainer.set_slice_size(kind, size if size < plan.batch_size else None)
    elif size < plan.batch_size:
        chosen = size if trainer.user_microbatch_size is None else min(size, trainer.user_microbatch_size)
        if chosen != trainer.progress.microbatch_size:
            trainer.set_microbatch_size(chosen)
    elif trainer.progress.microbatch_size != trainer.user_microbatch_size:
        trainer.clear_microbatch_size(trainer.user_microbatch_size)
    return plan
