"""Where in the user's script: the frames of the script and its own modules, out of Keras, TensorFlow, safetrain,
site-packages and the standard library; and the lines the report quotes.

    sites = Sites("/home/me/project/train.py")
    sites.here()              # [("/home/me/project/train.py", 42), ("/home/me/project/train.py", 57)]
    group([...])              # [{"file": "train.py", "line": 42, "source": "model = build()", "count": 20}]
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["Sites", "group", "describe", "events_lines", "model_lines", "kept_lines"]

_SAFETRAIN = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
_LIBRARIES = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if p
)


class Sites:
    """The frames that belong to the script at `script` (its folder and below, not an installed library); with
    `script` None, every file outside the libraries."""

    def __init__(self, script: str | None) -> None:
        # Without a script (LeakDetector, an interactive session), any file outside the libraries is the user's.
        self.root = os.path.realpath(os.path.dirname(os.path.abspath(script))) + os.sep if script else os.sep
        self._mine: dict[str, bool] = {}

    def is_users(self, filename: str) -> bool:
        known = self._mine.get(filename)
        if known is None:
            path = os.path.realpath(filename) if not filename.startswith("<") else ""
            known = (
                bool(path)
                and path.startswith(self.root)
                and not path.startswith(_SAFETRAIN)
                and not path.startswith(_LIBRARIES)
                and "site-packages" not in path
                and "dist-packages" not in path
            )
            self._mine[filename] = known
        return known

    def here(self, limit: int = 2, skip: int = 2) -> list[tuple[str, int]]:
        """The innermost `limit` frames of the user's code on the current stack (innermost first), skipping
        `skip` frames (the caller's own)."""
        frame: types.FrameType | None = sys._getframe(skip)
        found: list[tuple[str, int]] = []
        while frame is not None and len(found) < limit:
            filename = frame.f_code.co_filename
            if self.is_users(filename):
                found.append((filename, frame.f_lineno))
            frame = frame.f_back
        return found

    def defined(self, func) -> tuple[str, int] | None:
        """Where `func` is defined, when that is in the user's code."""
        code = getattr(getattr(func, "__wrapped__", func), "__code__", None)
        if code is None or not self.is_users(code.co_filename):
            return None
        line = code.co_firstlineno  # a decorated function's first line is its first decorator's: find the def
        for n in range(line, line + 12):
            if linecache.getline(code.co_filename, n).lstrip().startswith(("def ", "async def ")):
                return code.co_filename, n
        return code.co_filename, line


def describe(filename: str, line: int, count: int | None = None, role: str | None = None) -> dict:
    """One line of the user's script as the report shows it: the file (relative to the current folder when
    under it), the line number and the source line, stripped."""
    relative = os.path.relpath(filename)
    shown = filename if relative.startswith("..") else relative
    entry: dict = {"file": shown, "line": int(line), "source": linecache.getline(filename, int(line)).strip()}
    if count is not None:
        entry["count"] = count
    if role is not None:
        entry["role"] = role
    return entry


def group(sites: Iterable[Sequence], role: str | None = None, limit: int = 3) -> list[dict]:
    """The most frequent of `sites` (`(file, line)` pairs), with how often each came, as `describe` gives them."""
    counts = Counter((str(f), int(n)) for f, n in sites)
    return [describe(f, n, count=c, role=role) for (f, n), c in counts.most_common(limit)]


def events_lines(events: Sequence[Mapping], depth: int = 0, role: str | None = None) -> list[dict]:
    """The user's lines the recorded events came from (their `where`, innermost frame first, `depth` frames
    out), the most frequent first."""
    return group((e["where"][depth] for e in events if len(e.get("where") or ()) > depth), role=role)


def model_lines(models: Sequence[Mapping]) -> list[dict]:
    """Where models were constructed, and the calls in the loop that reached those lines (a builder's caller)."""
    inner = events_lines(models, 0, "constructed")
    outer = [o for o in events_lines(models, 1, "called") if all(o["line"] != i["line"] for i in inner)]
    return inner + outer


def kept_lines(holders: Iterable[Mapping]) -> list[dict]:
    """The lines of the user's code that add to the places holding the data that grew (`holders` of a record)."""
    out = []
    for h in holders:
        role = f"adds to {h['holder']}"
        out += [describe(f, n, role=role) for f, n in h.get("lines", ())[:2]]
    return out
