"""safetrain: a drop-in, memory-safe training loop for Keras 3 on TensorFlow.

    from safetrain import SafeTrainer
    history = SafeTrainer(model).fit(x, y, epochs=10, validation_data=(xv, yv))
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from safetrain.errors import ConfigurationError, SafetrainError  # noqa: E402
from safetrain.memory import MemoryLog, MemoryMonitor, MemorySample  # noqa: E402
from safetrain.policies import Policy  # noqa: E402
from safetrain.progress import ProgressBar  # noqa: E402
from safetrain.trainer import SafeTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SafeTrainer",
    "Policy",
    "MemoryLog",
    "MemoryMonitor",
    "MemorySample",
    "ProgressBar",
    "SafetrainError",
    "ConfigurationError",
    "__version__",
]
