"""Process isolation: run_isolated, and MemoryBudget(action="restart") re-executing the command line."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import run_script
from test_checkpoint import assert_identical

from safetrain import IsolatedProcessError, MemoryBudget, RemoteTraceback, SafeTrainer, run_isolated
from safetrain.errors import ConfigurationError
from safetrain.memory import rss_mb, slope

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
import folds  # noqa: E402


def test_run_isolated_returns_the_result_from_another_process():
    assert run_isolated(folds.add, 2, b=3) == 5


def test_an_exception_in_the_child_is_raised_with_its_traceback():
    with pytest.raises(ValueError, match="bad fold") as info:
        run_isolated(folds.fail, "bad fold")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "folds.py" in info.value.__cause__.text and "raise ValueError(message)" in info.value.__cause__.text


def test_a_killed_child_is_a_clear_error_naming_the_signal():
    with pytest.raises(IsolatedProcessError, match=r"killed by signal SIGKILL \(the OOM killer sends SIGKILL\)"):
        run_isolated(folds.die)


def test_a_lambda_is_refused_before_starting_a_process():
    with pytest.raises(TypeError, match=r"`fn` must be picklable"):
        run_isolated(lambda: 1)


def test_a_k_fold_loop_through_run_isolated_keeps_the_parent_flat():
    parent = []
    results = []
    for fold in range(3):
        results.append(run_isolated(folds.train_fold, fold))
        parent.append(rss_mb())
    assert len({r["pid"] for r in results}) == 3 and all(r["pid"] != os.getpid() for r in results)
    assert all(np.isfinite(r["loss"]) for r in results)
    assert slope(parent) < 0.5
    assert max(parent) - min(parent) < 5.0


def test_restart_needs_a_checkpoint_policy():
    from conftest import make_mlp, regression_data

    x, y = regression_data(n=32)
    with pytest.raises(ConfigurationError, match=r"needs a Checkpoint policy"):
        SafeTrainer(make_mlp(), policies=[MemoryBudget(1.0, action="restart")]).fit(x, y, verbose=0)


def test_a_run_under_a_tight_budget_restarts_itself_and_ends_bit_identical(tmp_path, reference):
    out, ckpt_dir = tmp_path / "out.json", tmp_path / "ckpt"
    code = run_script(out, ckpt_dir, {"RESTART_OVER_MB": "1"}, timeout=300)  # 1 MiB: over budget at every epoch end
    assert code == 0
    result = json.loads(out.read_text())
    assert result["restarts"] == 5  # after epochs 1-5 of 6 (not after the last)
    assert result["resumed_from"] is not None
    # Each process's callbacks heard on_train_end (writers flushed) before it was replaced, and the last's.
    assert len((tmp_path / "train_ends").read_text().split()) == 6
    assert_identical(result, reference)
