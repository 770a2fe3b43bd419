"""safetrain's exceptions: each subclasses the built-in a caller would already catch."""

from __future__ import annotations

__all__ = ["SafetrainError", "ConfigurationError"]


class SafetrainError(Exception):
    """Base class of every exception safetrain raises on purpose."""


class ConfigurationError(SafetrainError, ValueError):
    """The trainer cannot run as configured (e.g. no loss or optimizer); raised before any step."""
