"""Working under a `tf.distribute` strategy: who is the chief, and what every worker has to agree on.

A `MirroredStrategy` is one process; a `MultiWorkerMirroredStrategy` is one process per host, each
running the same script, kept in lockstep by collective ops. Anything a worker decides on its own (the
size of the next chunk of steps, whether memory is over budget, whether to stop) must be the same on
every worker, or the workers run different collectives and wait on each other forever. The functions
here make such decisions together; they are collectives themselves, so every worker must call them at
the same point.

Example:
    >>> strategy = tf.distribute.MultiWorkerMirroredStrategy()
    >>> if is_chief(strategy):
    ...     print("only one worker prints this")
    >>> peak = max_across_workers(strategy, current_rss_mb())   # the same number on every worker
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import shutil
import tempfile
import weakref

import numpy as np
import tensorflow as tf

from safetrain import _compat
from safetrain.errors import ConfigurationError, WorkerFailure

__all__ = [
    "WorkerFailure",
    "is_multi_worker",
    "is_chief",
    "worker_index",
    "num_workers",
    "gather_across_workers",
    "per_worker_values",
    "max_across_workers",
    "min_across_workers",
    "any_across_workers",
    "chief_only_path",
    "callbacks_for_worker",
    "worker_failures",
    "reports_worker_failures",
    "check_model_strategy",
    "COLLECTIVE_ERRORS",
]

# What a collective raises on the surviving workers when a peer died or stopped answering.
COLLECTIVE_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.InternalError,
)


def _resolver(strategy):
    return getattr(strategy, "cluster_resolver", None)


def is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    """True when `strategy` spans more than one process (a multi-worker `MultiWorkerMirroredStrategy`)."""
    if strategy is None:
        return False
    in_multi = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi()) if callable(in_multi) else False


def worker_index(strategy: tf.distribute.Strategy | None) -> int:
    """This process's index among the workers (0 on one machine)."""
    resolver = _resolver(strategy) if is_multi_worker(strategy) else None
    return int(resolver.task_id or 0) if resolver is not None else 0


def num_workers(strategy: tf.distribute.Strategy | None) -> int:
    """How many worker processes the strategy spans (1 on one machine)."""
    if not is_multi_worker(strategy):
        return 1
    spec = _resolver(strategy).cluster_spec().as_dict()
    return sum(len(spec.get(job, ())) for job in ("chief", "worker"))


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """True on the one process that writes checkpoints, logs and progress: worker 0, or the task of type
    "chief" when the cluster has one. Always True without a multi-worker strategy."""
    if not is_multi_worker(strategy):
        return True
    resolver = _resolver(strategy)
    task_type = resolver.task_type
    if task_type == "chief":
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return False
    return task_type in (None, "worker") and int(resolver.task_id or 0) == 0


def gather_across_workers(strategy: tf.distribute.Strategy | None, value: float) -> np.ndarray:
    """Every worker's `value`, one entry per replica (a collective: every worker must call it).

    On one machine (no multi-worker strategy) this is just `[value]`, with no collective.
    """
    if not is_multi_worker(strategy):
        return np.asarray([value], dtype=np.float64)
    assert strategy is not None
    local = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant([value], tf.float64))
    try:
        gathered = _gather_function(strategy)(local)
    except COLLECTIVE_ERRORS as error:
        raise worker_failure(error) from None
    return np.asarray(gathered.numpy(), dtype=np.float64)


_GATHER_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gather_function(strategy):
    # One traced function per strategy: an eager `strategy.gather` traces a new function on every call,
    # and a graph per epoch is exactly the kind of growth this library exists to prevent.
    function = _GATHER_FUNCTIONS.get(strategy)
    if function is None:
        function = tf.function(lambda values: strategy.gather(values, axis=0), autograph=False)
        _GATHER_FUNCTIONS[strategy] = function
    return function


def per_worker_values(strategy, value: float) -> list[float]:
    """Every worker's `value`, one entry per worker in worker order (a collective)."""
    values = gather_across_workers(strategy, value)
    workers = num_workers(strategy)
    if workers > 1 and len(values) % workers == 0:
        values = values.reshape(workers, -1)[:, 0]  # gathered worker by worker, one entry per replica
    return [float(v) for v in values]


def max_across_workers(strategy, value: float) -> float:
    """The largest `value` over all workers (the same result on each; a collective)."""
    return float(gather_across_workers(strategy, value).max())


def min_across_workers(strategy, value: float) -> float:
    """The smallest `value` over all workers (the same result on each; a collective)."""
    return float(gather_across_workers(strategy, value).min())


def any_across_workers(strategy, flag: bool) -> bool:
    """True on every worker when `flag` is True on any of them (a collective)."""
    return bool(gather_across_workers(strategy, 1.0 if flag else 0.0).max() > 0)


