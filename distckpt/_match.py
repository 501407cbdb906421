"""Matching: the restore target against the saved leaves, and placing what was read.

``match`` pairs each target leaf with a saved one and says, per leaf, what
to produce (a host array, a ``jax.Array`` on the target sharding, a PRNG key
array, or a value without I/O) and which boxes to read; it collects every
mismatch at once. ``place`` turns the blocks read for those boxes into the
values (casts checked, keys wrapped, device arrays built through ``_put``).
Pure apart from building arrays: no storage, no collectives.
"""

from __future__ import annotations

import enum
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from distckpt import _migrate, _plan, _put, _reshard, _target, _tree
from distckpt._plan import LeafSpec
from distckpt._reshard import Box
from distckpt._storage import aligned_empty
from distckpt.errors import TreeMismatchError

_X64_OFF = "jax_enable_x64 is off"
_X64_ON = 'jax.config.update("jax_enable_x64", True)'


class Mode(enum.Enum):
    """What to produce for one target leaf."""

    HOST = "host"  # a numpy array with the whole value
    ARRAY = "array"  # a jax.Array on the target sharding
    KEY = "key"  # a typed PRNG key array (from its key data)
    VALUE = "value"  # a value known without I/O (Python leaf, None, init=)


@dataclass
class Want:
    """One target leaf to produce."""

    index: int  # position in the flattened target
    leaf: int  # index of the saved leaf
    mode: Mode
    dtype: np.dtype | None = None  # dtype to return (after an allowed cast)
    sharding: Any = None  # of the (key data) array, for ARRAY / KEY
    device_boxes: Sequence[tuple[Any, Box]] = ()  # (addressable device, the box it holds)
    boxes: Sequence[Box] = ()  # the distinct boxes to read, for every mode but VALUE
    value: Any = None  # for VALUE


def mismatch(
    where: str, problems: list[str], hints: Sequence[str] = (), what: str = "checkpoint"
) -> TreeMismatchError:
    """The one error for a target that does not match a checkpoint: every difference."""
    return TreeMismatchError(
        f"the restore target does not match the {what} at {where} "
        f"({len(problems)} difference(s)):\n  " + "\n  ".join([*problems, *hints]),
        problems,
    )


def want_host(index: int, leaf: int, spec: LeafSpec, dtype: np.dtype | None = None) -> Want:
    if spec.kind == _tree.PYTHON:
        return Want(index, leaf, Mode.VALUE, value=spec.value)
    if spec.kind == _tree.NONE:
        return Want(index, leaf, Mode.VALUE, value=None)
    mode = Mode.KEY if spec.kind == _tree.PRNG_KEY else Mode.HOST
    return Want(
        index,
        leaf,
        mode,
        dtype=dtype or _plan.np_dtype(spec.dtype),
        boxes=(_reshard.full_box(spec.array_shape),),
    )


def _key_impl_name(dtype: Any) -> str | None:
    # Key dtypes carry their implementation; jax has no public accessor for a
    # dtype (jax.random.key_impl wants an array), so read its name.
    impl = getattr(dtype, "_impl", None)
    return getattr(impl, "name", None)


