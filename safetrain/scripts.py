"""Running a user's script as `python script.py args` would, with patches put in as the libraries it imports
load: for the doctor's child and `safetrain plan`.

    after_import("keras", patch_keras)      # whenever the script imports Keras (after its own settings)
    with as_main("train.py", ["--epochs", "5"]) as module:
        run_script(module)                  # the script's exceptions, SystemExit included, propagate
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence

__all__ = ["as_main", "run_script", "after_import"]


@contextlib.contextmanager
def as_main(script: str, args: Sequence[str] = (), restore: bool = True) -> Iterator[types.ModuleType]:
    """A fresh `__main__` module for `script`, with `sys.argv` and `sys.path[0]` as Python sets them for
    `python script args`. With `restore`, `sys.argv`, `sys.path` and `__main__` are put back on exit; without
    it the script's namespace stays alive (the doctor's census reads what it holds at the end)."""
    saved = sys.argv, list(sys.path), sys.modules.get("__main__")
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    module = types.ModuleType("__main__")
    module.__file__ = script
    sys.modules["__main__"] = module
    try:
        yield module
    finally:
        if restore:
            sys.argv, sys.path[:] = saved[0], saved[1]
            if saved[2] is not None:
                sys.modules["__main__"] = saved[2]


def run_script(module: types.ModuleType) -> None:
    """Execute the script `module.__file__` names in `module`'s namespace."""
    with open(module.__file__ or "", "rb") as f:
        code = compile(f.read(), module.__file__ or "", "exec")
    exec(code, module.__dict__)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Call `callback` right after module `name` is first executed, whoever imports it and in whatever order
    (so that whatever the script sets before importing TensorFlow, such as environment variables, still applies).

    The finder stays first on `sys.meta_path` until the module has run: a mere look-up
    (`importlib.util.find_spec("keras")`, which TensorFlow's import does) gets a spec that is thrown away,
    and the import that follows comes back here for a new one.
    """

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback()

        spec.loader.exec_module = exec_then_patch
        return spec


def after_import(name: str, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` once module `name` has run: now if it already has, else right after its first import.
    Returns what takes the hook out again where the module was never imported."""
    if name in sys.modules:
        callback()
        return lambda: None
    hook = _AfterImport(name, callback)
    sys.meta_path.insert(0, hook)
    return lambda: sys.meta_path.remove(hook) if hook in sys.meta_path else None
