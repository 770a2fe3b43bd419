"""Checkpoints on disk: atomic, checksummed, pruned; and the training state they hold (`save`, `load_latest`).

The `Checkpoint` policy in `policies.py` decides when; `trainer.save_checkpoint` / `load_checkpoint` call
`save` / `load_latest` here.

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
from collections.abc import Mapping
from typing import Any

import numpy as np

from safetrain import _compat, distributed
from safetrain.errors import CheckpointCorrupt, CheckpointMismatch, CheckpointWarning, ConfigurationError
from safetrain.snapshot import Snapshot, signature

__all__ = [
    "write",
    "latest",
    "prune",
    "list_checkpoints",
    "save",
    "load_latest",
    "training_state",
    "CheckpointCorrupt",
    "CheckpointMismatch",
    "CheckpointWarning",
    "FORMAT",
]

FORMAT = "safetrain-checkpoint-2"
PREFIX = "ckpt-"


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
        chunks.append(value.data.cast("B"))
        index.append({"name": name, "dtype": value.dtype.str, "shape": shape, "offset": offset, "nbytes": value.nbytes})
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
        raise CheckpointCorrupt(
            f"{path}: state.bin is {len(state)} bytes and fails its CRC-32 check "
            f"(expected {meta.get('state_bytes')} bytes): truncated or corrupted"
        )
    arrays = {}
    for entry in meta["arrays"]:
        raw = state[entry["offset"] : entry["offset"] + entry["nbytes"]]
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
            warnings.warn(
                f"Skipping a corrupt checkpoint: {e}. Using the previous one.", CheckpointWarning, stacklevel=2
            )
            continue
        return path, arrays, meta
    return None


def prune(directory: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints."""
    for path in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# -- the training state a checkpoint holds ----------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def training_state(trainer) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Everything a checkpoint holds: every variable value (as arrays) and, as JSON-able metadata, the
    counters, the data position, the History so far and the model's signature."""
    snapshot = Snapshot.take(trainer, structure=False)
    history = _compat.history_of(trainer.callbacks) if trainer.callbacks is not None else None
    position = trainer.progress.position
    meta = {
        "counters": snapshot.counters,
        "position": None if position is None else position.state_dict(),
        "history": None
        if history is None
        else {
            "epoch": list(getattr(history, "epoch", [])),
            "history": {k: list(v) for k, v in history.history.items()},
        },
        "signature": signature(trainer.model),
    }
    return snapshot.arrays(), json.loads(json.dumps(meta, default=_jsonable))


def save(trainer, directory: str, keep: int = 2) -> str | None:
    """Write the trainer's state as `ckpt-<global step>` in `directory`, keep the newest `keep`; returns the
    path, or None on a worker other than the chief (every worker builds the state: reading some variables
    is a collective). Raises `OSError` if writing failed; the previous checkpoints are intact then."""
    arrays, meta = training_state(trainer)
    if not distributed.is_chief(trainer.strategy):
        return None
    path = write(directory, f"{PREFIX}{trainer.progress.global_step:012d}", arrays, meta)
    prune(directory, keep)
    return path


def _describe_mismatch(saved: Mapping | None, expected: Mapping) -> str:
    if not saved:
        return "The checkpoint has no model signature; it was not written by safetrain's Checkpoint."
    for group in ("layers", "model", "optimizer", "metrics"):
        a, b = saved.get(group, []), expected[group]
        if a != b:
            if len(a) != len(b):
                detail = f"{len(a)} entries in the checkpoint, {len(b)} in this model"
            else:
                i = next(i for i, (u, v) in enumerate(zip(a, b)) if u != v)
                detail = f"entry {i} is {a[i]} in the checkpoint, {b[i]} in this model"
            return (
                f"This checkpoint was written for another model: its {group} differ ({detail}). Point "
                "Checkpoint at a new directory for a new model, or delete the old checkpoints."
            )
    return "This checkpoint was written for another model."


def _agree(strategy, directory: str, found) -> None:
    """In a multi-worker run, every worker must resume from the same checkpoint: the directory is shared."""
    if not distributed.is_multi_worker(strategy):
        return
    name = os.path.basename(found[0]) if found is not None else ""
    step = float(name[len(PREFIX) :]) if name.startswith(PREFIX) else -1.0
    steps = distributed.per_worker_values(strategy, step)
    if len(set(steps)) > 1:
        seen = ", ".join(f"worker {i}: {'none' if s < 0 else f'step {int(s)}'}" for i, s in enumerate(steps))
        raise ConfigurationError(
            f"Checkpoint: the workers see different checkpoints in {directory!r} ({seen}). In a multi-worker "
            "run only the chief writes checkpoints, so `directory` must be on storage that every worker reads "
            "(a shared filesystem or a bucket path)."
        )


def load_latest(trainer, directory: str) -> tuple[str, dict[str, Any]] | None:
    """Load the newest valid checkpoint in `directory` into the trainer: every value, and its progress with
    the data position to resume at. Returns `(path, meta)`, or None when there is none.

    Raises `CheckpointMismatch` when it was written for another model.
    """
    found = latest(directory, clean=distributed.is_chief(trainer.strategy))
    _agree(trainer.strategy, directory, found)
    if found is None:
        return None
    path, arrays, meta = found
    expected = json.loads(json.dumps(signature(trainer.model)))
    if meta.get("signature") != expected:
        raise CheckpointMismatch(_describe_mismatch(meta.get("signature"), expected))
    Snapshot.from_arrays(dict(arrays), dict(meta["counters"])).restore_values(trainer)
    trainer.progress.load_state_dict({"position": meta.get("position")})
    return path, meta
