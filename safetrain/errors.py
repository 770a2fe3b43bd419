"""safetrain's exceptions: each subclasses the built-in a caller would already catch."""

from __future__ import annotations

__all__ = ["SafetrainError", "ConfigurationError", "OutOfMemory", "OutOfMemoryWarning"]


class SafetrainError(Exception):
    """Base class of every exception safetrain raises on purpose."""


class ConfigurationError(SafetrainError, ValueError):
    """The trainer cannot run as configured (e.g. no loss or optimizer); raised before any step."""


class OutOfMemory(SafetrainError, ValueError):
    """Training ran out of memory and could not recover (a custom train_step, or not even one sample fits)."""


class OutOfMemoryWarning(UserWarning):
    """A training step ran out of memory and was retried in smaller microbatches."""
