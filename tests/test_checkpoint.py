"""Checkpoint: atomic writes, checksums, resume; real processes killed with SIGKILL end bit-identical."""

import json
import os
import random
import signal

import keras
import numpy as np
import pytest
from conftest import make_mlp, regression_data, run_script

from safetrain import Checkpoint, CheckpointMismatch, CheckpointWarning, SafeTrainer, checkpoint

x, y = regression_data(n=96)


def resume_until_done(tmp, first_kill, env_extra=None, max_runs=8):
    out, ckpt_dir = tmp / "out.json", tmp / "ckpt"
    codes = [first_kill(out, ckpt_dir)]
    while codes[-1] != 0 and len(codes) < max_runs:
        codes.append(run_script(out, ckpt_dir, env_extra))
    assert codes[-1] == 0, f"exit codes {codes}"
    return json.loads(out.read_text()), codes


def assert_identical(result, reference):
    assert result["epochs"] == reference["epochs"] == list(range(6))
    assert result["history"] == reference["history"]  # every value, bit for bit
    assert result["iterations"] == reference["iterations"]
    for a, b in zip(result["weights"], reference["weights"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_killed_at_a_random_moment_and_restarted_ends_bit_identical(tmp_path, reference):
    delay = random.Random().uniform(0.05, 1.1)  # training takes 6 epochs of at least 0.2 s each
    result, codes = resume_until_done(tmp_path, lambda out, d: run_script(out, d, kill_after=delay))
    assert codes[0] == -signal.SIGKILL
    assert_identical(result, reference)


def test_killed_while_writing_a_checkpoint_recovers_from_the_previous_one(tmp_path, reference):
    slow = {"SLOW_CHECKPOINT_WRITE": "0.3"}
    out, ckpt_dir = tmp_path / "out.json", tmp_path / "ckpt"
    assert run_script(out, ckpt_dir, slow, kill_at_write=3) == -signal.SIGKILL
    names = sorted(os.listdir(ckpt_dir))
    assert [n for n in names if n.startswith(".tmp-")], "the kill did not land inside a checkpoint write"
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-000000000007", "ckpt-000000000014"]
    assert run_script(out, ckpt_dir, slow) == 0
    result = json.loads(out.read_text())
    assert result["resumed_from"].endswith("ckpt-000000000014")
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")]
    assert_identical(result, reference)


# -- in-process: formats, corruption, failures ------------------------------------------------------


def build():
    return make_mlp(dropout=0.2)


class StopAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.step:
            raise KeyboardInterrupt


def interrupted_then_resumed(directory, stop_at, **policy_kwargs):
    with pytest.raises(KeyboardInterrupt):
        SafeTrainer(build(), policies=[Checkpoint(directory, **policy_kwargs)]).fit(
            x, y, batch_size=8, epochs=3, verbose=0, callbacks=[StopAt(stop_at)]
        )
    trainer = SafeTrainer(build(), policies=[Checkpoint(directory, **policy_kwargs)])
    return trainer, trainer.fit(x, y, batch_size=8, epochs=3, verbose=0)


def test_resume_mid_epoch_in_process_matches_an_uninterrupted_run(tmp_path):
    plain = SafeTrainer(build())
    plain_history = plain.fit(x, y, batch_size=8, epochs=3, verbose=0).history
    trainer, history = interrupted_then_resumed(tmp_path / "c", stop_at=17, every_n_batches=5)
    assert trainer.policies.policies[0].resumed_from.endswith("ckpt-000000000015")
    for k in plain_history:
        if k != "rss_mb":
            assert history.history[k] == plain_history[k]
    for a, b in zip(plain.model.get_weights(), trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_keep_bounds_the_files_on_disk(tmp_path):
    policy = Checkpoint(tmp_path / "c", every_n_epochs=1, every_n_batches=2, keep=3)
    SafeTrainer(build(), policies=[policy]).fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert len(policy.written) > 10
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path / "c"))] == [
        os.path.basename(p) for p in policy.written[-3:]
    ]


def test_a_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    directory = tmp_path / "c"
    policy = Checkpoint(directory, every_n_epochs=1)
    SafeTrainer(build(), policies=[policy]).fit(x, y, batch_size=8, epochs=2, verbose=0)
    newest, previous = policy.written[-1], policy.written[-2]
    with open(os.path.join(newest, "state.bin"), "r+b") as f:  # truncate the newest state
        f.truncate(100)
    trainer = SafeTrainer(build(), policies=[Checkpoint(directory)])
    with pytest.warns(CheckpointWarning, match=r"corrupt checkpoint.*ckpt-000000000024.*truncated or corrupted"):
        trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert trainer.policies.policies[0].resumed_from == previous


def test_a_failed_write_warns_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch):
    directory = tmp_path / "c"
    policy = Checkpoint(directory, every_n_epochs=1)
    trainer = SafeTrainer(build(), policies=[policy])
    calls = {"n": 0}
    original = checkpoint._write_state

    def disk_full_on_second_checkpoint(path, chunks):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:  # half a file, then the disk is full
                f.write(b"x" * 100)
            raise OSError(28, "No space left on device")
        return original(path, chunks)

    monkeypatch.setattr(checkpoint, "_write_state", disk_full_on_second_checkpoint)
    with pytest.warns(CheckpointWarning, match=r"No space left on device.*previous checkpoint is intact"):
        history = trainer.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    names = sorted(os.listdir(directory))
    assert names == ["ckpt-000000000012", "ckpt-000000000036"]  # epoch 2's write failed, nothing half-written
    assert policy.failures and "No space left" in policy.failures[0]


def test_a_checkpoint_of_another_model_is_refused_before_training(tmp_path):
    directory = tmp_path / "c"
    SafeTrainer(build(), policies=[Checkpoint(directory)]).fit(x, y, epochs=1, verbose=0)
    keras.utils.set_random_seed(0)
    other = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.2), keras.layers.Dense(1)]
    )
    other.compile(optimizer="adam", loss="mse", metrics=["mae"])
    before = [w.copy() for w in other.get_weights()]
    with pytest.raises(
        CheckpointMismatch,
        match=r"written for another model: its model differ \(entry 0 is "
        r"\[\[8, 16\], 'float32'\] in the checkpoint, \[\[8, 32\]",
    ):
        SafeTrainer(other, policies=[Checkpoint(directory)]).fit(x, y, epochs=2, verbose=0)
    for a, b in zip(before, other.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_finished_run_resumes_to_its_end(tmp_path):
    directory = tmp_path / "c"
    first = SafeTrainer(build(), policies=[Checkpoint(directory)])
    h1 = first.fit(x, y, epochs=2, verbose=0)
    again = SafeTrainer(build(), policies=[Checkpoint(directory)])
    h2 = again.fit(x, y, epochs=2, verbose=0)
    assert h2.epoch == [0, 1] and h2.history["loss"] == h1.history["loss"]
    assert int(again.model.optimizer.iterations) == int(first.model.optimizer.iterations)
