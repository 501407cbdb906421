"""Pytrees <-> flat lists of (key path, leaf), and the kinds of leaves we store.

A key path is a tuple of ``(kind, key)`` parts, stable across processes and
runs: ``("key", "params")`` for a string dict key, ``("int", 3)`` for an
integer dict key, ``("idx", 0)`` for a list/tuple position, ``("attr", "mu")``
for a named field (namedtuple, dataclass), ``("flat", 2)`` for a custom node
that exposes no keys. Matching between a checkpoint and a restore target
uses the *names* only (``str(key)``), so a dict saved with key ``"mu"``
restores into a namedtuple field ``mu``.

``walk`` flattens a tree being saved and also describes its containers (the
manifest's ``structure`` record, docs/format.md), so that ``rebuild`` can
give a target-less restore the saved structure back: empty containers,
list vs tuple, dict key order and kinds, namedtuples. Both are iterative:
neither is bounded by Python's recursion limit.
"""

from __future__ import annotations

import collections
import functools
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Path = tuple[tuple[str, Any], ...]

# Leaf kinds as recorded in the manifest.
ARRAY = "array"  # jax.Array (any sharding)
PRNG_KEY = "prng_key"  # typed PRNG key array; stored as its key data
NUMPY = "numpy"  # host array; the primary's value is stored
PYTHON = "python"  # int / float / bool / str, stored in the manifest
NONE = "none"  # a None leaf

PYTHON_TYPES = (bool, int, float, str)


