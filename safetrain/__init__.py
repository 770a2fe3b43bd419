"""safetrain: a drop-in, memory-safe training loop for Keras 3 on TensorFlow.

    from safetrain import SafeTrainer, ClearSession
    history = SafeTrainer(model, policies=[ClearSession(every_n_epochs=5)]).fit(x, y, epochs=50)
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from safetrain import hooks  # noqa: E402
from safetrain import faults  # noqa: E402
from safetrain import distributed  # noqa: E402
from safetrain.distributed import WorkerFailure  # noqa: E402
from safetrain.errors import ConfigurationError, OutOfMemory, OutOfMemoryWarning, SafetrainError  # noqa: E402
from safetrain.isolation import IsolatedProcessError, RemoteTraceback, run_isolated  # noqa: E402
from safetrain.memory import MemoryLog, MemoryMonitor, MemorySample  # noqa: E402
from safetrain.checks import DataError  # noqa: E402
from safetrain.checkpoint import CheckpointCorrupt, CheckpointMismatch, CheckpointWarning  # noqa: E402
from safetrain.policies import (  # noqa: E402
    Checkpoint,
    ClearSession,
    GarbageCollect,
    LeakDetector,
    LeakWarning,
    MemoryBudget,
    MemoryBudgetExceeded,
    Policy,
    ResetStates,
    NonFiniteLoss,
    RetraceError,
    RetraceGuard,
    StopOnNaN,
    TrimMalloc,
)
from safetrain.progress import ProgressBar  # noqa: E402
from safetrain.snapshot import Snapshot, SnapshotMismatch  # noqa: E402
from safetrain.trainer import SafeTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SafeTrainer",
    "WorkerFailure",
    "distributed",
    "Policy",
    "ResetStates",
    "ClearSession",
    "GarbageCollect",
    "TrimMalloc",
    "MemoryBudget",
    "RetraceGuard",
    "LeakDetector",
    "Checkpoint",
    "StopOnNaN",
    "Snapshot",
    "run_isolated",
    "hooks",
    "MemoryLog",
    "MemoryMonitor",
    "MemorySample",
    "ProgressBar",
    "SafetrainError",
    "ConfigurationError",
    "MemoryBudgetExceeded",
    "RetraceError",
    "SnapshotMismatch",
    "LeakWarning",
    "NonFiniteLoss",
    "CheckpointCorrupt",
    "CheckpointMismatch",
    "CheckpointWarning",
    "IsolatedProcessError",
    "OutOfMemory",
    "OutOfMemoryWarning",
    "DataError",
    "faults",
    "RemoteTraceback",
    "__version__",
]
