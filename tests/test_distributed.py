"""tf.distribute: MirroredStrategy on 2 logical CPU devices and MultiWorkerMirroredStrategy with 2 real
worker processes on localhost. Devices and TF_CONFIG are fixed when TensorFlow starts, so every scenario
runs in fresh processes (tests/scripts/mirrored.py, tests/scripts/multi_worker.py); each script runs once per
module and the tests below assert on what it reported."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
TIMEOUT = 240


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line; output ends with:\n{output[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    return env


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(scenario: str, workdir: str, timeout: float = TIMEOUT) -> list[dict]:
    """Start 2 workers of `scenario`; wait for both (killing both past `timeout`); their results and logs."""
    ports = ",".join(map(str, _free_ports(2)))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(SCRIPTS, "multi_worker.py"), scenario, workdir, str(i), ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [
        dict(_result(out) if "RESULT " in out else {}, output=out, returncode=p.returncode)
        for p, out in zip(procs, outputs)
    ]


def single(workdir: str) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "multi_worker.py"), "single", workdir],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    return _result(done.stdout + done.stderr)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def same_weights(a: dict, b: dict) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["weights"], b["weights"]))


# -- MirroredStrategy, 2 logical CPU devices ------------------------------------------------------------


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mirrored"))
    done = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "mirrored.py"), workdir],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    return _result(done.stdout + done.stderr)


def test_mirrored_training_matches_one_device_to_1e5_with_the_same_global_batch(mirrored):
    assert mirrored["replicas"] == 2
    for name in ("mirrored", "mirrored_factory"):
        for key in ("loss", "mae", "val_loss", "val_mae"):
            assert len(mirrored[name][key]) == 3
            assert rel(mirrored[name][key], mirrored["single"][key]) < 1e-5, (name, key)
    for a, b in zip(mirrored["mirrored_weights"], mirrored["single_weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_built_in_the_strategy_scope_is_detected_and_traced_once(mirrored):
    assert mirrored["detected"] is True
    assert mirrored["variable_type"] == "MirroredVariable"
    assert mirrored["mirrored_traces"] == {"train": 1, "test": 1, "predict": 0}


def test_a_model_made_outside_the_strategy_scope_is_refused_before_training(mirrored):
    assert mirrored["errors"]["outside_scope"].startswith("ConfigurationError: `strategy`")
    assert "strategy.scope()" in mirrored["errors"]["outside_scope"]
    assert "another strategy" in mirrored["errors"]["other_strategy"]


def test_steps_per_execution_gives_the_same_numbers_under_mirrored(mirrored):
    for name in ("mirrored_spe1", "mirrored_spe3"):
        assert mirrored[name] == mirrored["mirrored"]
        assert mirrored[name + "_weights"] == mirrored["mirrored_weights"]


def test_mirrored_safetrainer_matches_keras_mirrored_fit(mirrored):
    keras_history = mirrored["keras_mirrored"]
    for key in keras_history:
        assert rel(mirrored["safe_mirrored_noshuffle"][key], keras_history[key]) < 1e-6, key


def test_mirrored_evaluate_and_predict_match_one_device(mirrored):
    for key, value in mirrored["evaluate_single"].items():
        assert rel(mirrored["evaluate_mirrored"][key], value) < 1e-5
    assert len(mirrored["predict_mirrored"]) == 100  # the uneven last batch is split and put back in order
    assert rel(mirrored["predict_mirrored"], mirrored["predict_single"]) < 1e-5
    assert mirrored["predict_traces"] == 1


def test_rehydration_under_mirrored_rebuilds_in_scope_and_is_bit_identical(mirrored):
    assert mirrored["rehydrations"] == 2  # after epochs 1 and 2 of 3
    assert mirrored["rehydrated_variable_type"] == "MirroredVariable"
    assert mirrored["mirrored_rehydrated"] == mirrored["mirrored_reference"]
    assert mirrored["mirrored_rehydrated_weights"] == mirrored["mirrored_reference_weights"]


def test_checkpoint_resumes_a_mirrored_run_bit_identically(mirrored):
    assert mirrored["resumed_from"].endswith("16")  # 2 epochs of 8 steps
    assert mirrored["resumed"] == mirrored["mirrored_reference"]
    assert mirrored["resumed_weights"] == mirrored["mirrored_reference_weights"]


# -- MultiWorkerMirroredStrategy, 2 worker processes on localhost ---------------------------------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The multi-worker scenarios in three cluster start-ups: `train`, `first` and `prefull` in one pair of
    processes; `preempt` (worker 1 sent SIGTERM) in a second; `resume` and `preresume` (restarted jobs) and
    `memory` in a third. {step: [worker 0's result, worker 1's]}."""
    root = str(tmp_path_factory.mktemp("multi_worker"))
    results = {"single": single(root)["single"], "dir": root}
    for scenario in ("train+first+prefull", "preempt", "resume+memory+preresume"):
        pair = launch(scenario, root)
        for r in pair:
            expected = 143 if scenario == "preempt" else 0  # TrainingPreempted's exit status
            assert r.get("returncode") == expected and all(step in r for step in scenario.split("+")), r.get(
                "output", ""
            )[-3000:]
        for step in scenario.split("+"):
            results[step] = [dict(r[step], worker=r["worker"], chief=r["chief"], output=r["output"]) for r in pair]
    return results


