"""Describing leaves, choosing who writes what, and copying shards to host memory."""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from distckpt import _index, _knobs, _plan, _reshard, _tree
from distckpt._index import Grid
from distckpt._plan import LeafSpec
from distckpt._reshard import Box


def describe_sharding(sharding: Any) -> dict:
    """A JSON description of a sharding, for people and for ``metadata()``.

    ``memory_kind`` is recorded only when it is not the devices' default
    memory (host-offloaded state: ``"pinned_host"``, ``"unpinned_host"``).
    """
    if isinstance(sharding, NamedSharding):
        spec = [list(p) if isinstance(p, tuple) else p for p in sharding.spec]
        out = {
            "type": "NamedSharding",
            "mesh": {str(k): int(v) for k, v in sharding.mesh.shape.items()},
            "spec": spec,
        }
    elif isinstance(sharding, SingleDeviceSharding):
        out = {"type": "SingleDeviceSharding"}
    else:
        out = {"type": type(sharding).__name__}
    kind = getattr(sharding, "memory_kind", None)
    if kind is not None and kind != default_memory_kind():
        out["memory_kind"] = kind
    return out


@functools.cache
def default_memory_kind() -> str | None:
    """The memory kind arrays get when their sharding names none ("device")."""
    try:
        return jax.local_devices()[0].default_memory().kind
    except (RuntimeError, NotImplementedError):  # no memories API: one memory per device
        return None


@functools.cache
def dtype_name(dtype: Any) -> str:
    return str(np.dtype(dtype))  # slow enough to matter for thousands of leaves


@functools.cache
def _dtype_problem(dtype: np.dtype) -> str | None:
    """Why a numpy array of ``dtype`` cannot be stored as its bytes, or None if it can."""
    if dtype.fields is not None:
        return (
            "structured dtypes are not supported; save the fields as separate arrays "
            "({name: arr[name] for name in arr.dtype.names})"
        )
    if dtype.hasobject:
        return (
            "object arrays hold pointers to Python objects, not values; convert it to a "
            "numeric or string dtype, or save its items as separate leaves"
        )
    try:
        stored = _plan.np_dtype(dtype_name(dtype))
    except (TypeError, ValueError):
        stored = None
    if stored != dtype:
        return "its dtype name does not read back as the same dtype"
    return None


def describe(path: _tree.Path, leaf: Any) -> tuple[LeafSpec | None, str | None]:
    """Returns (spec, None), or (None, problem) for a leaf that cannot be saved."""
    kind = _tree.kind_of(leaf)
    disp = _tree.display(path)
    if kind is None:
        return None, (
            f"{disp}: cannot save a leaf of type {type(leaf).__module__}.{type(leaf).__qualname__}; "
            "supported leaves are jax.Array, numpy arrays, int, float, bool, str and None"
        )
    if kind == _tree.NONE:
        return LeafSpec(path, disp, kind), None
    if kind == _tree.PYTHON:
        return LeafSpec(path, disp, kind, value=leaf), None
    if kind == _tree.PRNG_KEY:
        data = jax.random.key_data(leaf)
        impl = str(jax.random.key_impl(leaf))
        return LeafSpec(
            path,
            disp,
            kind,
            tuple(data.shape),
            dtype_name(data.dtype),
            describe_sharding(leaf.sharding),
            impl=impl,
        ), None
    if kind == _tree.ARRAY:
        return LeafSpec(
            path,
            disp,
            kind,
            tuple(leaf.shape),
            dtype_name(leaf.dtype),
            describe_sharding(leaf.sharding),
        ), None
    arr = np.asarray(leaf)
    problem = _dtype_problem(arr.dtype)
    if problem:
        return None, f"{disp}: cannot save a numpy array of dtype {arr.dtype}: {problem}"
    return LeafSpec(
        path, disp, kind, tuple(arr.shape), dtype_name(arr.dtype), {"type": "host"}
    ), None


