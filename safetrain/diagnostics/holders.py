"""Who keeps the objects that grew: the named places that hold them (an attribute of an object, a module's
global, a function's local, reached through lists, tuples and dicts), and the lines of the user's code that add
to each.

    found = holders({"EagerTensor"}, Sites("train.py"))
    found[0]["holder"], found[0]["bytes"], found[0]["lines"]
    # 'KeepOutputs.outputs', 41943040, [("/home/me/train.py", 30)]

Lifetime, not bytes subtracted: the objects are those alive now, each counted once, at the place that keeps it.
With `watch` (the data addresses of arrays a call returned, `predict`'s), each holder also says how many of its
bytes are such arrays (`watched_bytes`): the script keeps what the call returned.
"""

from __future__ import annotations

import ast
import collections
import gc
import sys
import types
from collections.abc import Iterable, Set
from typing import Any

from safetrain.diagnostics.measure import _TENSOR_TYPES, _array_bytes, _buffer_bytes, live_buffers
from safetrain.diagnostics.sites import Sites

__all__ = ["holders", "mutations", "array_addresses"]

_HOLDS = (list, tuple, dict, set, frozenset, collections.deque)
#: methods that add to a container
MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft", "extendleft"})
#: how many containers up from the objects a holder's name is looked for
MAX_DEPTH = 4


def array_addresses(value: Any) -> list[int]:
    """The data addresses of the NumPy arrays in `value` (nested lists, tuples and dicts)."""
    np = sys.modules.get("numpy")
    if np is None:
        return []
    out: list[int] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, np.ndarray):
            out.append(int(v.__array_interface__["data"][0]))
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def holders(
    type_names: Iterable[str], sites: Sites, watch: Set[int] = frozenset(), limit: int = 3, min_bytes: int = 1 << 20
) -> list[dict]:
    """The places that hold the live objects of `type_names` (arrays, tensors, bytes), most bytes first: `[{holder,
    kind, name, bytes, objects, watched_bytes, lines}]` with `lines` the `(file, line)` of the user's code that
    add to it (`mutations`), for at most `limit` holders of at least `min_bytes`.

    `kind` is "attribute" (`holder` = "Class.name"), "global" ("module.name") or "local" ("function.name");
    a holder reached through a container in a container is named by the outermost ("history['loss']" counts
    as `history`).
    """
    names = set(type_names)
    gc.collect()
    objects = gc.get_objects()
    data: dict[int, tuple[int, bool]] = {}  # id -> (bytes held, a watched array)
    for o in objects:
        if type(o).__name__ in names and type(o).__name__ in _TENSOR_TYPES:
            data[id(o)] = (_buffer_bytes(o), False)
    np = sys.modules.get("numpy")
    buffers: set[type] = {t for t in (bytes, bytearray) if t.__name__ in names}
    if np is not None and names & {"ndarray", "memmap"}:
        buffers |= {np.ndarray, np.memmap}
    for a in live_buffers(objects, buffers).values() if buffers else ():
        if type(a).__name__ not in names:
            continue
        if np is not None and isinstance(a, np.ndarray):
            if a.base is None:
                data[id(a)] = (_array_bytes(a), int(a.__array_interface__["data"][0]) in watch)
        else:
            data[id(a)] = (sys.getsizeof(a), False)
    # The containers that hold them directly: [container, bytes, objects, watched bytes] by id.
    kinds = {t for t in set(map(type, objects)) if issubclass(t, _HOLDS)}
    direct: dict[int, list] = {}
    for c in objects:
        if type(c) not in kinds:
            continue
        for r in gc.get_referents(c):
            item = data.get(id(r))
            if item is not None:
                row = direct.setdefault(id(c), [c, 0, 0, 0])
                row[1] += item[0]
                row[2] += 1
                row[3] += item[0] if item[1] else 0
    # Many small containers in one list (a list of per-step lists): merged into that list, found in one more pass.
    sequences = {t for t in kinds if not issubclass(t, dict)}
    merged: dict[int, list] = {}
    placed: set[int] = set()
    for c in objects:
        if type(c) not in sequences:
            continue
        for r in gc.get_referents(c):
            child = direct.get(id(r))
            if child is not None and id(r) not in placed and r is not c:
                placed.add(id(r))
                row = merged.setdefault(id(c), [c, 0, 0, 0])
                for i in (1, 2, 3):
                    row[i] += child[i]
    del objects
    for key in placed:
        direct.pop(key, None)
    for key, row in merged.items():
        own = direct.setdefault(key, [row[0], 0, 0, 0])
        for i in (1, 2, 3):
            own[i] += row[i]
    merged.clear()
    rows = sorted(direct.values(), key=lambda e: -e[1])[:16]
    direct.clear()
    ignore = {id(row) for row in rows}  # each row refers to its container: not a holder
    found: dict[tuple, dict] = {}
    for row in rows:
        if row[1] < min_bytes / 16:
            break
        named = _name(row[0], sites, ignore)
        if named is None:
            continue
        holder, kind, name, files = named
        place = found.setdefault(
            (holder, kind, name),
            dict(holder=holder, kind=kind, name=name, bytes=0, objects=0, watched_bytes=0, files=files),
        )
        place["bytes"] += row[1]
        place["objects"] += row[2]
        place["watched_bytes"] += row[3]
    rows.clear()
    out = []
    for place in sorted(found.values(), key=lambda e: -e["bytes"])[:limit]:
        if place["bytes"] < min_bytes:
            continue
        files = place.pop("files")
        place["lines"] = [(f, n) for f, span in files for n in mutations(place["name"], f, span)][:3]
        out.append(place)
    return out


