"""A fit of a small image CNN in a fresh process, for the memory-budget tests: `python budget_fit.py MODE [RUN]`.

MODE "free": no budget; prints the anonymous memory before `fit` and the peak during it. MODE a number: a
budget of that many MiB over the anonymous memory before `fit` (`memory_budget_mb`); prints the same, and
the microbatch size the budget chose. One JSON line on stdout either way, with the History's losses.
RUN "predict" or "evaluate": the same for `predict` (a checksum of the outputs) or `evaluate` (the loss) of
the untrained model (predict: on the images twice, in batches of 512; evaluate: batches of 256), and the
slice size the budget chose.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from safetrain import MemoryBudgetExceeded, SafeTrainer  # noqa: E402
from safetrain.diagnostics import PeakMemory, read_memory  # noqa: E402

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x, y = rng.random((256, 48, 48, 3), dtype=np.float32), rng.integers(0, 4, 256)
model = keras.Sequential(
    [
        keras.Input((48, 48, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ]
)
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
mode = sys.argv[1]
run = sys.argv[2] if len(sys.argv) > 2 else "fit"
base = read_memory()[1]
budget = None if mode == "free" else base + float(mode)
trainer = SafeTrainer(model, memory_budget_mb=budget)
out = dict(base=base, budget=budget)
try:
    if run == "fit":
        with PeakMemory() as peak:
            history = trainer.fit(x, y, batch_size=128, epochs=2, verbose=0)
        out.update(peak=peak.mb, loss=history.history["loss"], microbatch=trainer.progress.microbatch_size)
    elif run == "predict":
        with PeakMemory() as peak:
            outputs = trainer.predict(np.concatenate([x, x]), batch_size=512, verbose=0)
        out.update(
            peak=peak.mb, loss=[float(np.abs(outputs).sum())], microbatch=trainer.inference_slices["predict"].size
        )
    else:
        with PeakMemory() as peak:
            loss = trainer.evaluate(x, y, batch_size=256, verbose=0)
        out.update(peak=peak.mb, loss=[float(loss)], microbatch=trainer.inference_slices["test"].size)
except MemoryBudgetExceeded as e:
    out.update(refused=str(e), iterations=int(model.optimizer.iterations))
print(json.dumps(out))