@dataclass(frozen=True)
class DeviceShard:
    """A shard a synchronous save has not fetched yet: it fetches it piece by piece.

    ``copies`` says whether a fetch copies into host memory (accelerator
    memory) or is a view of memory that already is the host's (the CPU
    backend); only a copying fetch costs host memory.
    """

    data: Any  # the shard's single-device jax.Array
    box: Box  # where it lies in the global array
    copies: bool
    sliceable: bool  # the device can slice it (default memory kind), so a piece crosses alone

    @property
    def piecewise(self) -> bool:
        """Whether fetching a piece costs only that piece (else a fetch costs the shard)."""
        return self.copies and self.sliceable

    def fetch(self, part: Box) -> np.ndarray:
        """The elements ``part`` (global coordinates, inside ``box``) in host memory."""
        within = _reshard.relative(part, self.box)
        if not self.copies:
            return np.asarray(self.data)[within]
        if not self.sliceable:
            return _host_copy(self.data)[within]
        # Slice on the device first, so that only this piece crosses to the host.
        return _host_copy(self.data[within])


def _fetch_copies(device: Any) -> bool:
    """Whether fetching a shard from ``device`` copies it into host memory (accelerator
    memory), rather than giving a view of memory that already is the host's (CPU)."""
    return device.platform != "cpu"


def _host_copy(data: Any) -> np.ndarray:
    """A single-device array in host memory, as a copy that nothing else keeps.

    ``np.asarray`` would also cache that copy on the array (JAX keeps it for
    later reads): a save would then leave a host copy of every shard it wrote
    alive for as long as the caller keeps its arrays.
    """
    fetch = getattr(data, "_single_device_array_to_np_array_did_copy", None)
    if fetch is None:  # a JAX without it: let it cache
        return np.asarray(data)
    out, _ = fetch()
    return out


def owned_shards(
    leaf: Any, kind: str, *, is_primary: bool, per_process: bool
) -> list[tuple[Box, np.ndarray | DeviceShard]]:
    """The shards this process writes, as (box, host array or ``DeviceShard``).

    A shard is written by the process holding its ``replica_id == 0`` copy, so
    replicated data is stored once; a process with no addressable shard of
    the leaf (an array on another process's sub-mesh) writes nothing for it.
    Host values are written by the primary: numpy leaves, and ``per_process``
    arrays (in a multi-process job, arrays the primary holds entirely on its
    own devices; every process may hold its own such value, like numpy).
    """
    if kind == _tree.NUMPY:
        if not is_primary:
            return []
        arr = np.asarray(leaf)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        return [(_reshard.full_box(arr.shape), arr)]
    if kind == _tree.PRNG_KEY:
        leaf = jax.random.key_data(leaf)
    if per_process and not is_primary:
        return []
    shards = leaf.addressable_shards
    out: list[tuple[Box, np.ndarray | DeviceShard]] = []
    for position, device, box, sliceable in _device_writes(leaf.sharding, tuple(leaf.shape)):
        shard = shards[position] if position < len(shards) else None
        if shard is None or shard.device != device:  # not in device order: look it up
            shard = next(s for s in shards if s.device == device)
        out.append((box, DeviceShard(shard.data, box, _fetch_copies(device), sliceable)))
    return out


@functools.lru_cache(maxsize=1024)
def _device_writes(sharding: Any, shape: tuple[int, ...]) -> tuple[tuple[int, Any, Box, bool], ...]:
    """``(position, device, box, sliceable)`` for each addressable device
    holding a ``replica_id == 0`` shard of an array of ``shape`` laid out by
    ``sharding``; ``position`` is where the device's shard usually is in
    ``addressable_shards`` (the sharding's device order; checked on use).

    Cached: the leaves of a state repeat a few (sharding, shape) pairs, and
    these facts are the same for every array that has them.
    """
    kind_of_memory = getattr(sharding, "memory_kind", None)
    sliceable = kind_of_memory in (None, default_memory_kind())
    me = jax.process_index()
    out = []
    position = 0
    for device, box, replica in _replicas(sharding, shape):
        if device.process_index != me:
            continue
        if replica == 0:
            out.append((position, device, box, sliceable))
        position += 1
    return tuple(out)