def test_two_workers_finish_agree_on_weights_and_match_one_device(workers):
    pair = workers["train"]
    assert [r["worker"] for r in pair] == [0, 1] and [r["chief"] for r in pair] == [True, False]
    assert same_weights(pair[0], pair[1])
    for key in ("loss", "mae", "val_loss", "val_mae"):
        assert pair[0]["history"][key] == pair[1]["history"][key]
        assert rel(pair[0]["history"][key], workers["single"]["history"][key]) < 1e-5, key
    assert pair[0]["traces"] == {"train": 1, "test": 1, "predict": 0}


def test_only_the_chief_writes_checkpoints_logs_and_progress(workers):
    chief, other = workers["train"]
    workdir = os.path.join(workers["dir"], "train")
    assert len(chief["written"]) == 4 and other["written"] == []
    assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == sorted(chief["written"][-2:])  # keep=2
    with open(os.path.join(workdir, "log.csv")) as f:
        rows = f.read().strip().splitlines()
    assert len(rows) == 1 + 4  # one header, one row per epoch: written once, not twice
    assert os.path.exists(os.path.join(workdir, "model.keras"))
    assert sorted(os.listdir(workdir)) == ["ckpt", "log.csv", "model.keras"]  # no worker's leftovers
    assert "Epoch 4/4" in chief["output"] and "Epoch" not in other["output"]


def test_checkpoint_resumes_a_multi_worker_run_with_rehydration_bit_identically(workers):
    first, resumed, reference = workers["first"], workers["resume"], workers["train"]
    assert [r["resumed_from"] for r in first] == ["", ""]
    assert [r["resumed_from"] for r in resumed] == ["ckpt-000000000016"] * 2  # in new processes
    assert all(r["rehydrations"] >= 1 and r["variable_type"] == "MirroredVariable" for r in first + resumed)
    for r in resumed:
        assert same_weights(r, reference[0])
        for key in ("loss", "val_loss"):
            assert r["history"][key] == reference[0]["history"][key]


def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_the_rerun_is_bit_identical(workers):
    stopped, resumed, reference = workers["preempt"], workers["preresume"], workers["prefull"]
    assert all(r["preempted"] and r["code"] == 143 for r in stopped)  # the worker not signalled stops too
    step = stopped[0]["global_step"]
    assert 0 < step < reference[0]["global_step"]
    assert [(r["global_step"], r["iterations"]) for r in stopped] == [(step, step)] * 2
    # The stop's checkpoint, by the chief only; before it, the epoch ends' (Checkpoint's default), as many as
    # epochs ended before the signal (1.5 s in: usually none, on a fast run one or two).
    per_epoch = reference[0]["global_step"] // 20
    written = stopped[0]["written"]
    assert written[-1] == f"ckpt-{step:012d}" and stopped[1]["written"] == []
    assert written[:-1] == [f"ckpt-{per_epoch * e:012d}" for e in range(1, len(written))]
    assert same_weights(stopped[0], stopped[1])
    assert [r["resumed_from"] for r in resumed] == [f"ckpt-{step:012d}"] * 2
    for r in resumed:
        assert same_weights(r, reference[0])
        assert r["history"] == reference[0]["history"]


def test_memory_policies_see_the_largest_rss_of_all_workers(workers):
    chief, leaky = workers["memory"]
    # Both workers made the same decisions from the same numbers.
    assert chief["rss_series"] == leaky["rss_series"] and chief["worker_rss_mb"] == leaky["worker_rss_mb"]
    assert all(len(w) == 2 and max(w) == r for w, r in zip(chief["worker_rss_mb"], chief["rss_series"]))
    # MemoryBudget stopped both, early, though the chief itself stayed under the budget.
    epochs = len(chief["history"]["loss"])
    assert epochs == len(leaky["history"]["loss"]) < 12
    assert chief["own_rss_mb"] < chief["budget"] < chief["rss_series"][-1]
    # LeakDetector fired on both, though only worker 1 leaks.
    assert chief["leak_report"] is not None and leaky["leak_report"] == chief["leak_report"]
    assert chief["leak_report"] > 20


def test_a_dead_worker_stops_the_others_with_worker_failure(tmp_path):
    t0 = time.monotonic()
    survivor, dead = launch("die", str(tmp_path), timeout=120)
    assert time.monotonic() - t0 < 120
    assert dead["returncode"] == 3
    assert survivor["returncode"] == 0, survivor["output"][-3000:]
    assert survivor["die"]["error"] == "WorkerFailure"
    assert "worker 1" in survivor["die"]["message"] and "Checkpoint" in survivor["die"]["message"]
    assert survivor["die"]["seconds"] < 60
