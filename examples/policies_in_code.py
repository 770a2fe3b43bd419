"""Policies, configured in code: what to do about memory, decided in a few lines each."""

import keras
import numpy as np

from safetrain import ClearSession, LeakDetector, MemoryBudget, RetraceGuard, SafeTrainer, TrimMalloc

rng = np.random.default_rng(0)
x = rng.standard_normal((4096, 32)).astype("float32")
y = x[:, :1] * 2.0 + 0.1 * rng.standard_normal((4096, 1)).astype("float32")

model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
detector = LeakDetector(window=5, threshold_mb_per_epoch=2.0)
trainer = SafeTrainer(
    model,
    policies=[
        RetraceGuard(max_traces=1),  # a second trace of a step is an error, not a silent leak
        ClearSession(every_n_epochs=4),  # clear_session and re-hydrate: the run continues exactly
        MemoryBudget(16_000, action="stop"),  # stop cleanly (History intact) above 16 GB of RSS
        TrimMalloc(),  # give freed memory back to the OS after each epoch
        detector,  # warn, with a diagnosis, if RSS keeps growing
    ],
)
history = trainer.fit(x, y, batch_size=64, epochs=8, validation_split=0.1, verbose=0)
print(
    f"val_mae {history.history['val_mae'][-1]:.3f}; re-hydrations {trainer.rehydrations}; "
    f"RSS slope {trainer.memory.slope():+.2f} MiB/epoch; leak report: {detector.report}"
)
