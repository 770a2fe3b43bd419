"""Policies: small objects that decide *when* the trainer acts on memory; the trainer knows *how*.

A policy overrides the hooks it needs. Each hook receives the trainer (and, where it applies, the
latest memory sample); `every_n_batches` asks for `on_batch_end` every that many training steps: the
trainer then ends its compiled chunks on those steps, so the hook sees exactly that step. Policies
without `every_n_batches` cost nothing per step.

Example:
    >>> class PrintRSS(Policy):
    ...     def on_epoch_end(self, trainer, epoch, logs, sample):
    ...         print(epoch, sample.rss_mb)
    >>> SafeTrainer(model, policies=[PrintRSS()]).fit(x, y, epochs=3)
"""

from __future__ import annotations

from safetrain.policies.base import Policy, PolicyList
from safetrain.policies.memory import ClearSession, GarbageCollect, LeakDetector, MemoryBudget, TrimMalloc
from safetrain.policies.training import Checkpoint, ResetStates, RetraceGuard, StopOnNaN

__all__ = [
    "Policy",
    "PolicyList",
    "ResetStates",
    "ClearSession",
    "GarbageCollect",
    "TrimMalloc",
    "MemoryBudget",
    "RetraceGuard",
    "LeakDetector",
    "Checkpoint",
    "StopOnNaN",
]
