"""Memory sampling and the per-epoch series."""

import math

import pytest

from safetrain.memory import MemoryLog, MemorySample, sample, slope


def test_sample_reads_this_process_rss_and_no_device_on_cpu():
    s = sample(epoch=3, traces={"train": 1})
    assert s.rss_mb > 10 and s.epoch == 3 and s.traces == {"train": 1}
    assert s.as_logs() == {"rss_mb": s.rss_mb}  # no GPU here: no device keys


def test_slope_is_least_squares_per_unit():
    assert slope([10, 12, 14, 16]) == pytest.approx(2.0)
    assert slope([5, 5, 5]) == pytest.approx(0.0)
    assert math.isnan(slope([1.0]))


def test_memory_log_slope_skips_the_warmup_epochs():
    log = MemoryLog([MemorySample(epoch=i, rss_mb=v) for i, v in enumerate([100, 300, 400, 500, 501, 502, 503])])
    assert log.slope(skip=3) == pytest.approx(1.0)
    assert log.slope(skip=0) > 50
    short = MemoryLog([MemorySample(epoch=0, rss_mb=1.0), MemorySample(epoch=1, rss_mb=3.0)])
    assert short.slope() == pytest.approx(2.0)  # too few points to skip any


def test_memory_log_as_dict_is_columnar():
    log = MemoryLog([MemorySample(epoch=0, rss_mb=1.0, traces={"train": 1})])
    d = log.as_dict()
    assert d["rss_mb"] == [1.0] and d["traces"] == [{"train": 1}] and d["device_mb"] == [None]


def test_device_memory_reaches_the_logs_when_tensorflow_sees_a_gpu(monkeypatch):
    # No GPU on this machine: fake what tf.config.experimental.get_memory_info returns for one.
    import tensorflow as tf
    from conftest import make_mlp, regression_data

    from safetrain import SafeTrainer, memory

    monkeypatch.setattr(memory, "_GPU_NAMES", ["/device:GPU:0"])
    monkeypatch.setattr(
        tf.config.experimental, "get_memory_info", lambda name: {"current": 300 * 2**20, "peak": 512 * 2**20}
    )
    x, y = regression_data(n=32)
    trainer = SafeTrainer(make_mlp(), memory_logs=True)
    history = trainer.fit(x, y, epochs=2, verbose=0)
    assert [s.device_mb for s in trainer.memory] == [300.0, 300.0]
    assert history.history["device_mb"] == [300.0, 300.0]
    assert history.history["device_peak_mb"] == [512.0, 512.0]
