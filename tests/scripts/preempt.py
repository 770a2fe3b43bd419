"""Run tests/scripts/preempted_run.py and stop it with a signal: shared by the tests and benchmarks/preemption.py."""

import json
import os
import subprocess
import sys
import time

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preempted_run.py")


def run(folder, env_extra=None, signum=None, after=None, timeout=180) -> dict:
    """Run the script with its files in `folder` (checkpoints in `folder/ckpt`); with `signum`, send it that
    signal `after` seconds after training began.

    Returns `rc` (the exit status; negative: killed by that signal), `out` (the script's JSON), and with a
    signal `exit_s` (from the signal to the exit) and `step_at_signal` (the optimizer's iterations when it
    was sent, from the script's timeline)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    out, started = os.path.join(folder, "out.json"), os.path.join(folder, "started")
    for stale in (out, started):
        if os.path.exists(stale):
            os.remove(stale)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, out, os.path.join(folder, "ckpt")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    result: dict = {}
    if signum is not None:
        begin = time.monotonic()
        while not os.path.exists(started) and proc.poll() is None and time.monotonic() - begin < timeout:
            time.sleep(0.005)
        time.sleep(after or 0.0)
        sent = time.monotonic()
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=timeout)
    result["rc"] = proc.returncode
    result["stderr"] = stderr.decode(errors="replace")[-3000:]
    if os.path.exists(out):
        with open(out) as f:
            result["out"] = json.load(f)
    if signum is not None:
        result["exit_s"] = time.monotonic() - sent
        timeline = result.get("out", {}).get("timeline", [])
        result["step_at_signal"] = max([step for t, step in timeline if t <= sent] or [0])
    return result


def checkpoints(folder) -> list[str]:
    path = os.path.join(str(folder), "ckpt")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def train_ends(folder) -> list[str]:
    path = os.path.join(str(folder), "train_ends")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()
