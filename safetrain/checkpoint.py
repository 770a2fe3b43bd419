"""Checkpoints on disk: atomic, checksummed, pruned; the policy that writes them lives in `policies.py`.

A checkpoint is a directory `ckpt-<global step>` holding `state.npz` (every variable value a `Snapshot` holds)
and `meta.json` (counters, data position, History, the model's signature and the SHA-256 of `state.npz`).
It is written as `.tmp-*` beside the previous ones, every file fsynced, then renamed into place (an atomic
rename on POSIX) and the folder fsynced; older checkpoints are removed only after that. A process killed at
any moment leaves either the previous checkpoint or the new one, plus at most a `.tmp-*` folder that the
next start removes. A checkpoint that fails its checksum is reported and skipped for the previous one.

Example:
    >>> path = write(directory, "ckpt-0000000120", arrays, meta)
    >>> found = latest(directory)          # (path, arrays, meta) of the newest valid one, or None
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from typing import Any

import numpy as np

from safetrain.errors import SafetrainError

__all__ = ["write", "latest", "prune", "list_checkpoints", "CheckpointCorrupt", "CheckpointMismatch",
           "CheckpointWarning", "FORMAT"]

FORMAT = "safetrain-checkpoint-1"
PREFIX = "ckpt-"


class CheckpointCorrupt(SafetrainError, ValueError):
    """A checkpoint's files are missing, truncated or fail their checksum."""


class CheckpointMismatch(SafetrainError, ValueError):
    """A checkpoint was written for another model (its variables do not match this one's)."""


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written (training goes on) or was skipped as corrupt."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _encode(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write(directory: str, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write one checkpoint atomically; returns its path (unchanged if one of that name exists already).

    Raises `OSError` (disk full, permissions) after removing its temporary folder; what was there before
    is untouched.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, name)
    if os.path.exists(final):
        return final
    tmp = os.path.join(directory, f".tmp-{name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        state = _encode(arrays)
        _write_file(os.path.join(tmp, "state.npz"), state)
        full_meta = dict(meta, format=FORMAT, state_sha256=hashlib.sha256(state).hexdigest(),
                         state_bytes=len(state))
        _write_file(os.path.join(tmp, "meta.json"), json.dumps(full_meta).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint folders in `directory`, oldest first (by the step in their name)."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.startswith(PREFIX) and os.path.isdir(os.path.join(directory, n))]
    return [os.path.join(directory, n) for n in sorted(names)]


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify one checkpoint; raises `CheckpointCorrupt` saying what is wrong."""
    try:
        with open(os.path.join(path, "meta.json"), "rb") as f:
            meta = json.loads(f.read())
        with open(os.path.join(path, "state.npz"), "rb") as f:
            state = f.read()
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    if len(state) != meta.get("state_bytes") or hashlib.sha256(state).hexdigest() != meta.get("state_sha256"):
        raise CheckpointCorrupt(f"{path}: state.npz is {len(state)} bytes and fails its SHA-256 check "
                                f"(expected {meta.get('state_bytes')} bytes): truncated or corrupted")
    with np.load(io.BytesIO(state), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, meta


def latest(directory: str) -> tuple[str, dict[str, np.ndarray], dict[str, Any]] | None:
    """The newest checkpoint in `directory` that reads and verifies, or None.

    Leftover `.tmp-*` folders (a write that was interrupted) are removed; a corrupt checkpoint is reported
    with a `CheckpointWarning` and the previous one is used.
    """
    if not os.path.isdir(directory):
        return None
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    for path in reversed(list_checkpoints(directory)):
        try:
            arrays, meta = read(path)
        except CheckpointCorrupt as e:
            warnings.warn(f"Skipping a corrupt checkpoint: {e}. Using the previous one.", CheckpointWarning,
                          stacklevel=2)
            continue
        return path, arrays, meta
    return None


def prune(directory: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints."""
    for path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
