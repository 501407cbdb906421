"""Read once, then share: leaves replicated across processes are read in parts and gathered.

With data-parallel replicas across processes (a mesh axis that a leaf's
``PartitionSpec`` leaves unused, along which the devices belong to
different processes), every replica group needs the same bytes, and a
plain restore has each group read all of them from storage. ``plan``
restores such a leaf onto a *read sharding* instead: the target's mesh with
those axes added to a dimension they divide, so each element is read from
storage by one process only. Once every process has read its part,
``Gather.tree`` moves each leaf onto its target sharding with the job's own
collectives: one jitted identity per batch of leaves whose
``out_shardings`` are the targets, which XLA turns into all-gathers over the
replica axes (gloo on CPU, NCCL or ICI on accelerators). Nothing here opens
a connection of its own.

Every decision depends only on what every process holds alike (the target's
shapes, dtypes and shardings, the match against the commit record, the
knobs); ``Gather.digest`` summarises them, and restore's agreement check
refuses processes whose digests differ before any of them enters a
collective. The collectives run after that check, outside the phase, so an
error on one process (a corrupt chunk) is raised on every process first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt import _commit, _knobs, _put, _reshard, _target, _tree
from distckpt._match import Mode, Want
from distckpt.errors import TreeMismatchError

# ``share=`` of restore -> the value of the ``restore_share`` knob it stands for.
_ARGUMENT = {None: None, True: "on", False: "off"}

# The least ``auto`` must save each process in reads to share a leaf. A shared
# leaf costs every process an all-gather (about 1 ms for a 1 MiB leaf through
# gloo on the development machine) and, once, compiling it (about 1.5 ms).
# Restoring 1 GiB from the page cache there (scripts/share_bench.py, 2 replica
# groups), leaves that saved each process 0.5 or 2 MiB restored 20-30% slower
# shared, leaves that saved 32 MiB faster. Slower storage favours sharing.
AUTO_MIN_SAVED_BYTES = 4 << 20

Entry = str | tuple[str, ...] | None  # one dimension of a PartitionSpec


def read_spec(
    shape: Sequence[int], spec: Sequence[Any], axes: Mapping[str, int], spanning: frozenset[str]
) -> tuple[Entry, ...] | None:
    """The ``PartitionSpec`` entries of the read sharding, or None when nothing is shared.

    ``axes`` are the mesh's axis sizes, in mesh order; ``spanning`` the axes
    along which devices belong to different processes. Each spanning axis
    the spec leaves unused goes, after the axes already there, onto the
    first dimension whose size it divides together with them, so that every
    part of that dimension's shard is read by one replica group. Pure.
    """
    entries: list[Any] = [*spec, *([None] * (len(shape) - len(spec)))]
    parts: list[tuple[str, ...]] = []
    for e in entries:
        names = (e,) if isinstance(e, str) else e if isinstance(e, tuple) else ()
        if e is not None and not (names and all(isinstance(n, str) for n in names)):
            return None  # PartitionSpec.UNCONSTRAINED and the like: leave it to JAX
        parts.append(names)
    used = {n for p in parts for n in p}
    changed = False
    for axis, size in axes.items():
        if axis in used or axis not in spanning or size < 2:
            continue
        for d, n in enumerate(shape):
            split = math.prod(axes[a] for a in parts[d]) * size
            if n >= split and n % split == 0:
                parts[d] = (*parts[d], axis)
                entries[d] = parts[d]
                changed = True
                break
    return tuple(entries) if changed else None


@functools.lru_cache(maxsize=256)
def _mesh_processes(mesh: Mesh) -> tuple[frozenset[str], bool]:
    """The axes along which ``mesh``'s devices change process; whether it has every process's."""
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    spanning = frozenset(
        name
        for i, name in enumerate(mesh.axis_names)
        if (procs != np.take(procs, [0], axis=i)).any()
    )
    return spanning, len(set(procs.flat)) == jax.process_count()


def _elements_read(sharding: NamedSharding, shape: tuple[int, ...]) -> int:
    """Elements all processes together read of a leaf on ``sharding``: each its distinct boxes."""
    boxes: dict[int, set[_reshard.Box]] = {}
    for d, index in sharding.devices_indices_map(shape).items():
        process = d.process_index  # type: ignore[attr-defined]  # jaxlib's Device has it, untyped
        boxes.setdefault(process, set()).add(_reshard.box_from_index(index, shape))
    return sum(_reshard.box_size(b) for bs in boxes.values() for b in bs)


@functools.lru_cache(maxsize=4096)
def _read_sharding(
    sharding: NamedSharding, shape: tuple[int, ...], itemsize: int, chunk: int | None
) -> NamedSharding | None:
    """The read sharding of one leaf, or None; ``chunk``: the chunk size, for ``auto`` only."""
    mesh = sharding.mesh
    if not isinstance(mesh, Mesh) or math.prod(shape) == 0:
        return None
    if getattr(sharding.spec, "unreduced", None) or getattr(sharding.spec, "reduced", None):
        return None
    # The gather runs in device memory, which offloaded (pinned_host) state avoids.
    kind = sharding.memory_kind
    if kind is not None and kind != mesh.devices.flat[0].default_memory().kind:
        return None
    spanning, everyone = _mesh_processes(mesh)
    if not spanning or not everyone:  # a collective wants every process's devices
        return None
    spec = read_spec(shape, tuple(sharding.spec), dict(mesh.shape), spanning)
    if spec is None:
        return None
    read = NamedSharding(mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    if chunk is not None:
        if math.prod(read.shard_shape(shape)) * itemsize < chunk:
            return None  # chunks are read whole: processes would read the same ones
        saved = (_elements_read(sharding, shape) - _elements_read(read, shape)) * itemsize
        if saved < AUTO_MIN_SAVED_BYTES * jax.process_count():
            return None  # saves less than a collective costs
    return read


@dataclass(frozen=True)
class Reads:
    """The restore target with shared leaves on their read shardings."""

    items: list[tuple[_tree.Path, Any]]  # to match against the checkpoint
    targets: dict[int, tuple[NamedSharding, int]]  # index -> (sharding to return, bytes)


def plan(items: Sequence[tuple[_tree.Path, Any]], share: bool | None) -> Reads:
    """The read sharding of each target leaf worth sharing; ``share`` as ``restore`` takes it.

    A ``ShapeDtypeStruct`` or ``jax.Array`` leaf on a ``NamedSharding`` in
    device memory whose mesh holds every process is shared when the spec
    leaves a process-spanning axis unused and a dimension divides by it;
    with the ``auto`` setting only when each device's part is at least a
    chunk (``chunk_bytes``: below it processes would read the same whole
    chunks anyway) and each process reads on average at least
    ``AUTO_MIN_SAVED_BYTES`` fewer. Everything else keeps its target.
    """
    if share is not None and not isinstance(share, bool):
        raise TypeError(f"restore(share=) takes True, False or None (automatic), got {share!r}")
    mode = _knobs.get("restore_share", _ARGUMENT[share])
    if mode == "off" or jax.process_count() == 1:
        return Reads(list(items), {})
    chunk = _knobs.get("chunk_bytes") if mode == "auto" else None
    out, targets = list(items), {}
    for i, (path, t) in enumerate(items):
        if not isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
            continue
        try:
            sharding = _target.concrete(getattr(t, "sharding", None), "", "restore")
        except TreeMismatchError:
            continue  # match reports it
        if not isinstance(sharding, NamedSharding):
            continue
        key = jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key)
        if not key and not _put.jax_holds(np.dtype(t.dtype)):
            continue  # match reports it
        shape = tuple(t.shape)
        read = _read_sharding(sharding, shape, t.dtype.itemsize, chunk)
        if read is not None:
            out[i] = (path, jax.ShapeDtypeStruct(shape, t.dtype, sharding=read))
            targets[i] = (sharding, math.prod(shape) * t.dtype.itemsize)
    return Reads(out, targets)


def _identity(*xs: Any) -> tuple[Any, ...]:
    return xs


@dataclass(frozen=True)
class _Batch:
    indices: tuple[int, ...]
    run: Any  # the compiled identity: read shardings in, target shardings out


class Gather:
    """The restored leaves, and the collectives that move shared ones onto their targets.

    Built inside restore's phase, where compiling can still fail on one
    process and be reported on all; ``tree`` runs the collectives and is
    called by every process after the phase, once all have read their parts.
    """

    def __init__(self, reads: Reads, wants: Sequence[Want], values: list[Any], treedef: Any):
        self._values, self._treedef = values, treedef
        moved = [
            w.index for w in wants if w.index in reads.targets and w.mode in (Mode.ARRAY, Mode.KEY)
        ]
        # One jitted call per device assignment and about a restore batch of
        # leaves (read_batch_bytes, else the memory budget): one dispatch for many
        # leaves, and at most one batch's parts alive next to the gathered
        # arrays. Global sizes: the same on every process.
        budget = _knobs.get("read_batch_bytes") or _knobs.get("memory_bytes")
        groups: dict[tuple[int, ...], list[list[int]]] = {}
        sizes: dict[tuple[int, ...], int] = {}
        for i in moved:
            sharding, nbytes = reads.targets[i]
            group = tuple(d.id for d in sharding.mesh.devices.flat)
            batches = groups.setdefault(group, [[]])
            if batches[-1] and sizes[group] + nbytes > budget:
                batches.append([])
                sizes[group] = 0
            batches[-1].append(i)
            sizes[group] = sizes.get(group, 0) + nbytes
        self._batches: list[_Batch] = []
        record = []
        for group, batches in groups.items():
            for indices in batches:
                outs = tuple(reads.targets[i][0] for i in indices)
                args = [values[i] for i in indices]
                run = jax.jit(_identity, out_shardings=outs).lower(*args).compile()
                self._batches.append(_Batch(tuple(indices), run))
                record.append([group, [[i, str(values[i].sharding.spec)] for i in indices]])
        # What every process must share before any enters a collective (None: nothing shared).
        self.digest: str | None = None
        if record:
            plan_hash = hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]
            self.digest = f"{len(moved)} leaf(s) in {len(record)} gather(s), plan {plan_hash}"

    def tree(self) -> Any:
        """The restored tree, every leaf on its target sharding; collective when anything is shared."""
        for batch in self._batches:
            args = [self._values[i] for i in batch.indices]
            outs = batch.run(*args)
            del args
            for i, out in zip(batch.indices, outs, strict=True):
                self._values[i] = out
            # One gather in flight at a time: its parts are freed before the next
            # starts (device memory), and many in flight at once hung gloo here.
            jax.block_until_ready(outs)
        return jax.tree_util.tree_unflatten(self._treedef, self._values)


def check_same(opened: list[dict]) -> None:
    """Refuses, on every process alike, processes that planned different shared reads."""
    _commit.refuse_if_different(
        [o.get("share") for o in opened],
        lambda p: f"shares {opened[p].get('share') or 'nothing'}",
        "restore: the processes planned different reads to share",
        "Nothing was returned: every process must restore into the same target shardings with "
        "the same share= argument, and the same DISTCKPT_RESTORE_SHARE, DISTCKPT_CHUNK_BYTES, "
        "DISTCKPT_READ_BATCH_BYTES and DISTCKPT_MEMORY_BYTES.",
    )
