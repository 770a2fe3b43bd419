"""Who keeps the objects that grew: the named places that hold them (an attribute of an object, a module's
global, a function's local, reached through lists, tuples and dicts), and the lines of the user's code that add
to each.

    found = holders({"EagerTensor"}, Sites("train.py"))
    found[0]["holder"], found[0]["bytes"], found[0]["lines"]
    # 'KeepOutputs.outputs', 41943040, [("/home/me/train.py", 30)]

Lifetime, not bytes subtracted: the objects are those alive now, each counted once, at the place that keeps it.
With `watch` (the ids of arrays a call returned and that are still alive, `predict`'s), each holder also says how
many of its bytes are such arrays (`watched_bytes`): the script keeps what the call returned.
"""

from __future__ import annotations

import ast
import collections
import gc
import itertools
import sys
import types
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

from safetrain.diagnostics.measure import _TENSOR_TYPES, _array_bytes, _buffer_bytes, census_growth, live_buffers
from safetrain.diagnostics.rules import DATA_TYPES
from safetrain.diagnostics.sites import Sites

__all__ = ["holders", "holders_of_growth", "mutations", "arrays_in"]

#: who holds a data type is looked for when its bytes grew at least this much between two censuses
GROWTH_BYTES = 1 << 20

_HOLDS = (list, tuple, dict, set, frozenset, collections.deque)
#: methods that add to a container
MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft", "extendleft"})
#: how many containers up from the objects a holder's name is looked for
MAX_DEPTH = 4


def arrays_in(value: Any) -> list:
    """The NumPy arrays in `value` (nested lists, tuples and dicts)."""
    np = sys.modules.get("numpy")
    if np is None:
        return []
    out: list = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, np.ndarray):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def holders(
    type_names: Iterable[str],
    sites: Sites,
    watch: Set[int] = frozenset(),
    limit: int = 3,
    min_bytes: int = 1 << 20,
    min_objects: int = 0,
) -> list[dict]:
    """The places that hold the live objects of `type_names` (arrays, tensors, bytes), most bytes first: `[{holder,
    kind, name, bytes, objects, watched_bytes, lines}]` with `lines` the `(file, line)` of the user's code that
    add to it (`mutations`), for at most `limit` holders of at least `min_bytes` and `min_objects` objects (a
    holder of what grew holds many of the objects that grew, not two big arrays made once).

    `kind` is "attribute" (`holder` = "Class.name", an instance's or the class's), "global" ("module.name")
    or "local" ("function.name", Python 3.13 and later: before, reading a running frame's locals keeps them
    alive); a holder reached through a container in a container is named by the outermost ("history['loss']"
    counts as `history`). Each array is counted once, by the bytes of the array it is a view of, in the first
    container found holding it; `watch` holds the ids of arrays to count in `watched_bytes` (a view of one
    counts). Never raises: what it cannot read, it leaves out.
    """
    try:
        return _holders(set(type_names), sites, watch, limit, min_bytes, min_objects)
    except Exception:  # a diagnosis must never break the run it diagnoses
        return []


