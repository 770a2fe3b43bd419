"""Every script in examples/ runs as a user would run it."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
EXPECTED = {
    "quickstart.py": "trace counts: {'train': 1, 'test': 1, 'predict': 0}",
    "custom_train_step.py": "train step traced 1 time(s)",
    "custom_layer_hooks.py": "re-hydrations: 2",
    "kfold_loop.py": "mean accuracy",
    "stateful_rnn.py": "train step traced 1 time",
    "multi_worker.py": "2 replicas; final val_binary_accuracy",
}


def test_every_example_has_an_expectation():
    assert {p.name for p in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert EXPECTED[path.name] in result.stdout
