"""Differences between two checkpoints, or a checkpoint and a restore target.

Structure (leaves on one side only, kind, shape, dtype, PRNG implementation)
comes from the metadata alone. Values are compared slab by slab (rows of
the first dimension), so memory stays near the slab budget whatever the
size of a leaf. Leaves are matched by key path as strings, as ``restore``
matches them.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from distckpt import _tree
from distckpt._sources import Source

DEFAULT_SLAB_BYTES = 16 << 20  # also the default of `distckpt diff --slab-mb`

_CATEGORY = {
    _tree.ARRAY: "array",
    _tree.NUMPY: "array",  # a numpy leaf and a jax.Array leaf hold comparable values
    _tree.PRNG_KEY: "PRNG key",
    _tree.PYTHON: "Python value",
    _tree.NONE: "None",
}


def pairs(
    a: Source, b: Source, migration: Any = None
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(leaves in both, as index pairs), (only in a), (only in b); in a's then b's order.

    ``migration`` (a ``_migrate.Migration``) renames A's paths first."""
    b_by_key = {_tree.match_key(s.path): i for i, s in enumerate(b.leaves)}
    both, only_a, seen = [], [], set()
    for i, s in enumerate(a.leaves):
        key = _tree.match_key(s.path)
        j = b_by_key.get(migration.renamed(key) if migration else key)
        if j is None:
            only_a.append(i)
        else:
            both.append((i, j))
            seen.add(j)
    only_b = [j for j in range(len(b.leaves)) if j not in seen]
    return both, only_a, only_b


def structure(a: Source, b: Source, migration: Any = None) -> list[str]:
    """Every structural difference, one line each (empty: same structure)."""
    both, only_a, only_b = pairs(a, b, migration)
    if migration is not None:
        only_a = [i for i in only_a if not migration.dropped(_tree.match_key(a.leaves[i].path))]
    lines = [f"{a.leaves[i].display}: only in A ({a.leaves[i].describe()})" for i in only_a]
    lines += [f"{b.leaves[j].display}: only in B ({b.leaves[j].describe()})" for j in only_b]
    for i, j in both:
        sa, sb = a.leaves[i], b.leaves[j]
        ca, cb = _CATEGORY[sa.kind], _CATEGORY[sb.kind]
        if ca != cb:
            lines.append(f"{sa.display}: {ca} in A ({sa.describe()}), {cb} in B ({sb.describe()})")
            continue
        if sa.kind == _tree.PRNG_KEY and sa.impl != sb.impl:
            lines.append(f"{sa.display}: PRNG implementation {sa.impl} in A, {sb.impl} in B")
        if sa.stored and sa.array_shape != sb.array_shape:
            lines.append(f"{sa.display}: shape {sa.array_shape} in A, {sb.array_shape} in B")
        if sa.stored and sa.dtype != sb.dtype:
            lines.append(f"{sa.display}: dtype {sa.dtype} in A, {sb.dtype} in B")
    return lines


@dataclass(frozen=True)
class ValueDiff:
    """How one leaf's values differ; ``status`` is "equal", "close" or "different"."""

    path: str
    status: str
    elements: int
    mismatched: int  # elements outside atol + rtol * |b|
    max_abs: float
    max_rel: float
    detail: str = ""  # for Python values: both values

    def to_json(self) -> dict:
        return asdict(self)