def holders_of_growth(
    first: Mapping[str, Sequence[int]], last: Mapping[str, Sequence[int]], sites: Sites, watch: Set[int] = frozenset()
) -> list[dict]:
    """`holders` of the data types (arrays, tensors, bytes) that grew by `GROWTH_BYTES` or more from census
    `first` to census `last`, each holder holding at least a quarter of the objects that grew; [] if none grew."""
    grew = census_growth(first, last)
    types = {name for size, _, name in grew if name in DATA_TYPES and size >= GROWTH_BYTES}
    if not types:
        return []
    grown = sum(count for _, count, name in grew if name in types)
    return holders(types, sites, watch=watch, min_objects=max(1, grown // 4))


def _holders(names: set[str], sites: Sites, watch: Set[int], limit: int, min_bytes: int, min_objects: int) -> list:
    gc.collect()
    objects = gc.get_objects()
    data: dict[int, tuple[int, int, bool]] = {}  # id -> (id of what is counted, its bytes, watched)
    for o in objects:
        if type(o).__name__ in names and type(o).__name__ in _TENSOR_TYPES:
            data[id(o)] = (id(o), _buffer_bytes(o), False)
    np = sys.modules.get("numpy")
    buffers: set[type] = {t for t in (bytes, bytearray) if t.__name__ in names}
    if np is not None and names & {"ndarray", "memmap"}:
        buffers |= {np.ndarray, np.memmap}
    untracked: dict[int, Any] = {}  # tuples and dicts of untracked things only: the collector does not list them
    found_buffers = live_buffers(objects, buffers, untracked) if buffers else {}
    for a in found_buffers.values():
        if np is not None and isinstance(a, np.ndarray):
            root = a
            while isinstance(root.base, np.ndarray):
                root = root.base
            if type(root).__name__ in names:
                data[id(a)] = (id(root), _array_bytes(root), id(root) in watch)
        elif type(a).__name__ in names:
            data[id(a)] = (id(a), sys.getsizeof(a), False)
    # The containers that hold them (those the collector lists, and the untracked tuples and dicts found
    # above), each array credited once: [container, bytes, objects, watched bytes] by id.
    kinds = {t for t in set(map(type, objects)) if issubclass(t, _HOLDS)} | {tuple, dict}
    direct: dict[int, list] = {}
    credited: set[int] = set()

    def credit(container, ref) -> None:
        item = data.get(id(ref))
        if item is None or item[0] in credited:
            return
        credited.add(item[0])
        row = direct.setdefault(id(container), [container, 0, 0, 0])
        row[1] += item[1]
        row[2] += 1
        row[3] += item[1] if item[2] else 0

    for c in itertools.chain(objects, untracked.values()):
        if type(c) not in kinds:
            continue
        for r in gc.get_referents(c):
            credit(c, r)
    # Many small containers in one list (a list of per-step lists): merged into that list, in one more pass.
    merged: dict[int, list] = {}
    placed: set[int] = set()
    for c in objects:
        if not isinstance(c, (list, collections.deque)):
            continue
        for r in gc.get_referents(c):
            child = direct.get(id(r))
            if child is not None and id(r) not in placed and r is not c:
                placed.add(id(r))
                row = merged.setdefault(id(c), [c, 0, 0, 0])
                for i in (1, 2, 3):
                    row[i] += child[i]
    del objects
    found_buffers.clear()
    untracked.clear()
    for key in placed:
        direct.pop(key, None)
    for key, row in merged.items():
        own = direct.setdefault(key, [row[0], 0, 0, 0])
        for i in (1, 2, 3):
            own[i] += row[i]
    merged.clear()
    rows = sorted(direct.values(), key=lambda e: -e[1])[:16]
    direct.clear()
    context = _Context(sites, {id(row) for row in rows})  # each row refers to its container: not a holder
    places: dict[tuple, dict] = {}
    for row in rows:
        if row[1] < min_bytes / 16:
            break
        named = _name(row[0], context)
        if named is None:
            continue
        holder, kind, name, files = named
        place = places.setdefault(
            (holder, kind, name),
            dict(holder=holder, kind=kind, name=name, bytes=0, objects=0, watched_bytes=0, files=files),
        )
        place["bytes"] += row[1]
        place["objects"] += row[2]
        place["watched_bytes"] += row[3]
    rows.clear()
    out = []
    for place in sorted(places.values(), key=lambda e: -e["bytes"]):
        if place["bytes"] < min_bytes or place["objects"] < min_objects:
            continue
        files = place.pop("files")
        place["lines"] = [(f, n) for f, span in files for n in mutations(place["name"], f, span)][:3]
        out.append(place)
    return out[:limit]


class _Context:
    """What naming needs: the user's files, the modules by their namespace, what to ignore among referrers."""

    def __init__(self, sites: Sites, ignore: set[int]) -> None:
        self.sites = sites
        self.ignore = ignore
        self.modules = {
            id(m.__dict__): m for m in list(sys.modules.values()) if isinstance(getattr(m, "__dict__", None), dict)
        }

    def referrers(self, obj: Any) -> list:
        refs = gc.get_referrers(obj)
        self.ignore.add(id(refs))  # the next level up must not take this list for a container of `obj`
        return [r for r in refs if id(r) not in self.ignore]

    def users(self, path: Any) -> bool:
        return isinstance(path, str) and self.sites.is_users(path)


def _namespace(obj: Any) -> dict | None:
    """An object's `__dict__`, or None (without one, or where reading it raises)."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return attrs if isinstance(attrs, dict) else None


def _key_of(mapping: dict, obj: Any) -> Any:
    """The key under which `mapping` holds `obj` (`_NONE` where it does not)."""
    try:
        items = list(dict.items(mapping))  # a snapshot: another thread may change the dict meanwhile
    except Exception:
        return _NONE
    return next((k for k, v in items if v is obj), _NONE)


_NONE = object()
_LOCALS = sys.version_info >= (3, 13)  # PEP 667: reading a running frame's locals no longer keeps a copy of them


def _name(obj: Any, ctx: _Context, depth: int = 0) -> tuple | None:
    """(holder, kind, name, files) for the place that keeps `obj`; `files`: `[(file, (first, last) or None)]`,
    where to look for the lines that add to it."""
    for ref in ctx.referrers(obj):
        if isinstance(ref, types.FrameType):
            continue  # a frame that made its locals a dict: `_local` reads running frames, where that is safe
        if isinstance(ref, dict):
            key = _key_of(ref, obj)
            if key is _NONE:
                continue
            module = ctx.modules.get(id(ref))
            if module is not None:
                path = getattr(module, "__file__", None)
                if isinstance(key, str) and ctx.users(path):
                    return f"{module.__name__}.{key}", "global", key, [(path, None)]
                continue
            for owner in ctx.referrers(ref):
                if isinstance(owner, type) and isinstance(key, str) and _class_holds(owner, key, obj):
                    return _attribute(owner, key, ctx)
                if _namespace(owner) is ref and isinstance(key, str):
                    return _attribute(type(owner), key, ctx)
            if depth < MAX_DEPTH:  # a dict of lists (any keys): named by whoever keeps the dict
                named = _name(ref, ctx, depth + 1)
                if named is not None:
                    return named
            continue
        if isinstance(ref, _HOLDS):
            if depth < MAX_DEPTH:
                named = _name(ref, ctx, depth + 1)
                if named is not None:
                    return named
            continue
        if isinstance(ref, (type, types.ModuleType)):
            continue
        attrs = _namespace(ref)  # an instance whose attributes live in the object (no dict made yet)
        if attrs is not None:
            attr = _key_of(attrs, obj)
            if isinstance(attr, str):
                return _attribute(type(ref), attr, ctx)
    return _local(obj, ctx) if _LOCALS else None


def _class_holds(cls: type, key: str, obj: Any) -> bool:
    try:
        return cls.__dict__.get(key) is obj
    except Exception:
        return False


def _local(obj: Any, ctx: _Context) -> tuple | None:
    """A local variable of a running function of the user's that is bound to `obj` (a running function's frame
    is not among the collector's referrers)."""
    for top in sys._current_frames().values():
        frame: types.FrameType | None = top
        while frame is not None:
            code = frame.f_code
            if code.co_filename != __file__ and ctx.users(code.co_filename):
                local = _key_of(dict(frame.f_locals), obj)
                if isinstance(local, str):
                    span = (code.co_firstlineno, max((n for _, _, n in code.co_lines() if n), default=None))
                    return f"{code.co_name}.{local}", "local", local, [(code.co_filename, span)]
            frame = frame.f_back
    return None


def _attribute(cls: type, key: str, ctx: _Context) -> tuple:
    """An attribute `key` of `cls` or its instances; the files to search are those of the user's classes in its
    MRO (none for a library's class: its attribute is filled by the library, or by lines no name leads to)."""
    files: list[tuple[str, tuple[int, int] | None]] = []
    for klass in cls.__mro__:
        path = getattr(sys.modules.get(klass.__module__), "__file__", None)
        if isinstance(path, str) and ctx.users(path):
            files.append((path, None))
    return f"{cls.__name__}.{key}", "attribute", key, list(dict.fromkeys(files))


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
    except Exception:  # unreadable, not Python, or too deeply nested to parse: no lines
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
