"""Run tests/scripts/checkpointed_run.py and kill it with SIGKILL: shared by the tests and benchmarks/soak.py."""

import os
import signal
import subprocess
import sys
import time

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpointed_run.py")


def run_script(out, ckpt_dir, env_extra=None, kill_after=None, kill_at_write=None, timeout=180):
    """Run the script; optionally SIGKILL it `kill_after` seconds after its training began, or half-way
    through writing its `kill_at_write`-th checkpoint.

    Returns the exit code (negative: killed by that signal)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, str(out), str(ckpt_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    marker = os.path.join(os.path.dirname(str(ckpt_dir)), "writing")
    started = os.path.join(os.path.dirname(str(ckpt_dir)), "started")
    if os.path.exists(started):
        os.remove(started)
    start, began = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - start < timeout:
        if began is None and os.path.exists(started):
            began = time.monotonic()
        trained = time.monotonic() - began if began is not None else -1.0
        if kill_after is not None and trained >= kill_after or kill_at_write and _writing(marker) >= kill_at_write:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=timeout)
    if os.path.exists(marker):
        os.remove(marker)
    return proc.returncode


def _writing(marker):
    try:
        with open(marker) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0
