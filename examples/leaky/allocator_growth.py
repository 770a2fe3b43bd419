"""Growth below Python: memory that the process keeps although no Python object holds it.

A callback asks the C allocator for 24 MiB per epoch and never gives it back, the way fragmented or
native-held memory looks from outside: RSS grows, live Python objects do not. The doctor calls it allocator
growth. Fix for real fragmentation: SafeTrainer(model, policies=[TrimMalloc()]), or run_isolated.
"""

import ctypes
import ctypes.util

import keras
import numpy as np

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
held = []

rng = np.random.default_rng(0)
x = rng.standard_normal((1024, 16)).astype("float32")
y = x[:, :1] * 2.0


class NativeGrowth(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        size = 24 * 2**20
        address = libc.malloc(size)
        ctypes.memset(address, 1, size)  # touched, so it is resident
        held.append(address)  # an int: no Python object grows with it


model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
model.fit(x, y, batch_size=32, epochs=10, verbose=0, callbacks=[NativeGrowth()])
print(f"held {len(held) * 24} MiB outside Python")
