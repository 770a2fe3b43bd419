"""Pictures: a trainer's memory log as a PNG (the doctor's and the demo's are in test_doctor / test_cli)."""

import pathlib

import pytest
from conftest import make_mlp, regression_data

from safetrain import MemoryLog, SafeTrainer

PNG = b"\x89PNG\r\n\x1a\n"


def test_trainer_memory_plot_writes_a_png(tmp_path):
    x, y = regression_data(n=128)
    trainer = SafeTrainer(make_mlp())
    trainer.fit(x, y, batch_size=32, epochs=4, verbose=0)
    path = trainer.memory.plot(str(tmp_path / "memory.png"))
    assert path.endswith("memory.png")
    data = (tmp_path / "memory.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000


def test_an_empty_memory_log_cannot_be_plotted(tmp_path):
    with pytest.raises(ValueError, match="memory log is empty"):
        MemoryLog().plot(str(tmp_path / "x.png"))


@pytest.fixture
def svg_backend():
    """The process on matplotlib's svg backend (as a notebook is on its inline one); restored afterwards."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        yield matplotlib.get_backend()
    finally:
        plt.close("all")
        matplotlib.use(before)


def test_plotting_leaves_the_backend_and_pyplot_alone(tmp_path, svg_backend):
    import matplotlib
    import matplotlib.pyplot as plt

    from safetrain.memory import MemorySample
    from safetrain.plots import plot_memory_log, plot_side_by_side, plot_timeline

    log = MemoryLog([MemorySample(epoch=i, rss_mb=500.0 + i, traces={"train": 1 + (i == 3)}) for i in range(6)])
    events = [
        dict(t=0.0, kind="start", rss_mb=400.0),
        dict(t=0.5, kind="fit_begin", rss_mb=450.0),
        dict(t=1.0, kind="trace", function="step", rss_mb=460.0),
        *(dict(t=1.0 + i, kind="epoch", rss_mb=470.0 + i) for i in range(4)),
    ]
    report = dict(script="train.py", events=events, diagnosis=dict(causes=[]))
    paths = [
        plot_memory_log(log, str(tmp_path / "log.png")),
        plot_side_by_side(
            [("a", [1, 2, 3], [1.0, 2.0, 3.0]), ("b", [1, 2, 3], [1.0, 1.0, 1.0])],
            str(tmp_path / "side.png"),
            xlabel="models",
        ),
        plot_side_by_side([("one", [1, 2], [1.0, 2.0])], str(tmp_path / "one.png"), xlabel="models"),
        plot_timeline(report, str(tmp_path / "timeline.png")),
    ]
    for path in paths:
        assert pathlib.Path(path).read_bytes()[:8] == PNG
    assert matplotlib.get_backend() == svg_backend
    assert plt.get_fignums() == []
