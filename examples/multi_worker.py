"""Multi-worker training: run this same script once per host, each with its own TF_CONFIG.

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}' \
        python examples/multi_worker.py /shared/runs/mlp          # on host1; index 1 on host2

Without TF_CONFIG it starts 2 workers on this machine (free localhost ports) and waits for them.
Checkpoints go to the directory given (it must be shared by all hosts); only the chief writes them, and
running the same commands again resumes where the run stopped.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

if "TF_CONFIG" not in os.environ:  # the local demo: be the launcher
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    own_directory = len(sys.argv) < 2  # a folder of our own, removed when the workers are done
    directory = sys.argv[1] if not own_directory else tempfile.mkdtemp(prefix="safetrain_multi_worker_")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, directory],
            env=dict(
                os.environ,
                TF_CONFIG=json.dumps(
                    {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
                ),
            ),
        )
        for i in range(2)
    ]
    code = max(p.wait() for p in procs)
    if own_directory:
        shutil.rmtree(directory, ignore_errors=True)
    sys.exit(code)

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before anything else touches TensorFlow's runtime

import keras  # noqa: E402
import numpy as np  # noqa: E402

from safetrain import Checkpoint, LeakDetector, MemoryBudget, SafeTrainer  # noqa: E402

rng = np.random.default_rng(0)  # every worker makes the same data; each trains on its share of a batch
x = rng.standard_normal((4096, 16)).astype("float32")
y = (x[:, :2].sum(axis=1, keepdims=True) > 0).astype("float32")


def build_model():
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(
        optimizer="adam",
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    return model


trainer = SafeTrainer(
    build_model,
    strategy=strategy,
    policies=[
        Checkpoint(sys.argv[1]),  # the chief writes, every worker resumes
        MemoryBudget(8000, action="rehydrate"),  # the largest RSS of all workers decides
        LeakDetector(window=5, threshold_mb_per_epoch=5),  # ... here too
    ],
)
history = trainer.fit(x, y, batch_size=128, epochs=4, validation_split=0.2)  # 128 = the global batch
if trainer.is_chief:
    print(
        f"{strategy.num_replicas_in_sync} replicas; final val_binary_accuracy "
        f"{history.history['val_binary_accuracy'][-1]:.3f}; largest worker RSS {trainer.memory[-1].rss_mb:.0f} MiB; "
        f"trace counts {trainer.trace_counts}"
    )
