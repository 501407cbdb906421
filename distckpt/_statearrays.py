"""A ``Checkpointable``'s state as data: its arrays become leaves of the saved tree.

``get_state()`` is split in two:

- its arrays (numpy arrays of numbers and booleans, ``jax.Array``\\ s, typed
  PRNG keys as their key data) become leaves of the saved tree, written,
  checksummed and read like any leaf;
- the rest, with a ``_procstate.Ref`` in place of each array, is the small
  pipeline state committed in the manifest (``_procstate``).

A per-process state's array ``a`` of shape ``s`` is saved as its bytes, one
global ``uint8`` array of shape ``(process_count, *s, itemsize)`` whose row
``p`` process ``p`` wrote (bytes, so that no dtype is narrowed on the way
through a device: an ``int64`` stays ``int64`` without ``jax_enable_x64``).
Every process's arrays must therefore have the same shapes and dtypes (the
save's agreement check names the difference otherwise); on restore each
process reads its own row only. A global state's arrays (``checkpoint_global``) are
host arrays, stored once, and their digests are part of the state every
process must agree on.

Restore gives each array back as the type ``get_state`` gave: a
``jax.Array`` on this process's first device, a numpy array, a typed key.

Three callers: ``save(..., pipeline=)`` / ``restore(..., pipeline=)`` append
the arrays after the tree's own leaves under ``PIPELINE_KEY``
(docs/format.md), and so does the local tier in its steps (``_localstate``);
the handler APIs save a ``Checkpointable`` alone (``_statetree``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt import _multihost, _plan, _procstate, _tree
from distckpt._procstate import Ref
from distckpt.errors import TreeMismatchError

# The key under which save(..., pipeline=) stores the state's arrays, after the
# tree's leaves: leaf i of them has the path PIPELINE_KEY/i.
PIPELINE_KEY = "__pipeline_state__"

_DATA_KINDS = frozenset("biufc")  # numpy dtype kinds stored as data; others stay in the record


class Holder:
    """Stands for the object in ``save(..., pipeline=)``: gives the split state, keeps what comes back."""

    def __init__(self, state: dict[str, Any] | None = None, is_global: bool = False):
        self.state, self.checkpoint_global = state, is_global
        self.received: dict[str, Any] | None = None
        self.arrays: list[str] = []  # each saved array, as people read it: where, dtype, shape

    def get_state(self) -> dict[str, Any]:
        assert self.state is not None
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.received = state


def split(obj: Any) -> tuple[list[Any], Holder]:
    """The leaves (the state's arrays, in order) and the stand-in to save ``obj`` (a
    ``Checkpointable``) with: its ``get_state`` gives the state with ``Ref``\\ s."""
    _procstate.check(obj)
    process = _multihost.process_index()
    state = obj.get_state()
    if not isinstance(state, dict):
        raise TypeError(
            f"{type(obj).__name__}.get_state() on process {process} returned "
            f"{type(state).__name__}; it must return a dict"
        )
    is_global = _procstate.is_global(obj)
    arrays: list[np.ndarray] = []
    names: list[str] = []
    skeleton = _split(state, arrays, is_global, "state", names)
    holder = Holder(skeleton, is_global)
    holder.arrays = [f"{n}: {a.dtype} {list(a.shape)}" for n, a in zip(names, arrays, strict=True)]
    if is_global or not arrays:
        return list(arrays), holder
    sharding = process_sharding()
    mine = sharding.mesh.devices.flat[process]
    leaves = []
    for a in arrays:
        raw = _as_bytes(a)
        leaves.append(
            jax.make_array_from_single_device_arrays(
                (sharding.mesh.size, *raw.shape), sharding, [jax.device_put(raw[None], mine)]
            )
        )
    return leaves, holder


def leaf_items(leaves: list[Any]) -> list[tuple[_tree.Path, Any]]:
    """``split``'s leaves as items of the saved tree: leaf ``i`` at ``PIPELINE_KEY/i``."""
    return [((("key", PIPELINE_KEY), ("idx", i)), a) for i, a in enumerate(leaves)]


def explain(error: TreeMismatchError, holder: Holder) -> TreeMismatchError:
    """``error`` (the processes saved different trees) said in terms of the state's arrays."""
    if holder.checkpoint_global or not holder.arrays:
        return error
    mine = "\n  ".join(holder.arrays)
    return TreeMismatchError(
        f"{error}\nThe pipeline state's arrays are saved as one array per array of the state, "
        "with a process axis: every process's state must hold arrays of the same shapes and "
        f"dtypes, in the same places. This process ({_multihost.process_index()}) has:\n  "
        f"{mine}\nPad them to one shape, or keep such values out of the state.",
        error.problems,
    )


