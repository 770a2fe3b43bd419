"""The doctor: run any Keras training script, unmodified, and say why its memory grows.

    python -m safetrain doctor train.py --epochs 20          # the script's own arguments follow it
    python -m safetrain doctor --json report.json --plot memory.png --fail-on-leak train.py

The script runs in a child process with instrumentation installed before its first line:

- every `tf.function` (the script's own and Keras's) reports each trace with the shapes and dtypes of its
  arguments, so a retrace names the function and the argument whose shape varied;
- `Model.fit` (and `SafeTrainer.fit`) get one extra callback that reads memory at every epoch end and
  watches stateful layers; `Model.predict` and every model constructed are timed and sampled too;
- a census of live Python objects is taken once early (after the first epoch, the 2nd model or the 5th
  predict) and once at the end, to tell Python-side accumulation from allocator growth.

Then the parent diagnoses (`diagnose`, a pure function of the recorded events) and prints each cause found
with its evidence and the safetrain change that fixes it.

`instrument` is the child side (started as `python -m safetrain.doctor --child ...`), `report` the parent
side. Neither imports TensorFlow until the script does.

Example:
    >>> report = run("examples/leaky/retracing.py")
    >>> [c["cause"] for c in report["causes"]]
    ['retracing']
"""

from __future__ import annotations

# `census`, `child_main` and the thresholds stay public outside `__all__`, as before the split (`X as X`:
# an explicit re-export).
from safetrain.doctor.instrument import census as census
from safetrain.doctor.instrument import child_main as child_main
from safetrain.doctor.report import CAUSES, diagnose, format_report, main, run
from safetrain.doctor.report import EPOCH_SLOPE_MB as EPOCH_SLOPE_MB
from safetrain.doctor.report import MIN_MODELS as MIN_MODELS
from safetrain.doctor.report import MIN_PREDICTS as MIN_PREDICTS
from safetrain.doctor.report import MIN_RETRACES as MIN_RETRACES
from safetrain.doctor.report import MODEL_SLOPE_MB as MODEL_SLOPE_MB
from safetrain.doctor.report import OBJECT_GROWTH_MB as OBJECT_GROWTH_MB
from safetrain.doctor.report import PREDICT_GROWTH_MB as PREDICT_GROWTH_MB
from safetrain.doctor.report import PREDICT_SLOPE_MB as PREDICT_SLOPE_MB
from safetrain.doctor.report import UNEXPLAINED_GROWTH_MB as UNEXPLAINED_GROWTH_MB

__all__ = ["run", "diagnose", "format_report", "main", "CAUSES"]
