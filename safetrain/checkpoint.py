"""Checkpoints on disk: atomic, checksummed, pruned; the policy that writes them lives in `policies.py`.

A checkpoint is a directory `ckpt-<global step>` holding `state.bin` (every variable value a `Snapshot` holds,
raw, one after the other) and `meta.json` (where each array lies in `state.bin`, its CRC-32 and size, and the
counters, data position, History and the model's signature).
It is written as `.tmp-*` beside the previous ones, every file fsynced, then renamed into place (an atomic
rename on POSIX) and the folder fsynced; older checkpoints are removed only after that. A process killed at
any moment leaves either the previous checkpoint or the new one, plus at most a `.tmp-*` folder that the
next start removes. A checkpoint that fails its checksum is reported and skipped for the previous one.

Example:
    >>> path = write(directory, "ckpt-0000000120", arrays, meta)
    >>> found = latest(directory)          # (path, arrays, meta) of the newest valid one, or None
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from typing import Any

import numpy as np

from safetrain.errors import SafetrainError

__all__ = ["write", "latest", "prune", "list_checkpoints", "CheckpointCorrupt", "CheckpointMismatch",
           "CheckpointWarning", "FORMAT"]

FORMAT = "safetrain-checkpoint-2"
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


def _encode(arrays: dict[str, np.ndarray]) -> tuple[list[memoryview], list[dict]]:
    """The arrays' raw bytes, in order, and where each will lie in `state.bin`."""
    chunks, index, offset = [], [], 0
    for name, value in arrays.items():
        value = np.asarray(value)
        shape = list(value.shape)  # ascontiguousarray makes 0-d arrays 1-d: keep the real shape
        value = np.ascontiguousarray(value)
        if value.dtype == object:
            raise TypeError(f"checkpoint array {name!r} has dtype object")
        chunks.append(memoryview(value).cast("B"))
        index.append({"name": name, "dtype": value.dtype.str, "shape": shape, "offset": offset,
                      "nbytes": value.nbytes})
        offset += value.nbytes
    return chunks, index


def _write_state(path: str, chunks: list) -> tuple[int, int]:
    """Write chunks to `path`, fsynced; returns (bytes, CRC-32)."""
    crc, size = 0, 0
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return size, crc


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
        chunks, index = _encode(arrays)
        size, crc = _write_state(os.path.join(tmp, "state.bin"), chunks)
        full_meta = dict(meta, format=FORMAT, arrays=index, state_crc32=crc, state_bytes=size)
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
        with open(os.path.join(path, "state.bin"), "rb") as f:
            state = f.read()
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    if len(state) != meta.get("state_bytes") or zlib.crc32(state) != meta.get("state_crc32"):
        raise CheckpointCorrupt(f"{path}: state.bin is {len(state)} bytes and fails its CRC-32 check "
                                f"(expected {meta.get('state_bytes')} bytes): truncated or corrupted")
    arrays = {}
    for entry in meta["arrays"]:
        raw = state[entry["offset"]:entry["offset"] + entry["nbytes"]]
        arrays[entry["name"]] = np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()
    return arrays, meta


def latest(directory: str, clean: bool = True) -> tuple[str, dict[str, np.ndarray], dict[str, Any]] | None:
    """The newest checkpoint in `directory` that reads and verifies, or None.

    Leftover `.tmp-*` folders (a write that was interrupted) are removed unless `clean` is False (a worker
    that only reads a directory the chief writes); a corrupt checkpoint is reported with a
    `CheckpointWarning` and the previous one is used.
    """
    if not os.path.isdir(directory):
        return None
    for name in os.listdir(directory) if clean else ():
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
