"""safetrain.distributed's role logic (who is chief, which callbacks a worker runs), in-process.

The real multi-worker behaviour is tested with worker processes in tests/test_distributed.py; here the
cluster is described by a stand-in with the attributes TensorFlow's strategies have, to cover the cases
two localhost workers do not (a "chief" task, BackupAndRestore, `_chief_worker_only`)."""

import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from safetrain import ProgressBar, distributed


def cluster(task_type, task_id, jobs):
    spec = tf.train.ClusterSpec(jobs)
    resolver = types.SimpleNamespace(task_type=task_type, task_id=task_id, cluster_spec=lambda: spec)
    extended = types.SimpleNamespace(_in_multi_worker_mode=lambda: True)
    return types.SimpleNamespace(extended=extended, cluster_resolver=resolver)


WORKERS = {"worker": ["a:1", "b:1", "c:1"]}


def test_without_a_multi_worker_strategy_this_process_is_the_chief_and_nothing_is_gathered():
    for strategy in (None, tf.distribute.get_strategy()):
        assert distributed.is_chief(strategy) and distributed.worker_index(strategy) == 0
        assert distributed.num_workers(strategy) == 1
        assert distributed.per_worker_values(strategy, 3.5) == [3.5]
        assert distributed.max_across_workers(strategy, 2.0) == 2.0
        assert distributed.any_across_workers(strategy, True) is True


def test_worker_zero_is_chief_unless_the_cluster_has_a_chief_task():
    assert distributed.is_chief(cluster("worker", 0, WORKERS))
    assert not distributed.is_chief(cluster("worker", 2, WORKERS))
    assert distributed.worker_index(cluster("worker", 2, WORKERS)) == 2
    assert distributed.num_workers(cluster("worker", 2, WORKERS)) == 3
    with_chief = {"chief": ["m:1"], "worker": ["a:1", "b:1"]}
    assert distributed.is_chief(cluster("chief", 0, with_chief))
    assert not distributed.is_chief(cluster("worker", 0, with_chief))
    assert distributed.num_workers(cluster("worker", 0, with_chief)) == 3


class Quiet(keras.callbacks.Callback):
    _chief_worker_only = True


def test_other_workers_drop_log_writers_and_keep_checkpoints_in_private_places(tmp_path):
    callbacks = [
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ProgressBar(),
        Quiet(),
        keras.callbacks.EarlyStopping(patience=1),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras")),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
    ]
    chief_callbacks, _ = distributed.callbacks_for_worker(cluster("worker", 0, WORKERS), callbacks)
    assert chief_callbacks == callbacks

    kept, cleanup = distributed.callbacks_for_worker(cluster("worker", 1, WORKERS), callbacks)
    assert [type(c).__name__ for c in kept] == ["EarlyStopping", "ModelCheckpoint", "BackupAndRestore"]
    assert kept[0] is callbacks[4]  # stateful callbacks that write nothing run unchanged
    checkpoint, backup = kept[1], kept[2]
    assert checkpoint is not callbacks[5] and callbacks[5].filepath == str(tmp_path / "best.keras")
    assert not checkpoint.filepath.startswith(str(tmp_path)) and checkpoint.filepath.endswith("best.keras")
    private = os.path.dirname(checkpoint.filepath)
    assert os.path.isdir(private)
    assert backup.backup_dir == str(tmp_path / "backup" / "worker_1")
    assert backup._weights_path == str(tmp_path / "backup" / "worker_1" / "latest.weights.h5")
    cleanup()
    assert not os.path.exists(private)


def test_a_collective_error_becomes_worker_failure_naming_the_worker():
    error = tf.errors.UnavailableError(
        None,
        None,
        "{{function_node __wrapped__CollectiveReduceV2_device_/job:worker/"
        "replica:0/task:0/device:CPU:0}} Collective ops is aborted by: Error reported "
        "from /job:worker/task:1: The following tasks are unhealthy (stopped sending "
        "heartbeats):\n/job:worker/replica:0/task:1\n",
    )
    with (
        pytest.raises(distributed.WorkerFailure, match="worker 1 failed or became unreachable") as info,
        distributed.worker_failures(cluster("worker", 0, WORKERS)),
    ):
        raise error
    assert "stopped sending heartbeats" in str(info.value) and isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is error
    with pytest.raises(tf.errors.UnavailableError), distributed.worker_failures(None):  # one process: left alone
        raise error


def test_memory_samples_carry_every_workers_rss_only_in_multi_worker_runs(tmp_path):
    from conftest import make_mlp, regression_data

    from safetrain import SafeTrainer

    x, y = regression_data(n=64)
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    sample = trainer.sample_memory()
    assert sample.worker_rss_mb is None and sample.rss_mb > 0 and np.isfinite(sample.rss_mb)