def chief_only_path(strategy, path: str) -> str:
    """`path` on the chief; on other workers a private temporary path that can be written and deleted.

    The same pattern TensorFlow's multi-worker tutorial uses for saving: every worker runs the same save
    code (which may include collectives), but only the chief's files are kept.
    """
    if is_chief(strategy):
        return path
    return os.path.join(tempfile.mkdtemp(prefix=f"safetrain_worker{worker_index(strategy)}_"), os.path.basename(path))


def worker_failure(error: BaseException) -> WorkerFailure:
    """A `WorkerFailure` explaining a collective op's error on a surviving worker."""
    message = str(getattr(error, "message", error))
    # TensorFlow names the failed tasks after "unhealthy ..." or "reported from ..."; op names come first.
    tail = message.split("}}", 1)[-1]
    tasks = sorted(set(re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", tail)))
    who = ", ".join(f"{job} {task}" for job, task in tasks) or "another worker"
    reason = "stopped sending heartbeats" if "heartbeat" in message else type(error).__name__
    return WorkerFailure(
        f"Multi-worker training stopped: {who} failed or became unreachable ({reason}), so the collective "
        "operations this worker was running were aborted instead of waiting forever. Check that worker's "
        "log for the first error, then restart all workers; a Checkpoint policy resumes them from the "
        f"last checkpoint. TensorFlow said: {' '.join(tail.split())[:400]}"
    )


@contextlib.contextmanager
def worker_failures(strategy):
    """Turn a collective's error on a surviving worker into a `WorkerFailure` (multi-worker runs only).

    TensorFlow's coordination service notices a worker that stopped sending heartbeats and aborts the
    collectives of the others, which then raise `UnavailableError` and the like; this says what that means.
    A worker that hangs while its process stays alive is only noticed with a collective timeout, set when
    the strategy is made: `CommunicationOptions(timeout_seconds=...)`.
    """
    if not is_multi_worker(strategy):
        yield
        return
    try:
        yield
    except COLLECTIVE_ERRORS as error:
        raise worker_failure(error) from error


def _is_instance(callback, names: tuple[str, ...]) -> bool:
    return any(c.__name__ in names and c.__module__.startswith(("keras", "safetrain")) for c in type(callback).__mro__)


# Callbacks whose only effect is writing logs or progress: on other workers they are left out.
_LOG_WRITERS = ("CSVLogger", "TensorBoard", "ProgbarLogger", "ProgressBar", "RemoteMonitor")


def callbacks_for_worker(strategy, callbacks):
    """The callbacks this worker runs, and a function that cleans up after them at the end of training.

    On the chief: all of them. On other workers: log and progress writers are left out (as is any callback
    with `_chief_worker_only = True`); `ModelCheckpoint` runs (saving can involve collectives that every
    worker must join) but writes into a private temporary folder that is removed afterwards; and
    `BackupAndRestore` keeps its own per-worker folder, so every worker restores the same state.
    """
    callbacks = list(callbacks or [])
    if is_chief(strategy):
        return callbacks, lambda: None
    kept, temporary = [], []
    for cb in callbacks:
        if _compat.chief_worker_only(cb) or _is_instance(cb, _LOG_WRITERS):
            continue
        if _is_instance(cb, ("ModelCheckpoint",)):
            cb = copy.copy(cb)
            cb.filepath = chief_only_path(strategy, os.fspath(cb.filepath))
            temporary.append(os.path.dirname(cb.filepath))
        elif _is_instance(cb, ("BackupAndRestore",)):
            cb = copy.copy(cb)
            backup_dir = os.path.join(cb.backup_dir, f"worker_{worker_index(strategy)}")
            for attr in ("_weights_path", "_training_metadata_path", "_prev_weights_path"):
                if hasattr(cb, attr):
                    setattr(cb, attr, os.path.join(backup_dir, os.path.basename(getattr(cb, attr))))
            cb.backup_dir = backup_dir
        kept.append(cb)

    def cleanup():
        for folder in temporary:
            shutil.rmtree(folder, ignore_errors=True)

    return kept, cleanup


def check_model_strategy(model, strategy: tf.distribute.Strategy) -> None:
    """A model whose variables exist already must have made them under `strategy`."""
    own = _compat.model_strategy(model)
    if own is not None and own is not strategy:
        raise ConfigurationError(
            f"`strategy`: the model was built under another strategy ({type(own).__name__}); "
            "pass that one, or a model factory, which SafeTrainer calls inside `strategy`."
        )
    if own is None and model.variables and strategy.num_replicas_in_sync > 1:
        raise ConfigurationError(
            f"`strategy`: the model's variables were made outside {type(strategy).__name__}'s "
            "scope. Build and compile it inside `with strategy.scope():`, or pass a factory "
            "(a function returning the compiled model), which SafeTrainer calls in the scope."
        )


def reports_worker_failures(method):
    """Run `method` so that, in a multi-worker run, a dead peer surfaces as `WorkerFailure`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with worker_failures(self.strategy):
            return method(self, *args, **kwargs)

    return wrapper