def _name(obj: Any, sites: Sites, ignore: set[int], depth: int = 0) -> tuple | None:
    """(holder, kind, name, files) for the place that keeps `obj`; `files`: `[(file, (first, last) or None)]`,
    where to look for the lines that add to it."""
    modules = {id(m.__dict__): m for m in list(sys.modules.values()) if getattr(m, "__dict__", None) is not None}
    for ref in gc.get_referrers(obj):
        if id(ref) in ignore or isinstance(ref, types.FrameType) and ref.f_code.co_filename == __file__:
            continue  # this module's own frames and lists
        if isinstance(ref, types.FrameType):
            for local, value in ref.f_locals.items():
                if value is obj and sites.is_users(ref.f_code.co_filename):
                    code = ref.f_code
                    span = (code.co_firstlineno, max((n for _, _, n in code.co_lines() if n), default=None))
                    return f"{code.co_name}.{local}", "local", local, [(code.co_filename, span)]
            continue
        if isinstance(ref, dict):
            found_key = next((k for k, v in ref.items() if v is obj), None)
            if not isinstance(found_key, str):
                continue
            key = found_key
            module = modules.get(id(ref))
            if module is not None:
                path = getattr(module, "__file__", None)
                if path and sites.is_users(path):
                    return f"{module.__name__}.{key}", "global", key, [(path, None)]
                continue
            owner = next((o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref), None)
            if owner is not None:
                return _attribute(owner, key, sites)
            if depth < MAX_DEPTH:  # a dict of lists: named by whoever keeps the dict
                named = _name(ref, sites, ignore, depth + 1)
                if named is not None:
                    return named
            continue
        if isinstance(ref, _HOLDS):
            if depth < MAX_DEPTH:
                named = _name(ref, sites, ignore, depth + 1)
                if named is not None:
                    return named
            continue
        attrs = getattr(ref, "__dict__", None)
        if isinstance(attrs, dict) and not isinstance(ref, (type, types.ModuleType)):
            attr = next((k for k, v in attrs.items() if v is obj), None)
            if isinstance(attr, str):
                return _attribute(ref, attr, sites)
    return _local(obj, sites)


def _local(obj: Any, sites: Sites) -> tuple | None:
    """A local variable of a running function of the user's that is bound to `obj` (a running function's frame
    is not among the collector's referrers)."""
    for top in sys._current_frames().values():
        frame: types.FrameType | None = top
        while frame is not None:
            code = frame.f_code
            if code.co_filename != __file__ and sites.is_users(code.co_filename):
                for key, value in frame.f_locals.items():
                    if value is obj:
                        span = (code.co_firstlineno, max((n for _, _, n in code.co_lines() if n), default=None))
                        return f"{code.co_name}.{key}", "local", key, [(code.co_filename, span)]
            frame = frame.f_back
    return None


def _attribute(owner: Any, key: str, sites: Sites) -> tuple:
    cls = type(owner)
    files: list[tuple[str, tuple[int, int] | None]] = []
    for klass in cls.__mro__:
        path = getattr(sys.modules.get(klass.__module__), "__file__", None)
        if path and sites.is_users(path):
            files.append((path, None))
    if not files:  # a library's class: look in every file of the user's
        files = [(p, None) for p in _user_files(sites)]
    return f"{cls.__name__}.{key}", "attribute", key, list(dict.fromkeys(files))


def _user_files(sites: Sites) -> list[str]:
    paths = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    return [p for p in paths if isinstance(p, str) and sites.is_users(p)]


def _refers_to(node: ast.AST, name: str) -> bool:
    """`name`, `x.name`, `name[...]` or `x.name[...][...]`."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Name) and node.id == name or isinstance(node, ast.Attribute) and node.attr == name


def mutations(name: str, path: str, span: tuple[int, int] | None = None) -> list[int]:
    """The lines of the file at `path` (within `span`, first to last line) that add to a container called
    `name`: `name.append(...)` and the other `MUTATORS`, `name[k] = ...`, `name += ...`, `name = name + ...`."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return []
    lines = set()
    for node in ast.walk(tree):
        hit = False
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            hit = node.func.attr in MUTATORS and _refers_to(node.func.value, name)
        elif isinstance(node, ast.AugAssign):
            hit = _refers_to(node.target, name)
        elif isinstance(node, ast.Assign):
            hit = any(isinstance(t, ast.Subscript) and _refers_to(t, name) for t in node.targets) or any(
                _refers_to(t, name) and isinstance(node.value, ast.BinOp) for t in node.targets
            )
        if hit and (span is None or span[0] <= line <= (span[1] or line)):
            lines.add(line)
    return sorted(lines)