def _replicas(sharding: Any, shape: tuple[int, ...]) -> list[tuple[Any, Box, int]]:
    """``(device, box, replica id)`` for every device of ``sharding``, in its device
    order. JAX's rule: the devices holding one box count 0, 1, ... in that order, and
    the process of replica 0 writes the box (``owned_shards``, ``grid``)."""
    copies: dict[Box, int] = {}
    out = []
    for device, index in sharding.devices_indices_map(shape).items():
        box = _reshard.box_from_index(index, shape)
        out.append((device, box, copies.get(box, 0)))
        copies[box] = copies.get(box, 0) + 1
    return out


def stage(
    leaves: list[Any],
    specs: list[LeafSpec],
    *,
    is_primary: bool,
    per_process: Container[int] = (),
    copy: bool,
    pool: HostPool | None = None,
) -> tuple[list[tuple[int, Box, int]], dict[tuple[int, Box], np.ndarray | DeviceShard]]:
    """What this process writes, and its host data.

    Returns ``(shards, staged)``: ``(leaf index, box, itemsize)`` for every
    shard this process owns, and for each its host array or a
    ``DeviceShard``. A synchronous save (``copy=False``) leaves shards on
    their devices, and each writer thread fetches one piece of a shard at a
    time (``_plan.save_memory``), so its host memory stays within the budget
    (on CPU a fetch is a view).

    An async save (``copy=True``) takes every shard off the caller's hands
    now, so the caller may donate or overwrite its arrays at once: shards in
    accelerator memory are copied to the host, numpy leaves are copied (into
    ``pool``'s buffers when given), all on ``threads`` threads. Shards of
    CPU devices are kept as views when the runtime keeps a buffer with a live
    view from being donated (``views_outlive_donation``); the caller's
    donating step then gets fresh buffers, and nothing is copied here.
    ``per_process``: indices of the arrays the primary alone writes (see
    ``owned_shards``), as the primary decided them (``per_process_leaves``).
    """
    shards: list[tuple[int, Box, int]] = []
    staged: dict[tuple[int, Box], np.ndarray | DeviceShard] = {}
    work: list[tuple[tuple[int, Box], Callable[[], np.ndarray]]] = []
    pool = pool if pool is not None else HostPool()
    for index, (leaf, spec) in enumerate(zip(leaves, specs, strict=True)):
        if not spec.stored:
            continue
        for box, src in owned_shards(
            leaf, spec.kind, is_primary=is_primary, per_process=index in per_process
        ):
            key = (index, box)
            shards.append((index, box, spec.itemsize))
            if not copy:
                staged[key] = src
            elif isinstance(src, DeviceShard) and src.copies:
                work.append((key, functools.partial(src.fetch, box)))  # a private copy
            elif isinstance(src, DeviceShard) and views_outlive_donation():
                staged[key] = src.fetch(box)  # a view the runtime keeps from donation
            else:
                host = src.fetch(box) if isinstance(src, DeviceShard) else src
                dst = pool.take(host.shape, host.dtype)
                work += [(key, functools.partial(_copy, dst, host, part)) for part in _parts(dst)]
    if work:
        threads = min(len(work), _knobs.get("io_threads"), os.cpu_count() or 1)
        with ThreadPoolExecutor(threads, thread_name_prefix="distckpt-stage") as ex:
            for (key, _), out in zip(work, ex.map(lambda w: w[1](), work), strict=True):
                staged[key] = out  # the parts of one copy all give its buffer
    return shards, staged


# A copy larger than this is cut into bands of rows, so threads share one large shard.
_COPY_BAND_BYTES = 16 << 20


