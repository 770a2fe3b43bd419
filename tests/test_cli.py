"""The main job: `python -m safetrain demo`, exactly as the README runs it."""

import os
import re
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "safetrain", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def check_demo(result, epochs, lengths):
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"Epoch {epochs}/{epochs}" in out
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\{'train': 1, 'test': 1", out, re.M)
    assert [int(e) for e, _ in rows] == list(range(1, epochs + 1))
    assert "RSS slope:" in out
    plain = re.search(r"plain @tf.function step :\s+(\d+) traces", out)
    safe = re.search(r"SafeTrainer.fit\s+:\s+(\d+) trace", out)
    assert int(plain.group(1)) == lengths and int(safe.group(1)) == 1


def test_demo_trains_and_reports_memory_and_traces(tmp_path):
    plot = tmp_path / "demo.png"
    result = run("demo", "--epochs", "3", "--samples", "3000", "--lengths", "12", "--plot", str(plot), "--models", "7")
    check_demo(result, epochs=3, lengths=12)
    # --plot: 7 models in a loop with model.fit and with SafeTrainer, side by side.
    fit = re.search(r"model.fit\s+: RSS (\d+) -> (\d+) MiB, ([+-][\d.]+) MiB per model", result.stdout)
    safe = re.search(r"SafeTrainer\s+: RSS (\d+) -> (\d+) MiB, ([+-][\d.]+) MiB per model", result.stdout)
    assert fit and safe, result.stdout[-1500:]
    assert float(fit.group(3)) > 1.0 > float(safe.group(3))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_exactly_as_the_readme_runs_it():
    # Covered by the test above with smaller sizes; this one is the README's command verbatim (~25 s).
    check_demo(run("demo"), epochs=8, lengths=40)


def test_unknown_command_is_a_usage_error():
    result = run("train-everything")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
