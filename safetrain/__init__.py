"""safetrain: a drop-in, memory-safe training loop for Keras 3 on TensorFlow.

from safetrain import SafeTrainer, ClearSession
history = SafeTrainer(model, policies=[ClearSession(every_n_epochs=5)]).fit(x, y, epochs=50)
"""

from __future__ import annotations

# Names are imported on first use (PEP 562), so that `python -m safetrain doctor` and other light entry
# points start without importing TensorFlow; `from safetrain import SafeTrainer` works as always.
_EXPORTS = {
    "hooks": None,
    "faults": None,
    "distributed": None,
    "doctor": None,
    "plots": None,
    **{
        name: "errors"
        for name in (
            "SafetrainError",
            "ConfigurationError",
            "OutOfMemory",
            "OutOfMemoryWarning",
            "StepError",
            "DataError",
            "CheckpointCorrupt",
            "CheckpointMismatch",
            "CheckpointWarning",
            "SnapshotMismatch",
            "MemoryBudgetExceeded",
            "RetraceError",
            "LeakWarning",
            "NonFiniteLoss",
            "WorkerFailure",
            "IsolatedProcessError",
            "RemoteTraceback",
            "TrainingPreempted",
        )
    },
    "run_isolated": "isolation",
    "MemoryLog": "memory",
    "MemoryMonitor": "memory",
    "MemorySample": "memory",
    **{
        name: "policies"
        for name in (
            "Checkpoint",
            "ClearSession",
            "GarbageCollect",
            "LeakDetector",
            "MemoryBudget",
            "Policy",
            "ResetStates",
            "RetraceGuard",
            "StopOnNaN",
            "TrimMalloc",
        )
    },
    "ProgressBar": "progress",
    "Snapshot": "snapshot",
    "MemoryPlan": "plan",
    "TrainingProgress": "state",
    "SafeTrainer": "trainer",
    "install": "routing",
    "uninstall": "routing",
    "installed": "routing",
    "trainer_of": "routing",
}


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'safetrain' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name is None:
        value = importlib.import_module(f"safetrain.{name}")
    else:
        value = getattr(importlib.import_module(f"safetrain.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "SafeTrainer",
    "install",
    "uninstall",
    "installed",
    "trainer_of",
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
    "MemoryPlan",
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
    "StepError",
    "TrainingProgress",
    "faults",
    "doctor",
    "plots",
    "RemoteTraceback",
    "TrainingPreempted",
    "__version__",
]
