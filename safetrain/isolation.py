"""Process isolation, for memory only a new process gives back.

`run_isolated(fn, *args, **kwargs)` runs `fn` in a fresh *spawned* Python process and returns its result:
whatever TensorFlow, the allocator or a library keeps is returned to the OS when the child exits. An
exception in the child is raised in the parent, with the child's traceback attached; a child that dies
(OOM killer, a signal, a crash) is an `IsolatedProcessError` naming the signal.

    for fold in folds:
        scores.append(safetrain.run_isolated(train_fold, fold))   # train_fold: a module-level function

`restart_process()` re-executes the current command line in place (`os.execv`); `MemoryBudget(action=
"restart")` checkpoints first, so the new process resumes exactly where this one stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from safetrain.errors import IsolatedProcessError, RemoteTraceback

__all__ = ["run_isolated", "IsolatedProcessError", "RemoteTraceback", "restart_process", "RESTARTS_ENV"]

RESTARTS_ENV = "SAFETRAIN_RESTARTS"


def _child(conn, fn, args, kwargs) -> None:
    try:
        result = fn(*args, **kwargs)
        payload = ("ok", result)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            pickle.dumps(e)
            exc = e
        except Exception:  # noqa: BLE001 - an unpicklable exception: send its type name and message
            exc = None
        payload = ("error", (exc, type(e).__name__, str(e), text))
    try:
        conn.send(payload)
    except Exception as e:  # noqa: BLE001 - the result itself may not pickle
        conn.send(
            (
                "error",
                (None, type(e).__name__, f"the result of {fn!r} could not be sent back: {e}", traceback.format_exc()),
            )
        )
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run `fn(*args, **kwargs)` in a fresh spawned process and return its result.

    `fn`, its arguments and its result must be picklable (a module-level function; NumPy arrays are
    fine). Raises what `fn` raised (with the child's traceback as `__cause__`), or `IsolatedProcessError`
    if the child died, e.g. "killed by signal SIGKILL" after the OOM killer.

    Example:
        >>> def train_fold(i):
        ...     trainer = SafeTrainer(build_model)
        ...     trainer.fit(x[train[i]], y[train[i]], epochs=5, verbose=0)
        ...     return trainer.evaluate(x[val[i]], y[val[i]], verbose=0, return_dict=True)
        >>> scores = [run_isolated(train_fold, i) for i in range(10)]    # the parent's RSS stays flat
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
        raise TypeError(
            f"`fn` must be picklable to run in another process (a module-level function, not a lambda or closure): {e}"
        ) from e
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args, kwargs), daemon=False)
    process.start()
    sender.close()
    try:
        message = receiver.recv()
    except EOFError:
        message = None
    finally:
        receiver.close()
    process.join()
    if message is None:
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (the OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
            raise IsolatedProcessError(
                f"The isolated process running {getattr(fn, '__name__', fn)} was killed by signal {name}{hint}."
            )
        raise IsolatedProcessError(
            f"The isolated process running {getattr(fn, '__name__', fn)} exited with code "
            f"{code} without returning a result."
        )
    kind, payload = message
    if kind == "ok":
        return payload
    exc, type_name, text, remote_tb = payload
    if exc is None:
        exc = IsolatedProcessError(f"{type_name}: {text}")
    raise exc from RemoteTraceback(remote_tb)


def restart_process() -> None:
    """Replace this process with a fresh run of the same command line (`os.execv`); never returns.

    The number of restarts so far is passed on in the `SAFETRAIN_RESTARTS` environment variable.
    """
    os.environ[RESTARTS_ENV] = str(int(os.environ.get(RESTARTS_ENV, "0")) + 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    os.execv(sys.executable, [sys.executable] + argv[1:])
