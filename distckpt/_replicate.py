"""The local tier's copies: which process keeps a copy of whose blocks, on another host.

Peer choice and layouts are pure (process-to-host maps, shardings); only
``send_to_peers`` moves data.
The local tier keeps every block of a checkpoint on at least ``copies``
hosts. A block that the job itself holds on that many hosts (a
data-parallel replica) needs nothing more. Otherwise every process sends
its blocks to its *peers*: processes on other hosts, chosen here, the
same for every leaf. The transfer is a reshard through the job's own
collectives onto ``peer_sharding``, the same layout with each process's
devices replaced by its peer's (docs/local_tier.md).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt import _reshard
from distckpt._reshard import Box


def peers(hosts: Sequence[str], copies: int) -> list[list[int]]:
    """For each process, the ``copies - 1`` processes that keep copies of its blocks.

    ``hosts[p]`` names the host of process ``p``. Processes are ordered by
    host (then by index) and process ``p``'s ``k``-th peer is the one ``k *
    m`` places further round that order, ``m`` being the most processes any
    host has: never on ``p``'s host, never the same for two processes (so
    each process also receives exactly ``copies - 1`` blocks per block it
    sends). Raises ValueError when no such choice exists: a host with more
    than ``1 / copies`` of the processes.
    """
    n = len(hosts)
    if copies < 1:
        raise ValueError(f"copies must be at least 1, not {copies}")
    order = sorted(range(n), key=lambda p: (hosts[p], p))
    where = {p: i for i, p in enumerate(order)}
    counts = collections.Counter(hosts)
    host, most = counts.most_common(1)[0] if n else ("", 0)
    if copies > 1 and copies * most > n:
        raise ValueError(
            f"{copies} copies of every block on different hosts need at least {copies} hosts "
            f"with no host holding more than 1/{copies} of the processes; host {host!r} has "
            f"{most} of the {n} processes. Give each process its host "
            "(CheckpointManager(local_host=...) or DISTCKPT_HOST), or keep fewer copies"
        )
    return [[order[(where[p] + k * most) % n] for k in range(1, copies)] for p in range(n)]


def block_hosts(
    sharding: NamedSharding, shape: tuple[int, ...], hosts: Sequence[str]
) -> dict[Box, frozenset[str]]:
    """The hosts holding each distinct block of an array laid out by ``sharding``."""
    out: dict[Box, set[str]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        box = _reshard.box_from_index(index, shape)
        process = device.process_index  # type: ignore[attr-defined]  # untyped in jaxlib
        out.setdefault(box, set()).add(hosts[process])
    return {box: frozenset(h) for box, h in out.items()}


def needs_copies(
    sharding: NamedSharding, shape: tuple[int, ...], hosts: Sequence[str], copies: int
) -> bool:
    """Whether some block of the array is held on fewer than ``copies`` hosts."""
    return any(len(h) < copies for h in block_hosts(sharding, shape, hosts).values())


def _peer_devices(mesh: Mesh, peer: tuple[int, ...]) -> list:
    """For each device of ``mesh.devices.flat``, the device in the same place on its
    process's peer: the same position among that process's devices (sorted by id)."""
    flat = list(mesh.devices.flat)
    by_process: dict[int, list] = {}
    for d in sorted(flat, key=lambda d: d.id):
        by_process.setdefault(d.process_index, []).append(d)
    sizes = {len(v) for v in by_process.values()}
    if len(sizes) != 1:
        raise ValueError(
            "the mesh's processes hold different numbers of its devices "
            f"({sorted(sizes)}); the local tier copies blocks between processes that hold "
            "alike parts of a mesh"
        )
    position = {d.id: i for ds in by_process.values() for i, d in enumerate(ds)}
    moved = []
    for d in flat:
        target = peer[d.process_index]
        if target not in by_process:
            raise ValueError(
                f"process {d.process_index}'s peer, process {target}, holds no device of the mesh"
            )
        moved.append(by_process[target][position[d.id]])
    return moved


@functools.lru_cache(maxsize=1024)
def peer_sharding(sharding: NamedSharding, peer: tuple[int, ...]) -> NamedSharding:
    """``sharding`` with each device replaced by the device in the same place on its
    process's peer (``peer[p]``): a reshard onto it moves every block to the peer.

    The device in the same place is the one at the same position among its
    process's devices (sorted by id). Raises ValueError where the mesh's
    processes do not all hold the same number of its devices, or a peer
    holds none: then no such exchange of blocks exists.
    """
    mesh = sharding.mesh
    if not isinstance(mesh, Mesh):
        raise ValueError("an abstract mesh has no devices to send blocks to")
    devices = np.asarray(_peer_devices(mesh, peer), dtype=object).reshape(mesh.devices.shape)
    return NamedSharding(
        Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types),
        sharding.spec,
        memory_kind=sharding.memory_kind,
    )


def send_to_peers(arrays: Sequence[jax.Array], peer: tuple[int, ...]) -> list[jax.Array]:
    """Every block of ``arrays`` sent to the peer's device in the same place, as
    ``jax.device_put(a, peer_sharding(a.sharding, peer))`` does, in one program per mesh.

    A reshard per array is one collective program per leaf, each dispatched and
    waited for in turn; here all the arrays of one mesh move in one jitted
    ``shard_map`` of ``ppermute``s, so the transfers of many leaves cost one
    launch. Arrays whose shape the mesh does not divide evenly (``shard_map``
    needs even blocks) are resharded one by one. Collective: every process calls
    it with alike arrays. The results are laid out by ``peer_sharding``.
    """
    out: list[jax.Array | None] = [None] * len(arrays)
    groups: dict[Mesh, list[int]] = {}
    for i, a in enumerate(arrays):
        sharding = a.sharding
        assert isinstance(sharding, NamedSharding)
        if isinstance(sharding.mesh, Mesh) and _even(sharding, a.shape):
            groups.setdefault(sharding.mesh, []).append(i)
        else:
            out[i] = jax.device_put(a, peer_sharding(sharding, peer))
    for mesh, members in groups.items():
        specs = tuple(arrays[i].sharding.spec for i in members)  # type: ignore[attr-defined]
        moved = _permute(mesh, specs, _permutation(mesh, peer))(*(arrays[i] for i in members))
        for i, m in zip(members, moved, strict=True):
            a = arrays[i]
            target = peer_sharding(a.sharding, peer)
            # The same buffers, named by the layout they now follow: the block on each
            # device is the one its place in ``target`` says (no copy).
            shards = [s.data for s in m.addressable_shards]
            out[i] = jax.make_array_from_single_device_arrays(a.shape, target, shards)
    return [a for a in out if a is not None]  # every one was set above


def _even(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    """Whether every dimension is split into equal blocks by ``sharding``."""
    sizes = dict(sharding.mesh.shape)
    for dim, entry in zip(shape, sharding.spec, strict=False):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if dim % math.prod(sizes[a] for a in axes):
            return False
    return len(sharding.spec) <= len(shape)


@functools.lru_cache(maxsize=64)
def _permutation(mesh: Mesh, peer: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(source, destination) positions in ``mesh.devices.flat`` for ``send_to_peers``."""
    flat = list(mesh.devices.flat)
    where = {d.id: i for i, d in enumerate(flat)}
    return tuple((i, where[d.id]) for i, d in enumerate(_peer_devices(mesh, peer)))


@functools.lru_cache(maxsize=256)
def _permute(mesh: Mesh, specs: tuple[PartitionSpec, ...], perm: tuple[tuple[int, int], ...]):
    """A jitted program moving each block of arrays laid out by ``specs`` along ``perm``
    (positions in ``mesh.devices.flat``: row-major over all the mesh's axes)."""
    axes = tuple(mesh.axis_names)

    def body(*blocks: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jax.lax.ppermute(b, axes, perm) for b in blocks)

    # ``check_vma=False``: after the permutation the blocks of one replica group need not
    # agree; only each device's own buffer is used (relabelled by ``peer_sharding``).
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs, check_vma=False))