def _parts(dst: np.ndarray) -> list[Any]:
    """Bands of leading rows of ``dst`` (``...``, the whole array, when small or 0-d)."""
    if dst.ndim == 0 or dst.nbytes <= _COPY_BAND_BYTES or dst.shape[0] < 2:
        return [...]
    rows = max(1, dst.shape[0] * _COPY_BAND_BYTES // dst.nbytes)
    return [slice(i, i + rows) for i in range(0, dst.shape[0], rows)]


def _copy(dst: np.ndarray, src: np.ndarray, part: Any) -> np.ndarray:
    np.copyto(dst[part], src[part])
    return dst


_probe_lock = threading.Lock()  # one probe per process; a second caller waits for it
_probe_result: list[bool] = []


def views_outlive_donation() -> bool:
    """Whether a numpy view of a CPU ``jax.Array`` keeps its values when a jitted
    computation is asked to donate the array.

    The runtime refuses to reuse a buffer that has a live view (an external
    reference): on CPU the computation then writes fresh buffers and the view
    is untouched, so an async save may keep views instead of copying. Some
    runtimes raise instead; this asks the one in use, once per process, with
    a 4-element array, and any other outcome makes async saves copy. The
    manager asks in the background when it is created.
    """
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe_views())
        return _probe_result[0]


def _probe_views() -> bool:
    try:
        device = jax.local_devices(backend="cpu")[0]
        expected = np.arange(4, dtype=np.float32)
        x = jax.device_put(expected, device)
        view = np.asarray(x)
        overwrite = jax.jit(lambda a: a * 0 - 1, donate_argnums=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "donated buffers were not usable"
            jax.block_until_ready(overwrite(x))
        return bool((view == expected).all())
    except Exception:  # noqa: BLE001 - any failure means: copy
        return False


def grid(leaf: Any, spec: LeafSpec, *, primary_writes: bool) -> Grid:
    """The shard grid of a stored leaf: who writes which part (see ``owned_shards``).

    Derived from the global sharding, so every process computes the same
    grid without hearing from the others; a process checks its own writes
    against it (``_index.check_own_writes``).
    """
    if spec.kind == _tree.NUMPY:
        return _index.build_grid(spec.array_shape, [(_reshard.full_box(spec.array_shape), 0)])
    if spec.kind == _tree.PRNG_KEY:
        leaf = jax.random.key_data(leaf)
    return _sharding_grid(leaf.sharding, spec.array_shape, 0 if primary_writes else None)


@functools.lru_cache(maxsize=1024)
def _sharding_grid(sharding: Any, shape: tuple[int, ...], writer: int | None) -> Grid:
    writers = {
        box: device.process_index if writer is None else writer
        for device, box, replica in _replicas(sharding, shape)
        if replica == 0
    }
    return _index.build_grid(shape, writers.items())


def per_process_leaves(leaves: list[Any], specs: list[LeafSpec]) -> list[int]:
    """Indices of the arrays this process holds entirely on its own devices.

    Only the primary's answer counts (it travels in its ``prepare`` payload):
    an array on a sub-mesh of another process is fully addressable there but
    not on the primary, and must be written by the process that holds it.
    """
    return [
        i
        for i, (leaf, spec) in enumerate(zip(leaves, specs, strict=True))
        if spec.kind in (_tree.ARRAY, _tree.PRNG_KEY) and leaf.is_fully_addressable
    ]


class HostPool:
    """Host buffers that one async save hands to the next.

    An async save must copy what it cannot keep as views before it returns.
    Fresh buffers cost a page fault per page, which on some machines costs
    more than the copy; reusing the previous save's buffers (free again once
    that save committed) leaves only the copy. The pool holds at most the
    buffers of one save: what this process copied last time.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        self._lent: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer of ``shape`` and ``dtype``: the last save's if it had one, else new."""
        bucket = self._free.get((tuple(shape), np.dtype(dtype)))
        dst = bucket.pop() if bucket else np.empty(shape, dtype)
        self._lent.append(dst)
        return dst

    def recycle(self) -> None:
        """The buffers taken since the last call are free again (their save is over);
        they replace anything older."""
        self._free = {}
        for a in self._lent:
            self._free.setdefault((a.shape, a.dtype), []).append(a)
        self._lent = []
