"""Keras callbacks work unchanged with SafeTrainer: same outcome as under model.fit, real files on disk."""

import csv
import glob
import os

import keras
import numpy as np
import pytest
from conftest import assert_same_training, make_mlp, regression_data, run_both

from safetrain import SafeTrainer

x, y = regression_data(n=120, seed=5)
xv, yv = regression_data(n=40, seed=6)


def fit_args(**extra):
    return lambda: dict(x=x, y=y, batch_size=16, epochs=6, shuffle=False, validation_data=(xv, yv), **extra)


def test_early_stopping_with_restore_best_weights_matches_model_fit():
    def build():
        return make_mlp(optimizer=keras.optimizers.Adam(0.05))

    cbs = lambda: [
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=1,
            restore_best_weights=True,  # noqa
            min_delta=0.05,
        )
    ]
    k_model, k_hist, s_model, s_hist, _ = run_both(build, lambda: dict(fit_args()(), epochs=30, callbacks=cbs()))
    assert len(s_hist["loss"]) < 30  # it did stop early
    assert_same_training(k_model, k_hist, s_model, s_hist)


def test_reduce_lr_on_plateau_and_scheduler_act_on_the_live_optimizer():
    def build():
        return make_mlp(optimizer=keras.optimizers.SGD(0.1))

    cbs = lambda: [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch >= 2 else lr),  # noqa
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.1, patience=0, min_delta=10.0),
    ]
    k_model, k_hist, s_model, s_hist, trainer = run_both(build, lambda: dict(fit_args()(), callbacks=cbs()))
    assert_same_training(k_model, k_hist, s_model, s_hist)
    assert s_hist["learning_rate"][-1] < 0.01
    assert float(trainer.model.optimizer.learning_rate) == pytest.approx(float(k_model.optimizer.learning_rate))


def test_terminate_on_nan_stops_like_model_fit():
    def build():
        return make_mlp(optimizer=keras.optimizers.SGD(1e6))

    cbs = lambda: [keras.callbacks.TerminateOnNaN()]  # noqa: E731
    k_model, k_hist, s_model, s_hist, _ = run_both(build, lambda: dict(fit_args()(), epochs=5, callbacks=cbs()))
    assert len(s_hist["loss"]) == len(k_hist["loss"]) == 1
    assert int(s_model.optimizer.iterations) == int(k_model.optimizer.iterations) < 8


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_model_checkpoint_save_best_only_writes_the_best_model(tmp_path, suffix):
    path = str(tmp_path / f"best{suffix}")
    seen = {}

    class RecordBest(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.best = np.inf

        def on_epoch_end(self, epoch, logs=None):
            if logs["val_loss"] < self.best:
                self.best = logs["val_loss"]
                seen["weights"] = [w.copy() for w in self.model.get_weights()]

    model = make_mlp(optimizer=keras.optimizers.Adam(0.05))
    ckpt = keras.callbacks.ModelCheckpoint(
        path, monitor="val_loss", save_best_only=True, save_weights_only=suffix == ".weights.h5"
    )
    SafeTrainer(model).fit(x, y, epochs=8, validation_data=(xv, yv), verbose=0, callbacks=[ckpt, RecordBest()])
    if suffix == ".keras":
        restored = keras.models.load_model(path)
        assert restored.optimizer is not None
    else:
        restored = make_mlp()
        restored.load_weights(path)
    for a, b in zip(restored.get_weights(), seen["weights"]):
        np.testing.assert_array_equal(a, b)


def test_csv_logger_and_tensorboard_record_memory(tmp_path):
    csv_path = tmp_path / "log.csv"
    tb_dir = tmp_path / "tb"
    SafeTrainer(make_mlp(), memory_logs=True).fit(
        x,
        y,
        epochs=3,
        validation_data=(xv, yv),
        verbose=0,
        callbacks=[keras.callbacks.CSVLogger(str(csv_path)), keras.callbacks.TensorBoard(str(tb_dir))],
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {"epoch", "loss", "mae", "val_loss", "val_mae", "rss_mb"} <= set(rows[0])
    assert float(rows[-1]["rss_mb"]) > 50
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(tb_dir / "train" / "events.*"))
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    assert {"epoch_loss", "epoch_rss_mb"} <= tags


def test_backup_and_restore_resumes_an_interrupted_run(tmp_path):
    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise RuntimeError("interrupted")

    backup = str(tmp_path / "backup")
    model = make_mlp()
    with pytest.raises(RuntimeError, match="interrupted"):
        SafeTrainer(model).fit(x, y, epochs=6, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup), Crash()])
    model2 = make_mlp(seed=1)
    history = SafeTrainer(model2).fit(x, y, epochs=6, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert history.epoch == [3, 4, 5]


def test_lambda_callback_and_callbacks_see_the_live_model():
    events = []
    trainer = SafeTrainer(make_mlp())

    def on_epoch_end(epoch, logs):
        events.append((epoch, round(logs["loss"], 6)))

    models = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end, on_train_begin=lambda logs: models.append(cb.model))
    history = trainer.fit(x, y, epochs=3, verbose=0, callbacks=[cb])
    assert [e for e, _ in events] == [0, 1, 2]
    assert [v for _, v in events] == [round(v, 6) for v in history.history["loss"]]
    assert models[0] is trainer.model
    assert trainer.model.history is history


def test_memory_monitor_works_with_plain_model_fit():
    from safetrain import MemoryMonitor

    monitor = MemoryMonitor()
    model = make_mlp()
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[monitor])
    assert history.history["rss_mb"] == monitor.log.series("rss_mb")
    assert len(monitor.log) == 3
