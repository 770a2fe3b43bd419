"""The main job: `python -m safetrain demo`, exactly as the README runs it."""

import os
import re
import subprocess
import sys


def run(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "safetrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_trains_and_reports_memory_and_traces():
    result = run("demo")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Epoch 8/8" in out
    rows = re.findall(r"^\s+(\d+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\{'train': 1, 'test': 1", out, re.M)
    assert [int(e) for e, _ in rows] == list(range(1, 9))
    assert "RSS slope:" in out
    plain = re.search(r"plain @tf.function step :\s+(\d+) traces", out)
    safe = re.search(r"SafeTrainer.fit\s+:\s+(\d+) trace", out)
    assert int(plain.group(1)) == 40 and int(safe.group(1)) == 1


def test_unknown_command_is_a_usage_error():
    result = run("train-everything")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