def _as_float(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "c":
        return x.astype(np.complex128)
    return x.astype(np.float64)


def same_python_value(a: Any, b: Any) -> bool:
    """Python leaves are equal when of one type and ``==``; a NaN float equals a NaN."""
    if type(a) is not type(b):
        return False
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def values(
    a: Source,
    b: Source,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
    migration: Any = None,
) -> Iterator[ValueDiff]:
    """Compares every leaf present in both with the same shape, one slab at a time.

    ``max_rel`` is ``max |a - b| / |b|`` (``inf`` where ``b`` is 0 and ``a`` is
    not); an element is mismatched when ``|a - b| > atol + rtol * |b|``, as in
    ``numpy.isclose`` with B as the reference. NaN equals NaN at the same
    position (in Python values too), an infinity equals only the same
    infinity; NaN against a number, finite against infinite and +inf against
    -inf are always mismatched, whatever the tolerances (max abs and max rel
    ``inf``).
    """
    both, _, _ = pairs(a, b, migration)
    for i, j in both:
        sa, sb = a.leaves[i], b.leaves[j]
        if _CATEGORY[sa.kind] != _CATEGORY[sb.kind]:
            continue
        if sa.kind == _tree.NONE:
            continue
        if sa.kind == _tree.PYTHON:
            same = same_python_value(sa.value, sb.value)
            yield ValueDiff(
                sa.display,
                "equal" if same else "different",
                1,
                0 if same else 1,
                0.0,
                0.0,
                "" if same else f"{sa.value!r} in A, {sb.value!r} in B",
            )
            continue
        if sa.array_shape != sb.array_shape or (sa.kind == _tree.PRNG_KEY and sa.impl != sb.impl):
            continue  # reported by structure()
        yield _compare_leaf(a, b, i, j, atol, rtol, slab_bytes)


def _compare_leaf(
    a: Source, b: Source, i: int, j: int, atol: float, rtol: float, slab_bytes: int
) -> ValueDiff:
    spec = a.leaves[i]
    mismatched, max_abs, max_rel, exact = 0, 0.0, 0.0, True
    for rows in a.slabs(i, slab_bytes):
        xa, xb = a.read(i, rows), b.read(j, rows)
        if xa.size == 0:
            continue
        if xa.dtype.kind in "biu" and xb.dtype.kind in "biu":
            exact = exact and bool(np.array_equal(xa, xb))
        fa, fb = _as_float(xa), _as_float(xb)
        same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))  # an infinity equals only itself
        finite = np.isfinite(fa) & np.isfinite(fb)
        ref = np.abs(fb)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # NaN on one side, finite against infinite, +inf against -inf: always
            # different, whatever the tolerances (rtol * inf would call them close).
            diff = np.where(same, 0.0, np.where(finite, np.abs(fa - fb), np.inf))
            rel = np.where(same, 0.0, np.where(finite, diff / ref, np.inf))
            bad = ~same & (~finite | (diff > atol + rtol * np.where(finite, ref, 0.0)))
        mismatched += int(np.count_nonzero(bad))
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(rel.max()))
        if xa.dtype.kind not in "biu" or xb.dtype.kind not in "biu":
            exact = exact and bool(same.all())
    if exact and not mismatched:
        status = "equal"
    elif not mismatched:
        status = "close"
    else:
        status = "different"
    elements = int(np.prod(spec.array_shape, dtype=np.int64))
    return ValueDiff(spec.display, status, elements, mismatched, max_abs, max_rel)


# --------------------------------------------------------------------------- targets


_SPEC = re.compile(r"^(?P<where>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")


def is_target_spec(arg: str) -> bool:
    """``module:attr`` or ``file.py:attr`` (and not an existing path)."""
    return not os.path.exists(arg) and _SPEC.match(arg) is not None


def load_target(arg: str) -> Any:
    """The pytree a target spec names; a callable is called with no arguments.

    Raises:
      ValueError: the module, file or attribute cannot be found (says which).
    """
    m = _SPEC.match(arg)
    if m is None:
        raise ValueError(f"{arg!r} is not a target spec; expected module:attr or file.py:attr")
    where, attr = m["where"], m["attr"]
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"target spec {arg!r}: file {where} does not exist")
        name = f"_distckpt_target_{abs(hash(os.path.abspath(where)))}"
        spec = importlib.util.spec_from_file_location(name, where)
        assert spec is not None and spec.loader is not None  # a .py file gets a source loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"target spec {arg!r}: cannot import module {where!r} ({e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"target spec {arg!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj() if callable(obj) and not isinstance(obj, jax.ShapeDtypeStruct) else obj


def renames(a: Source, migration: Any) -> list[str]:
    """What ``migration`` does to A's paths: one line per renamed or dropped leaf."""
    from distckpt._migrate import slash

    lines = []
    for s in a.leaves:
        key = _tree.match_key(s.path)
        if migration.dropped(key):
            lines.append(f"{slash(key)}: dropped")
        elif migration.renamed(key) != key:
            lines.append(f"{slash(key)} -> {slash(migration.renamed(key))}")
    return lines


def target_problems(
    source: Source, target: Any, *, partial: bool = False, migration: Any = None
) -> list[str]:
    """What ``restore(source, target)`` would refuse, every problem at once (no data read)."""
    from distckpt import _match

    items, _ = _tree.flatten(target)
    hints: list[str] = []
    _, problems = _match.match(
        source.leaves, items, partial=partial, cast=False, migration=migration, hints=hints
    )
    return problems + hints
