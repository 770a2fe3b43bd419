"""Progress output: verbose=1 bars, verbose=2 one line per epoch, 0 nothing; throttled redraws."""

import io

import numpy as np
from conftest import make_mlp, regression_data

from safetrain import ProgressBar, SafeTrainer

x, y = regression_data(n=64)


def test_verbose_1_shows_a_bar_per_epoch_with_loss_and_rss(capsys):
    SafeTrainer(make_mlp()).fit(x, y, batch_size=8, epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert "8/8" in out and "loss: " in out and "rss_mb: " in out


def test_verbose_2_prints_one_line_per_epoch(capsys):
    SafeTrainer(make_mlp()).fit(x, y, epochs=3, validation_split=0.25, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 3
    assert lines[0].startswith("Epoch 1/3 - ") and "val_loss: " in lines[0] and "rss_mb: " in lines[0]


def test_verbose_0_prints_nothing(capsys):
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, epochs=2, verbose=0)
    trainer.evaluate(x, y, verbose=0)
    trainer.predict(x, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_evaluate_and_predict_show_their_own_bars(capsys):
    trainer = SafeTrainer(make_mlp())
    trainer.evaluate(x, y, verbose=1)
    trainer.predict(x, verbose=1)
    out = capsys.readouterr().out
    assert "Evaluate" in out and "Predict" in out


def test_progress_bar_is_a_plain_keras_callback_for_model_fit():
    stream = io.StringIO()
    make_mlp().fit(x, y, epochs=2, verbose=0, callbacks=[ProgressBar(verbose=2, file=stream)])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "loss: " in lines[1]


class CountingValue:
    """A log value that counts how often it is converted to a number (a device sync in real use)."""

    conversions = 0

    def __array__(self, dtype=None, copy=None):
        CountingValue.conversions += 1
        return np.asarray(1.0)


def test_batch_updates_are_throttled_and_convert_logs_only_when_drawing():
    bar = ProgressBar(verbose=1, min_interval=3600, file=io.StringIO())
    bar.set_params({"epochs": 1, "steps": 10_000})
    bar.on_train_begin()
    bar.on_epoch_begin(0)
    bar._last_draw = 0.0
    for step in range(10_000):
        bar.on_train_batch_end(step, {"loss": CountingValue()})
    assert CountingValue.conversions <= 1
    bar.on_epoch_end(0, {"loss": 0.5})
