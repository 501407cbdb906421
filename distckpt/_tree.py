"""Pytrees <-> flat lists of (key path, leaf), and the kinds of leaves we store.

A key path is a tuple of ``(kind, key)`` parts, stable across processes and
runs: ``("key", "params")`` for a string dict key, ``("int", 3)`` for an
integer dict key, ``("idx", 0)`` for a list/tuple position, ``("attr", "mu")``
for a named field (namedtuple, dataclass), ``("flat", 2)`` for a custom node
that exposes no keys. Matching between a checkpoint and a restore target
uses the *names* only (``str(key)``), so a dict saved with key ``"mu"``
restores into a namedtuple field ``mu``.
"""

from __future__ import annotations

from collections.abc import Callable
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
    returns ([(path, leaf)], treedef)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
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


def unflatten_plain(items: list[tuple[Path, Any]]) -> Any:
    """Rebuilds plain containers: dicts for keys and fields, lists for positions."""
    if not items:
        return {}
    if items[0][0] == ():
        return items[0][1]
    groups: dict[Any, list[tuple[Path, Any]]] = {}
    for path, value in items:
        groups.setdefault(path[0][1], []).append((path[1:], value))
    if items[0][0][0][0] in ("idx", "flat"):
        return [unflatten_plain(groups[i]) for i in sorted(groups)]
    return {key: unflatten_plain(group) for key, group in groups.items()}
