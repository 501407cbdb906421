"""Who keeps a copy of whose blocks in the local tier, and the reshard that sends them."""

from __future__ import annotations

import pytest

from distckpt import _replicate
from tests.mp import run_processes

HERE = "tests.test_replicate"


@pytest.mark.parametrize(
    "hosts",
    [
        ["a", "b"],
        ["a", "a", "b", "b"],
        ["b", "a", "b", "a"],  # interleaved process numbering
        ["a", "b", "c"],
        ["a", "a", "b", "b", "c", "c", "d", "d"],
        ["a", "a", "a", "b", "c", "d"],  # uneven: the largest host has half
    ],
)
def test_every_process_gets_one_peer_on_another_host_and_each_peer_is_used_once(hosts):
    peers = _replicate.peers(hosts, 2)
    assert all(len(p) == 1 for p in peers)
    chosen = [p[0] for p in peers]
    assert sorted(chosen) == list(range(len(hosts)))  # a permutation: each receives once
    for p, q in enumerate(chosen):
        assert hosts[p] != hosts[q], (p, q)


def test_more_copies_land_on_as_many_distinct_hosts():
    hosts = ["a", "a", "b", "b", "c", "c"]
    for p, extra in enumerate(_replicate.peers(hosts, 3)):
        assert len({hosts[p], *(hosts[q] for q in extra)}) == 3
    assert _replicate.peers(hosts, 1) == [[]] * 6


@pytest.mark.parametrize(
    ("hosts", "copies"), [(["a", "a"], 2), (["a", "a", "a", "b"], 2), (["a", "b"], 3)]
)
def test_no_peer_choice_when_a_host_holds_too_many_processes(hosts, copies):
    with pytest.raises(ValueError, match="copies of every block on different hosts"):
        _replicate.peers(hosts, copies)


def _w_peer_sharding_sends_each_block_to_the_peer() -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from distckpt import _replicate

    mesh = jax.make_mesh((2, 2), ("data", "model"))  # process p holds row p
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    out = {}
    for name, spec in (("sharded", P("data", "model")), ("replicated_rows", P(None, "model"))):
        sharding = NamedSharding(mesh, spec)
        x = jax.make_array_from_callback(full.shape, sharding, lambda i: full[i])
        hosts = [f"host{p}" for p in range(jax.process_count())]
        needs = _replicate.needs_copies(sharding, full.shape, hosts, 2)
        target = _replicate.peer_sharding(sharding, tuple(p[0] for p in _replicate.peers(hosts, 2)))
        moved = jax.device_put(x, target)
        got = {(s.index[0].start or 0, s.index[1].start or 0) for s in moved.addressable_shards}
        exact = all(
            np.array_equal(np.asarray(s.data), full[s.index]) for s in moved.addressable_shards
        )
        out[name] = {"needs": needs, "exact": exact, "got": sorted(got)}
    return out


def test_a_reshard_onto_the_peer_sharding_moves_every_block_to_the_peer_process():
    results = run_processes(
        f"{HERE}:_w_peer_sharding_sends_each_block_to_the_peer", devices_per_process=2
    )
    first, second = (r.value for r in results)
    # Sharded over both processes: each block exists on one host, so it is copied,
    # and each process now holds the other's blocks.
    assert first["sharded"]["needs"] and second["sharded"]["needs"]
    assert first["sharded"]["got"] == [[4, 0], [4, 3]]
    assert second["sharded"]["got"] == [[0, 0], [0, 3]]
    # Replicated over the processes: every block is already on both hosts.
    assert not first["replicated_rows"]["needs"]
    for r in (first, second):
        assert r["sharded"]["exact"] and r["replicated_rows"]["exact"]


def _w_send_to_peers_matches_the_reshard() -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from distckpt import _replicate

    # 3 processes x 2 devices
    mesh = Mesh(np.asarray(jax.devices()).reshape(3, 2), ("data", "model"))
    layouts = {
        "both_axes": ((12, 4), P("data", "model")),
        "flattened": ((12, 5), P(("data", "model"))),
        "rows_replicated_over_model": ((9, 3), P("data")),
    }
    arrays = []
    for n, (shape, spec) in enumerate(layouts.values()):
        full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1000 * n
        sharding = NamedSharding(mesh, spec)
        arrays.append(jax.device_put(full, sharding))  # the same full value on every process
    ring = (1, 2, 0)
    sent = _replicate.send_to_peers(arrays, ring)
    out = {}
    for name, a, s in zip(layouts, arrays, sent, strict=True):
        reference = jax.device_put(a, _replicate.peer_sharding(a.sharding, ring))
        by_device = {
            x.device.id: (x.index, np.asarray(x.data)) for x in reference.addressable_shards
        }
        out[name] = {
            "same_layout": s.sharding == reference.sharding,
            "same_blocks": all(
                x.index == by_device[x.device.id][0]
                and np.array_equal(np.asarray(x.data), by_device[x.device.id][1])
                for x in s.addressable_shards
            ),
        }
    return out


def test_send_to_peers_puts_the_same_blocks_on_the_same_devices_as_the_reshard():
    """One program per mesh (``ppermute``) instead of a reshard per leaf: bit-exact the same."""
    results = run_processes(
        f"{HERE}:_w_send_to_peers_matches_the_reshard", 3, devices_per_process=2
    )
    for r in results:
        for name, got in r.value.items():
            assert got == {"same_layout": True, "same_blocks": True}, (r.process_id, name)
