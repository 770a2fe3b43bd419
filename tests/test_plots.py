"""Pictures: a trainer's memory log as a PNG (the doctor's and the demo's are in test_doctor / test_cli)."""

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