def _key_data_sharding(sharding: Any, ndim: int, extra: int) -> Any:
    """The sharding of a key array's data: the key's sharding, trailing dims unsplit."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec, *([None] * extra)))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise TypeError(
        f"restoring typed PRNG keys onto a {type(sharding).__name__} is not supported; "
        "use a NamedSharding or a single device"
    )


def match(
    leaves: Sequence[LeafSpec],
    items: Sequence[tuple[_tree.Path, Any]],
    *,
    partial: bool,
    cast: bool,
    migration: _migrate.Migration | None = None,
    hints: list[str] | None = None,
) -> tuple[list[Want], list[str]]:
    """Pairs target leaves with the saved ``leaves``; returns (wants, every problem found).

    ``hints``, if given, receives a suggested ``rename`` for the problems.
    """
    saved: dict[tuple[str, ...], int] = {}  # match key (renamed) -> saved leaf
    problems: list[str] = []
    for i, s in enumerate(leaves):
        key = _tree.match_key(s.path)
        new = migration.renamed(key) if migration else key
        if new in saved:
            other = leaves[saved[new]].display
            problems.append(f"rename maps both {other} and {s.display} to {_migrate.slash(new)}")
        saved[new] = i
    wants, used, skipped, missing = [], set(), [], {}
    matched: dict[tuple, Want] = {}
    for index, (path, t) in enumerate(items):
        key = _tree.match_key(path)
        if t is None:
            skipped.append(key)
            continue
        leaf = saved.get(key)
        if leaf is None:
            has, value = migration.initial(key) if migration else (False, None)
            if has:
                wants.append(Want(index, -1, Mode.VALUE, value=value))
                continue
            problems.append(f"{_tree.display(path)}: in the target but not in the checkpoint")
            missing[_migrate.slash(key)] = _shape_dtype(t)
            continue
        used.add(key)
        spec = leaves[leaf]
        # Leaves alike (same target type, shape, dtype and sharding; same saved
        # description) match alike: one full check for each kind, then a copy.
        alike = None
        if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(t, "sharding", None)
            alike = (
                type(t),
                t.shape,
                t.dtype,
                sharding,
                spec.kind,
                spec.shape,
                spec.dtype,
                spec.impl,
            )
            template = matched.get(alike)
            if template is not None:
                wants.append(
                    Want(
                        index,
                        leaf,
                        template.mode,
                        template.dtype,
                        template.sharding,
                        template.device_boxes,
                        template.boxes,
                    )
                )
                continue
        want, problem = _match_leaf(index, leaf, spec, t, _tree.display(path), cast)
        if problem:
            problems.append(problem)
        else:
            assert want is not None  # _match_leaf gives a want or a problem
            wants.append(want)
            if alike is not None and want.mode in (Mode.ARRAY, Mode.KEY):
                matched[alike] = want
    unused = {}
    for key, leaf in saved.items():
        if key in used or any(key[: len(p)] == p for p in skipped):
            continue
        spec = leaves[leaf]
        unused[_migrate.slash(_tree.match_key(spec.path))] = (
            tuple(spec.shape) if spec.shape is not None else None,
            spec.dtype,
        )
        if partial or (migration and migration.dropped(_tree.match_key(spec.path))):
            continue
        problems.append(
            f"{spec.display}: in the checkpoint ({spec.describe()}) but not in the target "
            "(pass partial=True to leave it out, or drop= to leave out just these)"
        )
    pairs = _migrate.suggestions(missing, unused)
    if pairs and hints is not None:
        hints.append(
            "if these are renames, restore(..., rename={" + ", ".join(pairs) + "}) "
            "maps them; new leaves can come from init=, removed ones go with drop="
        )
    return wants, problems


def _shape_dtype(t: Any) -> tuple:
    shape = getattr(t, "shape", None)
    dtype = getattr(t, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return (None, None)  # key data shapes differ from key shapes: no suggestion
    return (
        tuple(shape) if shape is not None else None,
        str(np.dtype(dtype)) if dtype is not None else None,
    )


def _match_leaf(
    index: int, leaf: int, spec: LeafSpec, t: Any, disp: str, cast: bool
) -> tuple[Want | None, str | None]:
    def found() -> str:  # only on the error path: describing costs per leaf
        return f"checkpoint has {spec.describe()}"

    if isinstance(t, _tree.PYTHON_TYPES):
        if spec.kind != _tree.PYTHON:
            return None, f"{disp}: target is a Python {type(t).__name__}, {found()}"
        value = spec.value
        if type(value) is not type(t):
            numbers = (int, float)
            if cast and isinstance(value, numbers) and type(t) in numbers:
                value = type(t)(value)
            else:
                hint = " (pass cast=True to convert)" if isinstance(value, (int, float)) else ""
                return None, f"{disp}: target is a Python {type(t).__name__}, {found()}{hint}"
        return Want(index, leaf, Mode.VALUE, value=value), None

    if isinstance(t, (np.ndarray, np.generic)):
        shape, dtype, sharding = t.shape, np.dtype(t.dtype), None
    elif isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
        shape, dtype, sharding = tuple(t.shape), t.dtype, getattr(t, "sharding", None)
        try:
            sharding = _target.concrete(sharding, disp, "restore")
        except TreeMismatchError as e:
            return None, str(e)
    else:
        return None, (
            f"{disp}: unsupported target leaf of type {type(t).__qualname__}; use a "
            "jax.ShapeDtypeStruct, a jax.Array, a numpy array, a Python scalar or None"
        )

    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        impl = _key_impl_name(dtype)
        if spec.kind != _tree.PRNG_KEY:
            return None, f"{disp}: target is a PRNG key array ({impl}), {found()}"
        if impl != spec.impl:
            return None, f"{disp}: target keys use {impl}, {found()}"
        if spec.array_shape[: len(shape)] != tuple(shape):
            return None, f"{disp}: target key shape {tuple(shape)}, {found()}"
        extra = len(spec.array_shape) - len(shape)
        if sharding is None:
            sharding = SingleDeviceSharding(jax.local_devices()[0])
        data_sharding = _key_data_sharding(sharding, len(shape), extra)
        return _device_want(
            index, leaf, Mode.KEY, spec, _plan.np_dtype(spec.dtype), data_sharding
        ), None

    if not spec.stored or spec.kind == _tree.PRNG_KEY:
        return None, f"{disp}: target is an array {np.dtype(dtype)}{list(shape)}, {found()}"
    if tuple(shape) != spec.array_shape:
        return None, f"{disp}: target shape {tuple(shape)}, {found()}"
    saved_dtype = _plan.np_dtype(spec.dtype)
    host = isinstance(t, (np.ndarray, np.generic))
    if np.dtype(dtype) != saved_dtype and not cast:
        hint = "pass cast=True to convert"
        if not host and not _put.jax_holds(saved_dtype):
            hint = (
                f"{_X64_OFF}: to get {saved_dtype}, call {_X64_ON} first; or pass cast=True to "
                "convert (refused if a value would not fit)"
            )
        return None, f"{disp}: target dtype {np.dtype(dtype)}, {found()} ({hint})"
    if not host and not _put.jax_holds(np.dtype(dtype)):
        held = jax.dtypes.canonicalize_dtype(dtype)
        return None, (
            f"{disp}: target dtype {np.dtype(dtype)} for a jax.Array, {found()}, but {_X64_OFF} "
            f"and JAX would hold it as {held}, changing values silently. Call {_X64_ON} before "
            f"restoring, or ask for {held} in the target"
            + (" with cast=True (refused if a value would not fit)" if held != saved_dtype else "")
            + ", or restore into a numpy array"
        )
    if host:
        return want_host(index, leaf, spec, np.dtype(dtype)), None
    if sharding is None:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    return _device_want(index, leaf, Mode.ARRAY, spec, np.dtype(dtype), sharding), None


def _device_want(
    index: int, leaf: int, mode: Mode, spec: LeafSpec, dtype: np.dtype, sharding: Any
) -> Want:
    device_boxes, boxes = _device_boxes(sharding, spec.array_shape)
    return Want(
        index, leaf, mode, dtype=dtype, sharding=sharding, device_boxes=device_boxes, boxes=boxes
    )


@functools.lru_cache(maxsize=4096)
def _device_boxes(
    sharding: Any, shape: tuple[int, ...]
) -> tuple[tuple[tuple[Any, Box], ...], tuple[Box, ...]]:
    """The box each addressable device holds, and the distinct ones (cached: states repeat shardings)."""
    pairs = tuple(
        (d, _reshard.box_from_index(idx, shape))
        for d, idx in sharding.addressable_devices_indices_map(shape).items()
    )
    return pairs, tuple(dict.fromkeys(box for _, box in pairs))


# --------------------------------------------------------------------------- reading


def place(
    wants: Sequence[Want], leaves: Sequence[LeafSpec], outputs: dict, values: list[Any]
) -> None:
    """Sets ``values[w.index]`` for each want from the host blocks read for it.

    ``outputs[(leaf, box)]`` holds the saved data of every box in ``w.boxes``;
    host wants get a numpy array, the others device arrays (cast as asked,
    PRNG keys wrapped).
    """
    jobs, owners = [], []
    for w in wants:
        if w.mode == Mode.VALUE:
            values[w.index] = w.value
            continue
        spec = leaves[w.leaf]
        assert w.dtype is not None  # set for every mode but VALUE
        saved = _plan.np_dtype(spec.dtype)
        hosts = {}
        for box in w.boxes:
            hosts[box] = outputs[(w.leaf, box)]
        if w.mode != Mode.KEY and w.dtype != saved:
            hosts = _cast(hosts, w.dtype, spec)
        if w.sharding is None:  # host value (or a key array from target=None)
            arr = hosts[_reshard.full_box(spec.array_shape)]
            if w.mode == Mode.KEY:
                values[w.index] = jax.random.wrap_key_data(arr, impl=spec.impl)
            else:
                values[w.index] = arr
            continue
        jobs.append((spec.array_shape, w.dtype, w.sharding, w.device_boxes, hosts))
        owners.append(w)
    for w, arr in zip(owners, _put.arrays(jobs), strict=True):
        if w.mode == Mode.KEY:
            arr = jax.random.wrap_key_data(arr, impl=leaves[w.leaf].impl)
        values[w.index] = arr


def _cast(hosts: dict[Box, np.ndarray], dtype: np.dtype, spec: LeafSpec) -> dict[Box, np.ndarray]:
    """The blocks of a leaf converted to ``dtype`` (``cast=True``).

    Rounding is what a cast means; a value the conversion would change
    otherwise (an integer out of range, a finite float that overflows, a
    dropped imaginary part) is refused rather than wrapped silently.
    """
    changed, example = 0, ""
    for arr in hosts.values():
        n, what = _cast_loss(arr, dtype)
        changed, example = changed + n, example or what
    if changed:
        problem = (
            f"{spec.display}: cast=True to {dtype} would change {changed} of the saved "
            f"{spec.dtype} values (e.g. {example})"
        )
        raise TreeMismatchError(
            f"{problem}. Restore into {spec.dtype} instead (a jax.Array target needs "
            f"{_X64_ON} for 64-bit dtypes) or into a numpy array target.",
            [problem],
        )
    out = {}
    for box, arr in hosts.items():
        out[box] = aligned_empty(arr.shape, dtype)
        with warnings.catch_warnings():  # imaginary parts are all 0 (checked above)
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            out[box][...] = arr
    return out


def _number_kind(dtype: np.dtype) -> str | None:
    """b, i, f or c for bool, integer, float and complex dtypes (ml_dtypes' too), else None."""
    for kind, group in (
        ("b", np.bool_),
        ("i", np.integer),
        ("f", np.floating),
        ("c", np.complexfloating),
    ):
        if jax.dtypes.issubdtype(dtype, group):
            return kind
    return None


def _cast_loss(src: np.ndarray, dtype: np.dtype) -> tuple[int, str]:
    """How many values of ``src`` converting to ``dtype`` changes beyond rounding, and one."""
    have, want = _number_kind(src.dtype), _number_kind(dtype)
    if src.size == 0 or have is None or want is None or want == "b":
        return 0, ""
    if src.dtype.kind == "V":  # bfloat16, int4, float8_*: compare as plain numpy numbers
        src = src.astype(np.int64 if have == "i" else np.float32)
    if have == "c" and want != "c":
        bad = src.imag != 0
        if bad.any():
            return int(np.count_nonzero(bad)), f"{src[bad].flat[0]} would lose its imaginary part"
        src, have = src.real, "f"
    with np.errstate(over="ignore", invalid="ignore"):
        if want == "i":
            info = ml_dtypes.iinfo(dtype)
            if have == "f":
                bad = ~np.isfinite(src) | (src <= info.min - 1) | (src >= info.max + 1)
            else:
                bad = (src < info.min) | (src > info.max)
            what = "does not fit"
        else:
            bad = np.isfinite(src) & ~np.isfinite(src.astype(dtype))
            what = "would become infinite or NaN in"
    count = int(np.count_nonzero(bad))
    return count, (f"{src[bad].flat[0]} {what} {dtype}" if count else "")


def batches(wants: list[Want], leaves: Sequence[LeafSpec], budget: int) -> Iterator[list[Want]]:
    """``wants`` in batches of at most ``budget`` bytes of boxes read (a larger leaf goes
    alone); ``leaves``: the checkpoint's leaves, which the wants index."""
    batch: list[Want] = []
    size = 0
    for w in wants:
        nbytes = 0
        if w.mode != Mode.VALUE:
            nbytes = sum(_reshard.box_size(b) for b in w.boxes) * leaves[w.leaf].itemsize
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(w)
        size += nbytes
    if batch:
        yield batch
