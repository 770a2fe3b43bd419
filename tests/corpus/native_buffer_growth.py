"""model.fit whose callback hands each epoch's data to a native library that never frees it.

Report: https://github.com/python/cpython/issues/131997
Known answer: allocator_growth
Expected lines: 60, 47

A callback exports the epoch's validation batch to a telemetry library written in C, reached through ctypes. The
library (simulated here with libc malloc, memmove and memset) copies what it is given into a 20 MiB staging buffer
per epoch and keeps the buffers, handing back only integer handles. Resident memory grows by about 20 MiB per
epoch while no Python object, tf.function trace or model grows with it: the growth lives below Python, as with a
leaking C extension, and only the library releasing its buffers (or a process per run) brings it back.
"""

import ctypes
import ctypes.util

import keras
import numpy as np

STAGING_BYTES = 20 * 2**20


class NativeTelemetry:
    """Stand-in for a C extension: copies each record into a native staging buffer and keeps it."""

    def __init__(self):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._libc.malloc.restype = ctypes.c_void_p
        self._libc.malloc.argtypes = [ctypes.c_size_t]
        self.handles = []  # plain ints: the buffers themselves are invisible to Python

    def export(self, record: np.ndarray) -> int:
        address = self._libc.malloc(STAGING_BYTES)
        ctypes.memset(address, 0, STAGING_BYTES)  # the library zero-fills its staging buffer
        ctypes.memmove(address, record.ctypes.data, min(record.nbytes, STAGING_BYTES))
        self.handles.append(address)
        return address


class ExportEachEpoch(keras.callbacks.Callback):
    def __init__(self, telemetry, x):
        super().__init__()
        self.telemetry = telemetry
        self.x = x

    def on_epoch_end(self, epoch, logs=None):
        self.telemetry.export(np.ascontiguousarray(self.x))


rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
x_train = rng.standard_normal((4096, 32)).astype("float32")
y_train = x_train[:, :4].sum(axis=1, keepdims=True)
x_val = rng.standard_normal((512, 32)).astype("float32")
y_val = x_val[:, :4].sum(axis=1, keepdims=True)

model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
telemetry = NativeTelemetry()
history = model.fit(
    x_train,
    y_train,
    batch_size=128,
    epochs=12,
    validation_data=(x_val, y_val),
    verbose=0,
    callbacks=[ExportEachEpoch(telemetry, x_val)],
)
print(f"val_loss {history.history['val_loss'][-1]:.4f}, {len(telemetry.handles)} buffers exported")