def _split(
    value: Any, arrays: list[np.ndarray], is_global: bool, where: str, names: list[str]
) -> Any:
    if isinstance(value, dict):
        return {k: _split(v, arrays, is_global, f"{where}[{k!r}]", names) for k, v in value.items()}
    if isinstance(value, list):
        return [_split(v, arrays, is_global, f"{where}[{i}]", names) for i, v in enumerate(value)]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(
            _split(v, arrays, is_global, f"{where}[{i}]", names) for i, v in enumerate(value)
        )
    if isinstance(value, jax.Array | np.ndarray):
        names.append(where)  # dropped again below if it stays in the record
        ref = _array(value, arrays, is_global)
        if ref is None:
            names.pop()
            return value
        return ref
    return value  # Python values, numpy scalars: encoded in the record


def _array(value: Any, arrays: list[np.ndarray], is_global: bool) -> Ref | None:
    if isinstance(value, jax.Array) and value.is_fully_addressable:
        impl = None
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            kind, impl = "key", str(jax.random.key_impl(value))
            data = np.asarray(jax.random.key_data(value))
        else:
            kind, data = "jax", np.asarray(value)
        return _ref(data, kind, impl, arrays, is_global)
    if (
        isinstance(value, np.ndarray)
        and value.dtype.kind in _DATA_KINDS
        and value.dtype.fields is None
    ):
        return _ref(value, "numpy", None, arrays, is_global)
    return None  # other dtypes, arrays over several processes: left to the record's encoder


def _ref(
    data: np.ndarray, kind: str, impl: str | None, arrays: list[np.ndarray], is_global: bool
) -> Ref:
    data = np.asarray(data, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    digest = ""
    if is_global:  # the agreement check compares the record: let it see the values
        h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
        h.update(data.tobytes())
        digest = h.hexdigest()
    arrays.append(data)
    return Ref(len(arrays) - 1, kind, impl, digest, data.dtype.name, tuple(data.shape))


def _as_bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s elements as bytes: shape ``(*a.shape, a.itemsize)``, dtype uint8."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(*a.shape, a.itemsize)


def _from_bytes(raw: np.ndarray, ref: Ref) -> np.ndarray:
    return np.ascontiguousarray(raw).reshape(-1).view(_plan.np_dtype(ref.dtype)).reshape(ref.shape)


def process_sharding() -> NamedSharding:
    """One device per process (its first), processes in order, along axis ``process``."""
    first: dict[int, Any] = {}
    for d in jax.devices():
        if d.process_index not in first or d.id < first[d.process_index].id:
            first[d.process_index] = d
    devices = np.array([first[p] for p in sorted(first)])
    return NamedSharding(Mesh(devices, ("process",)), PartitionSpec("process"))


def want(shape: tuple[int, ...], dtype: str, per_process: bool) -> Any:
    """What to restore a saved array of the state as (a restore target's leaf)."""
    if per_process:
        return jax.ShapeDtypeStruct(shape, _plan.np_dtype(dtype), sharding=process_sharding())
    return np.empty(shape, _plan.np_dtype(dtype))


def own(restored: list[Any], per_process: bool) -> list[np.ndarray]:
    """This process's arrays among ``restored`` (read as ``want`` said, or whole on the
    host: the local tier keeps a one-process job's array so)."""
    if not per_process:
        return list(restored)
    out = []
    for a in restored:
        if isinstance(a, np.ndarray):
            out.append(a[_multihost.process_index()])
            continue
        (shard,) = a.addressable_shards
        out.append(np.asarray(shard.data)[0])
    return out


def join(value: Any, arrays: list[np.ndarray], per_process: bool) -> Any:
    """The state ``value`` (with ``Ref``\\ s) with each array put back as its type."""
    if isinstance(value, Ref):
        data = _from_bytes(arrays[value.leaf], value) if per_process else arrays[value.leaf]
        if value.kind == "numpy":
            return data
        device = jax.local_devices()[0]
        if value.kind == "key":
            return jax.random.wrap_key_data(jax.device_put(data, device), impl=value.impl)
        return jax.device_put(data, device)
    if isinstance(value, dict):
        return {k: join(v, arrays, per_process) for k, v in value.items()}
    if isinstance(value, list):
        return [join(v, arrays, per_process) for v in value]
    if isinstance(value, tuple):
        return tuple(join(v, arrays, per_process) for v in value)
    return value
