"""The doctor: run any Keras training script, unmodified, and say why its memory grows.

    python -m safetrain doctor train.py --epochs 20          # the script's own arguments follow it
    python -m safetrain doctor --json report.json --plot memory.png --fail-on-leak train.py

The script runs in a child process with instrumentation installed before its first line:

- every `tf.function` (the script's own and Keras's) reports each trace with the shapes and dtypes of its
  arguments, so a retrace names the function and the argument whose shape varied;
- `Model.fit` (and `SafeTrainer.fit`) get one extra callback that reads memory at every epoch end and
  watches stateful layers; `compile`, `predict`, the `*_on_batch` calls, every model constructed, eager
  `tape.gradient` calls, calls of the script's own tf.functions and arrays handed to `fit` or
  `tf.data.Dataset.from_tensor_slices` are recorded too, and memory is read every 0.1 s between them;
- warm-up ends at the first repetition of the script's loop (the first epoch, 2nd model or compile, 5th
  predict, batch, eager gradient, eager model call or call of one of its tf.functions); a census of live
  objects (by the bytes they hold: arrays, tensors, variables) is taken once memory grows after that, and
  again at the end, so a flat script pays for none.

Then the parent diagnoses (`safetrain.diagnostics.diagnose`, a pure function of the record, the same rules
`LeakDetector` uses) and prints each cause found with its evidence and the safetrain change that fixes it;
problems that do not grow memory are warnings.

`instrument` is the child side (started as `python -m safetrain.doctor --child ...`), `report` the parent
side. Neither imports TensorFlow until the script does.

Example:
    >>> report = run("examples/leaky/retracing.py")
    >>> [c["cause"] for c in report["causes"]]
    ['retracing']
"""

from __future__ import annotations

# `census`, `child_main` and the thresholds stay public outside `__all__`, as before the split (`X as X`:
# an explicit re-export). The rules and thresholds are `safetrain.diagnostics.rules`'s, shared with LeakDetector.
from safetrain.diagnostics.rules import EPOCH_SLOPE_MB as EPOCH_SLOPE_MB
from safetrain.diagnostics.rules import MIN_MODELS as MIN_MODELS
from safetrain.diagnostics.rules import MIN_PREDICTS as MIN_PREDICTS
from safetrain.diagnostics.rules import MIN_RETRACES as MIN_RETRACES
from safetrain.diagnostics.rules import MODEL_SLOPE_MB as MODEL_SLOPE_MB
from safetrain.diagnostics.rules import OBJECT_GROWTH_MB as OBJECT_GROWTH_MB
from safetrain.diagnostics.rules import PREDICT_GROWTH_MB as PREDICT_GROWTH_MB
from safetrain.diagnostics.rules import PREDICT_SLOPE_MB as PREDICT_SLOPE_MB
from safetrain.diagnostics.rules import UNEXPLAINED_GROWTH_MB as UNEXPLAINED_GROWTH_MB
from safetrain.doctor.instrument import census as census
from safetrain.doctor.instrument import child_main as child_main
from safetrain.doctor.report import CAUSES, WARNINGS, diagnose, format_report, main, run

__all__ = ["run", "diagnose", "format_report", "main", "CAUSES", "WARNINGS"]