def part(entry: Any) -> tuple[str, Any]:
    tu = jax.tree_util
    if isinstance(entry, tu.DictKey):
        key = entry.key
        if isinstance(key, str):
            return ("key", key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return ("int", int(key))
        return ("key", str(key))
    if isinstance(entry, tu.SequenceKey):
        return ("idx", entry.idx)
    if isinstance(entry, tu.GetAttrKey):
        return ("attr", entry.name)
    if isinstance(entry, tu.FlattenedIndexKey):
        return ("flat", entry.key)
    return ("key", str(entry))


def is_none(x: Any) -> bool:
    return x is None


def flatten(
    tree: Any, is_leaf: Callable[[Any], bool] = is_none
) -> tuple[list[tuple[Path, Any]], Any]:
    """Flattens ``tree`` keeping ``None`` (or what ``is_leaf`` says) as a leaf;
    returns ([(path, leaf)], treedef).

    This is ``jax.tree_util``'s flattening, which recurses: a tree nested
    deeper than about ``sys.getrecursionlimit()`` levels fails (``walk``,
    which saves use, has no such limit).
    """
    try:
        with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    except (RecursionError, SystemError) as e:
        if not isinstance(e, RecursionError) and not isinstance(e.__cause__, RecursionError):
            raise
        raise TypeError(
            "the tree is nested too deeply for jax.tree_util, which flattens it recursively "
            f"(Python's recursion limit is {sys.getrecursionlimit()}, about as many levels). "
            "restore(directory) without a target rebuilds any depth; to restore into a "
            "target this deep, raise the limit with sys.setrecursionlimit() first."
        ) from None
    return [(tuple(part(e) for e in path), leaf) for path, leaf in with_path], treedef


def display(path: Path) -> str:
    """A path as people read it: ``['params']['w']``, ``[0].mu``, ``<root>``."""
    out = []
    for kind, key in path:
        if kind == "key":
            out.append(f"[{key!r}]")
        elif kind in ("int", "idx", "flat"):
            out.append(f"[{key}]")
        else:
            out.append(f".{key}")
    return "".join(out) or "<root>"


def match_key(path: Path) -> tuple[str, ...]:
    """What two paths must share to be the same leaf."""
    return tuple(str(key) for _, key in path)


def kind_of(leaf: Any) -> str | None:
    """The storage kind of a leaf in a tree being saved, or None if unsupported."""
    if leaf is None:
        return NONE
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return PRNG_KEY
        return ARRAY
    if isinstance(leaf, (np.ndarray, np.generic)):
        return NUMPY
    if isinstance(leaf, PYTHON_TYPES):
        return PYTHON
    return None


# Container kinds in the manifest's "structure" record (docs/format.md).
DICT = "dict"  # [parent, slot, "dict", [part, ...]]: a dict, keys in its own order
LIST = "list"  # [parent, slot, "list", n]
TUPLE = "tuple"  # [parent, slot, "tuple", n]
NAMEDTUPLE = "namedtuple"  # [parent, slot, "namedtuple", [field, ...], "module:QualName"]
NODE = "node"  # [parent, slot, "node", [part, ...], "module:QualName"]: any other pytree node

# Exact types that are always leaves: no registry look-up for them.
_LEAF_TYPES = frozenset({bool, int, float, str, np.ndarray})


def _materialise(link: Any) -> Path:
    """A path from its linked form ``(parent_link, part)``; ``None`` is the root."""
    parts = []
    while link is not None:
        link, p = link
        parts.append(p)
    parts.reverse()
    return tuple(parts)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def walk(tree: Any) -> tuple[list[tuple[Path, Any]], list[list]]:
    """Flattens a tree to save: ``(items, structure)``.

    ``items`` is what ``flatten(tree)`` gives (same leaves, paths and order:
    ``jax.tree_util`` order, ``None`` kept as a leaf) but found without
    recursion, so any depth works. ``structure`` lists the containers in
    pre-order, each as ``[parent, slot, kind, children(, type name)]`` (see
    docs/format.md); it is JSON-ready and ``[]`` when the tree is one leaf.
    """
    registry = jax.tree_util.default_registry
    items: list[tuple[Path, Any]] = []
    nodes: list[list] = []
    # (object, parent node, slot in the parent, path as a linked list)
    stack: list[tuple[Any, int, int, Any]] = [(tree, -1, 0, None)]
    leaf_types = set(_LEAF_TYPES)  # grows with the types the registry calls leaves
    while stack:
        obj, parent, slot, link = stack.pop()
        cls = type(obj)
        if obj is None or cls in leaf_types:
            items.append((_materialise(link), obj))
            continue
        try:
            flat = registry.flatten_one_level_with_keys(obj)
        except ValueError as e:  # a dict whose keys do not sort (jax sorts them)
            raise TypeError(f"cannot flatten {display(_materialise(link))}: {e}") from None
        if flat is None:
            leaf_types.add(cls)
            items.append((_materialise(link), obj))
            continue
        pairs, aux = flat
        me = len(nodes)
        if cls is dict:
            # jax visits the keys sorted; the record keeps the dict's own order.
            slots = {key: i for i, key in enumerate(obj)}
            parts = [part(k) for k, _ in pairs]
            order: list[tuple[str, Any] | None] = [None] * len(parts)  # every slot is set
            for (k, _), p in zip(pairs, parts, strict=True):
                order[slots[k.key]] = p
            nodes.append([parent, slot, DICT, order])
            children = [(c, slots[k.key], p) for (k, c), p in zip(pairs, parts, strict=True)]
        elif cls is list or cls is tuple:
            nodes.append([parent, slot, LIST if cls is list else TUPLE, len(pairs)])
            children = [(c, i, ("idx", i)) for i, (_, c) in enumerate(pairs)]
        elif isinstance(obj, tuple) and aux is cls and hasattr(cls, "_fields"):
            fields = list(cls._fields)  # a namedtuple: its fields are its keys
            nodes.append([parent, slot, NAMEDTUPLE, fields, _type_name(cls)])
            children = [
                (c, i, ("attr", f)) for i, ((_, c), f) in enumerate(zip(pairs, fields, strict=True))
            ]
        else:
            parts = [part(k) for k, _ in pairs]
            nodes.append([parent, slot, NODE, parts, _type_name(cls)])
            children = [(c, i, p) for i, ((_, c), p) in enumerate(zip(pairs, parts, strict=True))]
        for child, i, p in reversed(children):
            stack.append((child, me, i, (link, p)))
    return items, nodes


def unflatten_plain(items: list[tuple[Path, Any]]) -> Any:
    """Rebuilds plain containers: dicts for keys and fields, lists for positions.

    What a target-less restore gives when the checkpoint has no ``structure``
    record (written before it existed): list positions are renumbered in
    order and empty containers are not there. Iterative: any depth works.
    """
    if not items:
        return {}
    if items[0][0] == ():
        return items[0][1]
    root = _Trie()
    order = [root]
    for path, value in items:
        node = root
        for depth, (kind, key) in enumerate(path):
            if node.seq is None:
                node.seq = kind in ("idx", "flat")
            if depth == len(path) - 1:
                node.children.setdefault(key, _Value(value))
                break
            child = node.children.get(key)
            if not isinstance(child, _Trie):
                if child is not None:
                    break  # a leaf where a container was expected: keep the leaf
                child = node.children[key] = _Trie()
                order.append(child)
            node = child
    for node in reversed(order):  # children before their parents
        kids = node.children
        if node.seq:
            node.built = [_built(kids[k]) for k in sorted(kids)]
        else:
            node.built = {k: _built(v) for k, v in kids.items()}
    return root.built


class _Trie:
    __slots__ = ("built", "children", "seq")

    def __init__(self) -> None:
        self.seq: bool | None = None
        self.children: dict[Any, Any] = {}
        self.built: Any = None


class _Value:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _built(x: Any) -> Any:
    return x.value if isinstance(x, _Value) else x.built


_UNSET = object()


class StructureError(ValueError):
    """A manifest's ``structure`` record does not fit its leaves."""


def rebuild(structure: Sequence[Any], items: Sequence[tuple[Path, Any]]) -> Any:
    """The saved tree from its ``structure`` record and its leaves ``(path, value)``.

    Containers come back as saved: dicts (in their order, str or int keys),
    lists, tuples and empty ones. A namedtuple comes back as its class if
    that class is already imported and is a namedtuple with the same fields
    (``_namedtuple_class``), else as a ``collections.namedtuple`` of the
    same name and fields; any other node type comes back as a dict of its
    fields (a list if its children have no names). Nothing named in the
    record is imported or called.

    Raises:
      StructureError: the record is malformed or does not fit the leaves.
    """
    if not structure:
        if len(items) == 1 and items[0][0] == ():
            return items[0][1]
        raise StructureError(f"the record has no containers but there are {len(items)} leaves")
    nodes = [_parse_node(j, raw, structure) for j, raw in enumerate(structure)]
    values = [[_UNSET] * n.size for n in nodes]
    child_of: dict[tuple[int, int], int] = {}
    for j, n in enumerate(nodes[1:], 1):
        if (n.parent, n.slot) in child_of:
            raise StructureError(f"containers {child_of[n.parent, n.slot]} and {j} share a slot")
        child_of[(n.parent, n.slot)] = j
    for path, value in items:
        node = 0
        if not path:
            raise StructureError("a leaf is the root, but the record has containers")
        for depth, p in enumerate(path):
            slot = nodes[node].slot_of(p)
            if slot is None:
                raise StructureError(
                    f"leaf {display(path)}: {display(path[: depth + 1])} is not in container "
                    f"{display(path[:depth])}"
                )
            if depth == len(path) - 1:
                if (node, slot) in child_of or values[node][slot] is not _UNSET:
                    raise StructureError(f"leaf {display(path)}: its place is already taken")
                values[node][slot] = value
                break
            inner = child_of.get((node, slot))
            if inner is None:
                raise StructureError(
                    f"leaf {display(path)}: {display(path[: depth + 1])} is not a container"
                )
            node = inner
    for j in range(len(nodes) - 1, -1, -1):  # children come after their parents
        n = nodes[j]
        empty = [i for i, v in enumerate(values[j]) if v is _UNSET]
        if empty:  # its containers are built by now (they come later): a leaf is missing
            raise StructureError(f"container {j} ({n.kind}) has no value at slot(s) {empty[:10]}")
        built = n.build(values[j])
        if j:
            values[n.parent][n.slot] = built
        else:
            return built
    raise AssertionError("unreachable")


class _Node:
    """One parsed container of a structure record."""

    __slots__ = ("keys", "kind", "name", "parent", "size", "slot", "slots")

    def __init__(self, parent: int, slot: int, kind: str, keys: Any, name: str | None):
        self.parent, self.slot, self.kind, self.keys, self.name = parent, slot, kind, keys, name
        self.size = keys if isinstance(keys, int) else len(keys)
        self.slots: dict | None = None

    def slot_of(self, p: tuple[str, Any]) -> int | None:
        if self.kind in (LIST, TUPLE):
            kind, i = p
            ok = kind == "idx" and type(i) is int and 0 <= i < self.size
            return i if ok else None
        if self.slots is None:
            if self.kind == NAMEDTUPLE:
                self.slots = {("attr", f): i for i, f in enumerate(self.keys)}
            else:
                self.slots = {k: i for i, k in enumerate(self.keys)}
        return self.slots.get(tuple(p))

    def build(self, values: list) -> Any:
        if self.kind == DICT:
            return {key: v for (_, key), v in zip(self.keys, values, strict=True)}
        if self.kind == LIST:
            return values
        if self.kind == TUPLE:
            return tuple(values)
        if self.kind == NAMEDTUPLE:
            cls = _namedtuple_class(self.name, tuple(self.keys))
            return tuple.__new__(cls, values)  # runs no code of the class
        if self.keys and all(kind in ("idx", "flat") for kind, _ in self.keys):
            return values
        return {key: v for (_, key), v in zip(self.keys, values, strict=True)}


def _parse_node(j: int, raw: Any, structure: Sequence[Any]) -> _Node:
    """One container of a record, checked: a damaged record is an error, not a wrong tree."""
    try:
        parent, slot, kind, keys, *rest = raw
        name = rest[0] if rest else None
        if kind in (LIST, TUPLE):
            if type(keys) is not int or keys < 0 or rest:
                raise ValueError(f"a {kind} needs a length")
        elif kind == NAMEDTUPLE:
            if not all(type(f) is str for f in keys) or type(name) is not str:
                raise ValueError("a namedtuple needs field names and a type name")
            keys = list(keys)
        elif kind in (DICT, NODE):
            keys = [_record_part(p) for p in keys]
            if (kind == NODE) != (type(name) is str) or len(rest) > 1:
                raise ValueError(f"a {kind} {'needs' if kind == NODE else 'has no'} type name")
        else:
            raise ValueError(f"unknown container kind {kind!r}")
        if j == 0:
            if (parent, slot) != (-1, 0):
                raise ValueError("the first container must be the root, [-1, 0, ...]")
        elif type(parent) is not int or not 0 <= parent < j:
            raise ValueError(f"parent {parent!r} is not an earlier container")
        node = _Node(parent, slot, kind, keys, name)
        if j and (type(slot) is not int or not 0 <= slot < _size(structure[parent])):
            raise ValueError(f"slot {slot!r} is not a position of container {parent}")
        return node
    except (TypeError, ValueError) as e:
        raise StructureError(f"container {j} ({str(raw)[:80]}): {e}") from None


def _size(raw: Any) -> int:
    keys = raw[3]
    return keys if isinstance(keys, int) else len(keys)


def _record_part(p: Any) -> tuple[str, Any]:
    kind, key = p
    if kind in ("key", "attr") and type(key) is str:
        return (kind, key)
    if kind in ("int", "idx", "flat") and type(key) is int:
        return (kind, key)
    raise ValueError(f"bad key {p!r}")


@functools.lru_cache(maxsize=512)
def _namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    """The class a saved namedtuple comes back as.

    ``name`` is ``module:QualName``. The saved class itself if its module is
    already imported (never imported here) and the class found there is a
    plain namedtuple with the same fields; else a ``collections.namedtuple``
    of that name and fields (one per name and fields, so that equal records
    give equal tree structures). Only dictionaries are read to find the
    class: no attribute hook of the module or class runs.
    """
    module, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module)
    if type(found) is types.ModuleType:
        for attr in qualname.split("."):
            holder = found.__dict__ if type(found) in (types.ModuleType, type) else {}
            found = holder.get(attr)
        if type(found) is type and issubclass(found, tuple):
            saved = next((vars(k)["_fields"] for k in found.__mro__ if "_fields" in vars(k)), None)
            if saved == fields:
                return found
    short = qualname.rpartition(".")[2]
    try:
        return collections.namedtuple(short, fields, rename=True)
    except ValueError:  # a name no class statement could have written
        return collections.namedtuple("SavedNamedTuple", fields, rename=True)
