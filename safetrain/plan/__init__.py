"""The memory plan: the peak a fit (or an evaluation, or a prediction) will reach at a batch size, from a few
probe steps that leave no trace, and the budget that uses it.

    plan = trainer.plan_memory(x, y, batch_size=256)
    print(plan)                       # what does not grow with the batch, what does, the predicted peak
    plan.max_batch_size(4096)         # the largest batch whose fit stays under 4096 MiB of process memory
    SafeTrainer(model, memory_budget_mb=4096).fit(x, y, batch_size=1024)   # microbatches if it would not fit

`model` holds `MemoryPlan` (the model of memory and what a budget allows), `probes` the probe steps and the
line through their peaks, `budget` the memory there is and what `memory_budget_mb` does before a first step.
"""

from safetrain.plan.budget import (
    MARGIN_MB,
    MARGIN_SHARE,
    apply_budget,
    auto_budget_mb,
    available_mb,
    check_budget_argument,
    resolve_budget,
)
from safetrain.plan.model import MARGIN_FIXED_MB, MARGIN_GROWTH, MemoryPlan
from safetrain.plan.probes import KINDS, batch_size_of, check_microbatches, make_plan, probe_sizes

__all__ = [
    "MemoryPlan",
    "make_plan",
    "check_microbatches",
    "probe_sizes",
    "batch_size_of",
    "available_mb",
    "auto_budget_mb",
    "resolve_budget",
    "check_budget_argument",
    "apply_budget",
    "KINDS",
    "MARGIN_MB",
    "MARGIN_SHARE",
    "MARGIN_FIXED_MB",
    "MARGIN_GROWTH",
]
