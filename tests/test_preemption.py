"""Preemption: SIGTERM and Ctrl-C during fit stop at the next step, save that step, and resume bit-identical.

Real processes and real signals (tests/scripts/preempted_run.py, driven by tests/scripts/preempt.py) for what a
scheduler does; in-process tests for the handlers' life (main thread only, only while fit runs, chained).
"""

import os
import random
import signal
import threading

import keras
import numpy as np
import pytest
from conftest import make_mlp, regression_data
from scripts import preempt

from safetrain import Checkpoint, SafeTrainer

STEPS_PER_EPOCH = 625  # preempted_run.py: 20000 samples in batches of 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run of preempted_run.py never stopped, that stopped and resumed runs must match."""
    result = preempt.run(tmp_path_factory.mktemp("reference"), {"NO_CHECKPOINT": "1"})
    assert result["rc"] == 0, result["stderr"]
    return result["out"]


def _resumes_identically(folder, reference):
    again = preempt.run(folder)
    assert again["rc"] == 0, again["stderr"]
    assert again["out"]["history"] == reference["history"]
    assert again["out"]["weights"] == reference["weights"]
    assert again["out"]["global_step"] == again["out"]["iterations"] == reference["iterations"]


@pytest.mark.parametrize("seed", [1])  # 10 random points: benchmarks/preemption.py
def test_sigterm_at_a_random_step_saves_that_step_exits_143_and_resumes_bit_identical(tmp_path, reference, seed):
    after = random.Random(seed).uniform(0.05, 1.0)
    stopped = preempt.run(tmp_path, signum=signal.SIGTERM, after=after)
    assert stopped["rc"] == 143, stopped["stderr"]
    out = stopped["out"]
    assert out["preempted"] and out["global_step"] == out["iterations"]  # every step that ran is counted
    assert out["global_step"] >= stopped["step_at_signal"]
    assert out["checkpoint"].endswith(f"ckpt-{out['global_step']:012d}")
    assert f"ckpt-{out['global_step']:012d}" in preempt.checkpoints(tmp_path)
    assert preempt.train_ends(tmp_path) == [str(out["global_step"])]  # callbacks heard on_train_end
    _resumes_identically(tmp_path, reference)


def test_ctrl_c_counts_every_step_and_saves_only_when_asked(tmp_path, reference):
    plain = preempt.run(tmp_path / "plain", signum=signal.SIGINT, after=0.6)
    assert plain["rc"] == -signal.SIGINT, plain["stderr"]  # KeyboardInterrupt, as without safetrain
    out = plain["out"]
    assert out["interrupted"] and out["global_step"] == out["iterations"]
    # Only the epoch-end checkpoints the policy writes anyway: Ctrl-C saves nothing unless asked to.
    assert all(int(name[5:]) % STEPS_PER_EPOCH == 0 for name in preempt.checkpoints(tmp_path / "plain"))
    assert preempt.train_ends(tmp_path / "plain") == [str(out["global_step"])]

    asked = preempt.run(tmp_path / "asked", {"SAVE_ON_INTERRUPT": "1"}, signum=signal.SIGINT, after=0.6)
    assert asked["rc"] == -signal.SIGINT, asked["stderr"]
    step = asked["out"]["global_step"]
    assert asked["out"]["iterations"] == step and f"ckpt-{step:012d}" in preempt.checkpoints(tmp_path / "asked")
    _resumes_identically(tmp_path / "asked", reference)


def test_sigterm_without_a_checkpoint_still_ends_training_for_callbacks(tmp_path):
    stopped = preempt.run(tmp_path, {"NO_CHECKPOINT": "1"}, signum=signal.SIGTERM, after=0.3)
    assert stopped["rc"] == 143, stopped["stderr"]
    assert stopped["out"]["checkpoint"] is None and preempt.checkpoints(tmp_path) == []
    assert preempt.train_ends(tmp_path) == [str(stopped["out"]["global_step"])]


# -- the handlers, in this process -----------------------------------------------------------------------------

x, y = regression_data(n=640)


class _SignalAt(keras.callbacks.Callback):
    """Send this process `signum` at batch `at`, and record the SIGTERM handler seen during training."""

    def __init__(self, at=None, signum=signal.SIGTERM):
        super().__init__()
        self.at, self.signum, self.seen = at, signum, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(signal.getsignal(signal.SIGTERM))
        if batch == self.at:
            os.kill(os.getpid(), self.signum)


def test_a_users_handler_is_chained_and_put_back(tmp_path):
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGTERM, mine)
    try:
        trainer = SafeTrainer(make_mlp(), policies=[Checkpoint(str(tmp_path), every_n_epochs=None)])
        callback = _SignalAt(at=3)
        history = trainer.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[callback])
        assert calls == [signal.SIGTERM]  # called once training stopped (the user's handler decides)
        assert signal.getsignal(signal.SIGTERM) is mine  # put back when fit ended
        assert callback.seen[0] is not mine  # safetrain's own while fit ran
        # Stopped right after the step that signalled, every step counted; fit returned (the handler did not exit).
        assert trainer.progress.global_step == int(trainer.model.optimizer.iterations) == 4
        assert history.epoch == [] and os.listdir(tmp_path) == ["ckpt-000000000004"]  # that step, saved
    finally:
        signal.signal(signal.SIGTERM, original)


@pytest.mark.parametrize("at", [19, 26])  # the last step of epoch 0 (of 20), and one in the middle of epoch 1
def test_a_signal_saves_the_step_it_stopped_at_and_a_new_trainer_resumes_it_exactly(tmp_path, at):
    def run(callbacks=(), directory=None):
        model = make_mlp(dropout=0.3)
        policies = [Checkpoint(str(directory), every_n_epochs=None)] if directory else []
        trainer = SafeTrainer(model, policies=policies)
        history = trainer.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=list(callbacks))
        return trainer, history

    reference, expected = run()
    original = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # fit returns instead of exiting
    try:
        stopped, partial = run([_StepSignal(at)], tmp_path)
    finally:
        signal.signal(signal.SIGTERM, original)
    assert stopped.progress.global_step == int(stopped.model.optimizer.iterations) == at + 1
    assert partial.epoch == [0]  # epoch 0 ended (its History, its callbacks) before the stop, also at its last step
    resumed, history = run(directory=tmp_path)
    assert history.history == expected.history
    for a, b in zip(resumed.model.get_weights(), reference.model.get_weights()):
        np.testing.assert_array_equal(a, b)


class _StepSignal(keras.callbacks.Callback):
    """SIGTERM to this process after global step `at` (counted from 0 over the whole run)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.step = at, -1

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_handlers_only_in_the_main_thread_and_only_while_fit_runs():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    callback = _SignalAt()
    SafeTrainer(make_mlp()).fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert callback.seen[0] is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd is put back too (none here)

    in_thread = _SignalAt()
    worker = threading.Thread(
        target=lambda: SafeTrainer(make_mlp()).fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[in_thread])
    )
    worker.start()
    worker.join()
    assert in_thread.seen and all(h is before[0] for h in in_thread.seen)  # a thread cannot set handlers


def test_ignored_sigterm_stays_ignored():
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        trainer = SafeTrainer(make_mlp())
        history = trainer.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[_SignalAt(at=2)])
        assert history.epoch == [0, 1] and int(trainer.model.optimizer.iterations) == 40
    finally:
        signal.signal(signal.SIGTERM, original)
    assert np.isfinite(history.history["loss"]).all()
