"""Every exception and warning safetrain raises; each subclasses the built-in a caller would already catch.

    try:
        SafeTrainer(model, policies=[MemoryBudget(4000, action="raise")]).fit(x, y, epochs=50)
    except safetrain.MemoryBudgetExceeded as e:
        print(e.memory.series("rss_mb"))

This module imports nothing heavy (no TensorFlow), so the doctor's parent process and `import safetrain`
stay fast; `step_error` builds its TensorFlow-derived classes on demand.
"""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "step_error",
]


class SafetrainError(Exception):
    """Base class of every exception safetrain raises on purpose."""


class ConfigurationError(SafetrainError, ValueError):
    """The trainer cannot run as configured (e.g. no loss or optimizer); raised before any step."""


class OutOfMemory(SafetrainError, ValueError):
    """Training ran out of memory and could not recover (a custom train_step, or not even one sample fits)."""


class OutOfMemoryWarning(UserWarning):
    """A training step ran out of memory and was retried in smaller microbatches."""


class StepError(SafetrainError):
    """A compiled step failed on a batch: the message names the call, the epoch and the batch.

    The failure may lie in the data (a label out of range, a generator that raised, a NaN caught by
    `check_inputs`) or in the model; safetrain cannot tell which, so it says where. Each instance is also
    an instance of the TensorFlow error class it replaces (`tf.errors.InvalidArgumentError`, ...), so code
    that catches those around `model.fit` catches them around `SafeTrainer.fit` too; the original is chained.

    Example:
        >>> try:
        ...     trainer.fit(dataset, epochs=3)
        ... except tf.errors.InvalidArgumentError as e:   # also a safetrain.StepError
        ...     print(e.message)                          # "fit: epoch index 0, batch 4 failed: ..."
    """


#: The name this class had before it was known that a failing step may be the model's fault as well.
DataError = StepError

_STEP_ERROR_CLASSES: dict[type, type] = {}


def step_error(error: BaseException, message: str) -> Exception:
    """A `StepError` carrying `message` that is also an instance of `type(error)` (a TensorFlow `OpError`)."""
    base = type(error)
    try:
        import tensorflow as tf

        op_error = issubclass(base, tf.errors.OpError) and base is not tf.errors.OpError
    except ImportError:  # pragma: no cover - safetrain needs TensorFlow to train at all
        op_error = False
    if not op_error:
        return StepError(message)
    cls = _STEP_ERROR_CLASSES.get(base)
    if cls is None:
        cls = _STEP_ERROR_CLASSES[base] = type(
            f"Step{base.__name__}", (StepError, base), {"__module__": __name__, "__doc__": StepError.__doc__}
        )
    op: Any = getattr(error, "_op", None)
    node_def: Any = getattr(error, "_node_def", None)
    return cls(node_def, op, message)


class CheckpointCorrupt(SafetrainError, ValueError):
    """A checkpoint's files are missing, truncated or fail their checksum."""


class CheckpointMismatch(SafetrainError, ValueError):
    """A checkpoint was written for another model (its variables do not match this one's)."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written (training goes on) or was skipped as corrupt."""


class SnapshotMismatch(SafetrainError, ValueError):
    """The rebuilt model's variables do not line up with the snapshot (another model, another config)."""


class MemoryBudgetExceeded(SafetrainError, ValueError):
    """Resident memory went over a `MemoryBudget(action="raise")` (`.memory` holds the series so far), or
    `SafeTrainer(memory_budget_mb=...)` cannot fit even one sample per step (`.plan` holds the `MemoryPlan`)."""

    def __init__(self, message: str, memory_log: Any = None, sample: Any = None, plan: Any = None) -> None:
        super().__init__(message)
        self.memory = memory_log
        self.sample = sample
        self.plan = plan


class RetraceError(SafetrainError, ValueError):
    """A step was traced more often than a `RetraceGuard` allows; the message names both signatures."""


class LeakWarning(UserWarning):
    """`LeakDetector` found memory growing epoch after epoch; the message holds the diagnosis."""


class NonFiniteLoss(UserWarning):
    """`StopOnNaN` stopped training; the message says where and what was rolled back."""


class WorkerFailure(SafetrainError, RuntimeError):
    """Another worker of a multi-worker run failed or stopped answering, so this one stopped as well.

    The training state at the last completed checkpoint is intact; restart every worker (a `Checkpoint`
    policy resumes them where they stopped).
    """


class IsolatedProcessError(SafetrainError, RuntimeError):
    """The isolated child process died without returning (killed by a signal, or exited abnormally)."""


class RemoteTraceback(Exception):
    """The child's traceback, attached as `__cause__` of an exception re-raised in the parent."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\n(traceback in the isolated process)\n{self.text}"


class TrainingPreempted(SystemExit):
    """`fit` stopped for SIGTERM (a scheduler's preemption): the step in flight finished, a checkpoint of
    that step was written where a `Checkpoint` policy is set (`checkpoint`: its path, or None), callbacks and
    policies heard `on_train_end`. A `SystemExit` with status 143 (128 + SIGTERM), which schedulers read as
    stopped by SIGTERM; catch it to do more before exiting."""

    def __init__(self, code: int, checkpoint: str | None = None) -> None:
        super().__init__(code)
        self.checkpoint = checkpoint


# -- control flow inside the loop (not errors: how a pass, an epoch or a run ends) ------------------------


class StopPass(Exception):
    """End the current pass (a training epoch, an evaluation or a prediction) after the chunk that just ran."""


class StopTraining(Exception):
    """End `fit` after the current epoch's end-of-epoch stage (callbacks and policies still see it)."""
