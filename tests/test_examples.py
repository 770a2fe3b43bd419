"""Every script in examples/ runs as a user would run it."""

import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))
EXPECTED = {
    "quickstart.py": "trace counts: {'train': 1, 'test': 1, 'predict': 0}",
    "custom_train_step.py": "train step traced 1 time(s)",
    "custom_layer_hooks.py": "re-hydrations: 2",
    "kfold_loop.py": "mean accuracy",
    "stateful_rnn.py": "train step traced 1 time",
    "multi_worker.py": "2 replicas; final val_binary_accuracy",
    "policies_in_code.py": "re-hydrations 1",
    "oom_recovery.py": "microbatch size 64; OOM events 1",
    "checkpoint_resume.py": "first run: 3 epochs; second run resumed from ckpt-",
    "keras_tuner_search.py": "safetrain.install(): 25 trials",
}


def test_every_example_has_an_expectation():
    assert {p.name for p in EXAMPLES} == set(EXPECTED)


@pytest.fixture(scope="module")
def temp_root(tmp_path_factory):
    """The temporary directory the examples see (TMPDIR): it must be empty again after they ran."""
    return tmp_path_factory.mktemp("examples_tmp")


@pytest.fixture(scope="module")
def runs(temp_root):
    """Every example as a user runs it (`python examples/x.py`), two at a time: each is its own process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(temp_root))

    def run(path):
        return path.name, subprocess.run(
            [sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env
        )

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, EXAMPLES))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(runs, path):
    result = runs[path.name]
    assert result.returncode == 0, result.stderr[-2000:]
    assert EXPECTED[path.name] in result.stdout


def test_examples_leave_nothing_in_the_temporary_directory(runs, temp_root):
    assert sorted(p.name for p in temp_root.iterdir()) == []


def test_the_readme_quickstart_runs_as_pasted(tmp_path):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{'train': 1, 'test': 1, 'predict': 0}" in result.stdout
    assert "dict_keys(['loss', 'mae', 'val_loss', 'val_mae'])" in result.stdout
