"""The local tier with real processes: kept on two hosts, recovered after a host is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.mp import run_processes

HERE = "tests.test_local_tier"


def _state(mesh_kind: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    if mesh_kind == "fsdp":  # every block on one process: explicit peer copies
        mesh = jax.make_mesh((n,), ("fsdp",))
        w_spec, b_spec = P("fsdp"), P()
    else:  # data-parallel over processes: the replicas are the copies
        mesh = jax.make_mesh((jax.process_count(), n // jax.process_count()), ("data", "model"))
        w_spec, b_spec = P(None, "model"), P("model")
    full = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, w_spec), lambda i: full[i])
    b = jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), NamedSharding(mesh, b_spec))
    state = {"w": w, "b": b, "step": np.int64(7), "name": "run"}
    if mesh_kind == "fsdp":  # a second array to copy: recovery moves several in one program
        state["v"] = jax.device_put(jnp.arange(32, dtype=jnp.int32), NamedSharding(mesh, w_spec))
    return state, full


def _w_save(tmp: str, mesh_kind: str, steps: list) -> dict:
    import jax

    from distckpt._localtier import LocalTier

    state, _ = _state(mesh_kind)
    tier = LocalTier(f"{tmp}/local{jax.process_index()}", copies=2, keep=2, host=None, timeout_s=30)
    for step in steps:
        state = jax.tree.map(lambda x: x + 1 if hasattr(x, "sharding") else x, state)
        finish = tier.save(step, state, extra={"user_metadata": {"step": step}})
        finish()
    return {"steps": tier.steps()}


def _w_recover(tmp: str, mesh_kind: str, last: int) -> dict:
    import jax
    import numpy as np

    import distckpt
    from distckpt._localtier import LocalTier

    state, full = _state(mesh_kind)
    tier = LocalTier(f"{tmp}/local{jax.process_index()}", copies=2, keep=2, host=None, timeout_s=30)
    got = tier.recover(distckpt.abstract_like(state), newer_than=None)
    if got is None:
        return {"step": None}
    step, tree, extra, _ = got
    bump = len([s for s in (1, 2, 3) if s <= last])  # saves so far added 1 each
    exact_w = all(
        np.array_equal(np.asarray(s.data), (full + bump)[s.index])
        for s in tree["w"].addressable_shards
    )
    exact_b = all(
        np.array_equal(
            np.asarray(s.data).astype(np.float32), (np.arange(8) + bump)[s.index].astype(np.float32)
        )
        for s in tree["b"].addressable_shards
    )
    exact_v = "v" not in tree or all(
        np.array_equal(np.asarray(s.data), (np.arange(32) + bump)[s.index])
        for s in tree["v"].addressable_shards
    )
    stats = tier.last_recovery
    return {
        "step": step,
        "exact": exact_w and exact_b and exact_v,
        "extra": extra,
        "host_values": [int(tree["step"]), str(tree["step"].dtype), tree["name"]],
        "local": stats.local_bytes,
        "peer": stats.peer_bytes,
    }


def _run(fn, tmp, **kw):
    hosts = {0: {"DISTCKPT_HOST": "host0"}, 1: {"DISTCKPT_HOST": "host1"}}
    return [
        r.value
        for r in run_processes(
            f"{HERE}:{fn}",
            args={"tmp": str(tmp), **kw},
            devices_per_process=2,
            per_process_env=hosts,
        )
    ]


def test_fsdp_state_recovers_after_a_host_lost_its_directory(tmp_path):
    saved = _run("_w_save", tmp_path, mesh_kind="fsdp", steps=[1, 2, 3])
    assert [s["steps"] for s in saved] == [[2, 3], [2, 3]]
    whole = _run("_w_recover", tmp_path, mesh_kind="fsdp", last=3)
    assert [r["step"] for r in whole] == [3, 3] and all(r["exact"] for r in whole)
    # Every block is read where it was kept; only the values every process keeps
    # whole (the int64 step) come from the lowest process, to all others.
    assert [r["peer"] for r in whole] == [0, 8]
    shutil.rmtree(Path(tmp_path) / "local1")  # host 1 replaced by a fresh one
    back = _run("_w_recover", tmp_path, mesh_kind="fsdp", last=3)
    assert [r["step"] for r in back] == [3, 3] and all(r["exact"] for r in back), back
    assert back[1]["peer"] > 0 and back[1]["local"] == 0
    assert back[0]["host_values"] == back[1]["host_values"] == [7, "int64", "run"]


def test_data_parallel_state_recovers_from_replicas(tmp_path):
    _run("_w_save", tmp_path, mesh_kind="dp", steps=[1])
    shutil.rmtree(Path(tmp_path) / "local0")
    back = _run("_w_recover", tmp_path, mesh_kind="dp", last=1)
    assert [r["step"] for r in back] == [1, 1] and all(r["exact"] for r in back), back
    assert back[0]["peer"] > 0


def test_both_copies_lost_gives_no_local_step(tmp_path):
    _run("_w_save", tmp_path, mesh_kind="fsdp", steps=[1])
    shutil.rmtree(Path(tmp_path) / "local0")
    shutil.rmtree(Path(tmp_path) / "local1")
    assert [r["step"] for r in _run("_w_recover", tmp_path, mesh_kind="fsdp", last=1)] == [
        None,
        None,
    ]


# --------------------------------------------------------------------------- the manager


def _pipeline_state(step: int, p: int) -> dict:
    """A data pipeline's state at ``step`` on process ``p``: arrays of every kind the
    local tier keeps as data (a 1000 x 1000 jax.Array, int64 beyond int32, a typed
    key), and values kept in the record."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    big = jnp.arange(1000 * 1000, dtype=jnp.float32).reshape(1000, 1000) * 0.25 + step + p
    return {
        "position": 100 * step + p,
        "name": f"shard-{p}",
        "big": big,
        "order": np.arange(5, dtype=np.int64) * (1 << 40) + step + p,
        "key": jax.random.key(10 * step + p),
        "counts": [step, p],
    }


def _state_problems(got: dict | None, want: dict) -> list[str]:
    """How ``got`` differs from ``want`` in types and bits (empty: identical)."""
    import jax
    import numpy as np

    if got is None:
        return ["no state was given"]
    problems = [] if list(got) == list(want) else [f"keys {list(got)}"]
    for k in ("position", "name", "counts"):
        if got.get(k) != want[k] or type(got.get(k)) is not type(want[k]):
            problems.append(f"{k}: {got.get(k)!r}")
    if not isinstance(got["big"], jax.Array) or got["big"].dtype != want["big"].dtype:
        problems.append(f"big: a {type(got['big']).__name__} of {got['big'].dtype}")
    elif not np.array_equal(np.asarray(got["big"]), np.asarray(want["big"])):
        problems.append("big: other values")
    order = got["order"]
    if type(order) is not np.ndarray or order.dtype != np.int64:
        problems.append(f"order: a {type(order).__name__} of {order.dtype}")
    elif not np.array_equal(order, want["order"]):
        problems.append(f"order: {order.tolist()}")
    key = got["key"]
    if not isinstance(key, jax.Array) or key.dtype != want["key"].dtype:
        problems.append(f"key: a {type(key).__name__} of {key.dtype}")
    elif not np.array_equal(jax.random.key_data(key), jax.random.key_data(want["key"])):
        problems.append("key: other key data")
    return problems


def _w_manager(
    tmp: str, phase: str, hide_persistent: bool = False, kind: str = "per-process"
) -> dict:
    import os

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import distckpt
    from distckpt import _local, _procstate

    p = jax.process_index() if kind == "per-process" else 0  # a global state: one for all

    class Data:
        checkpoint_global = kind == "global"

        def __init__(self):
            self.state, self.received = _pipeline_state(0, p), None

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.received = state

    state, full = _state("fsdp")
    data = Data()
    mgr = distckpt.CheckpointManager(
        f"{tmp}/persistent",
        save_interval_steps=4,
        local_directory=f"{tmp}/local{jax.process_index()}",
        local_save_interval_steps=1,
    )
    if phase == "save":
        for step in range(1, 7):
            state = {**state, "w": state["w"] + 1}
            data.state = _pipeline_state(step, p)
            mgr.save(step, state, pipeline=data)
        mgr.close()
        # What the local save of step 6 gathered from this process: the rest of the
        # state (its arrays are leaves); before, the whole state in JSON.
        kept = _local.load(f"{tmp}/local{jax.process_index()}", 6).extra["process_state"]
        return {
            "persistent": mgr.all_steps(),
            "gathered": len(kept["states"][0 if kind == "global" else p]),
            "json_whole": len(_procstate.capture(data, p)),
        }
    if hide_persistent:  # a restore that read the persistent tier would fail
        if jax.process_index() == 0:
            os.rename(f"{tmp}/persistent", f"{tmp}/hidden")
        multihost_utils.sync_global_devices("hidden")
    try:
        tree = mgr.restore(None, distckpt.abstract_like(state), pipeline=data)
    finally:
        if hide_persistent:
            multihost_utils.sync_global_devices("restored")
            if jax.process_index() == 0:
                os.rename(f"{tmp}/hidden", f"{tmp}/persistent")
    step = mgr.last_restored_step
    exact = all(
        np.array_equal(np.asarray(s.data), (full + step)[s.index])
        for s in tree["w"].addressable_shards
    )
    stats = mgr.last_restore_stats
    mgr.close()
    return {
        "step": step,
        "exact": exact,
        "position": data.received["position"] if data.received else None,
        "state_problems": _state_problems(data.received, _pipeline_state(step, p)),
        "tier": stats.tier,
        "local": stats.local_bytes,
        "peer": stats.peer_bytes,
        "persistent": stats.persistent_bytes,
    }


def test_a_manager_resumes_from_the_local_tier_and_falls_back_to_the_persistent_one(tmp_path):
    saved = _run("_w_manager", tmp_path, phase="save")
    assert saved[0]["persistent"] == [4]
    # Only the rest of each state is gathered; its 4 MB array is a leaf of the step.
    # (Each process receives every process's, padded to the longest.)
    before = len(saved) * max(r["json_whole"] for r in saved)
    after = len(saved) * max(r["gathered"] for r in saved)
    print(f"pipeline state gathered per process: {before} bytes before, {after} now")
    assert after < 2000 < 5_000_000 < before
    # Same hosts restarted: step 6 from the local tier, no persistent byte read; the
    # state's arrays come back as their types, bit-exact.
    back = _run("_w_manager", tmp_path, phase="restore", hide_persistent=True)
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(6, "local", True)] * 2
    assert [r["position"] for r in back] == [600, 601]
    assert [r["state_problems"] for r in back] == [[], []]
    # Host 1 replaced: its blocks, its state's arrays and the rest of its state come
    # from host 0's copies.
    shutil.rmtree(tmp_path / "local1")
    back = _run("_w_manager", tmp_path, phase="restore", hide_persistent=True)
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(6, "local", True)] * 2
    assert [r["position"] for r in back] == [600, 601]
    assert [r["state_problems"] for r in back] == [[], []]
    assert back[1]["local"] == 0 and back[1]["peer"] > 4_000_000 and back[1]["persistent"] == 0


def test_a_damaged_local_copy_is_not_used(tmp_path):
    from distckpt import _local

    _run("_w_manager", tmp_path, phase="save")
    # A flipped byte inside host 0's own block of its state's 1000 x 1000 array.
    step = _local.load(tmp_path / "local0", 6)
    leaf = [s.display for s in step.leaves].index("['__pipeline_state__'][0]")
    (block,) = [b for b in step.blocks if b.leaf == leaf and b.owner == 0]
    blocks = tmp_path / "local0" / "step_6" / "blocks.bin"
    raw = bytearray(blocks.read_bytes())
    raw[block.offset + block.nbytes // 2] ^= 0x20
    blocks.write_bytes(bytes(raw))
    back = _run("_w_manager", tmp_path, phase="restore", hide_persistent=True)
    # Host 0's copy of step 6 fails its checksum: everything it held comes from host 1.
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(6, "local", True)] * 2
    assert back[0]["local"] == 0 and back[0]["peer"] > 4_000_000
    assert [r["position"] for r in back] == [600, 601]
    assert [r["state_problems"] for r in back] == [[], []]


def test_a_damaged_copy_kept_for_a_peer_is_not_read_while_the_peer_has_its_own(tmp_path):
    from distckpt import _local

    # A global state (checkpoint_global): its arrays are values every process keeps.
    _run("_w_manager", tmp_path, phase="save", kind="global")
    step = _local.load(tmp_path / "local0", 6)
    copy = next(b for b in step.blocks if b.owner == 1)  # host 0's copy of a host-1 block
    blocks = tmp_path / "local0" / "step_6" / "blocks.bin"
    raw = bytearray(blocks.read_bytes())
    raw[copy.offset] ^= 0x20
    blocks.write_bytes(bytes(raw))
    back = _run("_w_manager", tmp_path, phase="restore", hide_persistent=True, kind="global")
    # Both hosts have their own blocks: the copies are not needed, so not read. (Process
    # 1 receives only the whole values every process keeps, from process 0: the int64
    # step and the global state's arrays.)
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(6, "local", True)] * 2
    whole = 8 + 1000 * 1000 * 4 + 5 * 8 + 2 * 4
    assert [(r["local"] > 0, r["peer"]) for r in back] == [(True, 0), (True, whole)]
    assert [r["position"] for r in back] == [600, 600]
    assert [r["state_problems"] for r in back] == [[], []]
    # Host 1 lost its directory: now host 0's copies are needed, and checked: step 6 is
    # not covered, so the next older local step (5, whole on host 0) is recovered.
    shutil.rmtree(tmp_path / "local1")
    back = _run("_w_manager", tmp_path, phase="restore", hide_persistent=True, kind="global")
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(5, "local", True)] * 2
    assert [r["position"] for r in back] == [500, 500] and back[1]["peer"] > 0
    assert [r["state_problems"] for r in back] == [[], []]


def test_a_lost_pair_of_hosts_falls_back_to_the_persistent_tier(tmp_path):
    _run("_w_manager", tmp_path, phase="save")
    shutil.rmtree(tmp_path / "local0")
    shutil.rmtree(tmp_path / "local1")
    back = _run("_w_manager", tmp_path, phase="restore")
    assert [(r["step"], r["tier"], r["exact"]) for r in back] == [(4, "persistent", True)] * 2
    assert [r["position"] for r in back] == [400, 401]
    assert [r["state_problems"] for r in back] == [[], []]
    assert all(r["persistent"] > 0 and r["local"] == 0 for r in back)


# --------------------------------------------------------------------------- 4 processes, 2 hosts


def _w_four(tmp: str, phase: str) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from distckpt._localtier import LocalTier

    # Processes 0 and 1 on host a, 2 and 3 on host b. Rows split over "model"; the
    # "data" replicas of a row block are on one host, so they do not count as copies.
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("model", "data"))
    full = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
    x = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("model")), lambda i: full[i])
    tier = LocalTier(f"{tmp}/local{jax.process_index()}", copies=2, keep=2, host=None, timeout_s=30)
    if phase == "save":
        tier.save(1, {"x": x}, extra={})()
        return {}
    got = tier.recover(
        {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)}, newer_than=None
    )
    assert got is not None
    exact = all(
        np.array_equal(np.asarray(s.data), full[s.index]) for s in got[1]["x"].addressable_shards
    )
    return {"step": got[0], "exact": exact, "peer": tier.last_recovery.peer_bytes}


def test_four_processes_on_two_hosts_keep_copies_on_the_other_host(tmp_path):
    env = {p: {"DISTCKPT_HOST": "ab"[p // 2]} for p in range(4)}
    kw = dict(num_processes=4, devices_per_process=1, per_process_env=env, timeout=120)
    run_processes(f"{HERE}:_w_four", args={"tmp": str(tmp_path), "phase": "save"}, **kw)
    shutil.rmtree(tmp_path / "local0")  # host a lost: both its processes' directories
    shutil.rmtree(tmp_path / "local1")
    back = [
        r.value
        for r in run_processes(
            f"{HERE}:_w_four", args={"tmp": str(tmp_path), "phase": "recover"}, **kw
        )
    ]
    assert all(r["step"] == 1 and r["exact"] for r in back), back
    assert back[0]["peer"] > 0 and back[1]["peer"] > 0 and back[2]["peer"] == back[3]["peer"] == 0


def test_a_local_save_keeps_its_values_through_a_donating_step(tmp_path):
    # The local save keeps views of the caller's CPU buffers (as an async save
    # does); a step that donates them right after save() must not change what
    # the local tier holds.
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt
    from tests.recorder import Recorder

    rows = NamedSharding(jax.make_mesh((8,), ("x",)), P("x", None))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state):
        return {"w": state["w"] * 3 + 1}

    def manager():
        return distckpt.CheckpointManager(
            tmp_path / "persistent",
            save_interval_steps=100,
            local_directory=tmp_path / "local",
            local_save_interval_steps=1,
            local_copies=1,
        )

    def pipeline_state(step):  # one process: its state's arrays are values it keeps
        return {
            "big": jnp.arange(6.0) + step,
            "order": np.arange(3) << 40,
            "key": jax.random.key(step),
            "name": "run",
        }

    state = {"w": jax.device_put(jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16), rows)}
    saved = {}
    mgr = manager()
    for step in (1, 2):
        saved[step] = np.asarray(state["w"]).copy()
        mgr.save(step, state, pipeline=Recorder(pipeline_state(step)))
        state = train_step(state)  # donates the buffers the local save just took
    mgr.close()
    back = manager()
    data = Recorder()
    got = back.restore(None, distckpt.abstract_like(state), pipeline=data)
    stats = back.last_restore_stats
    assert stats.tier == "local" and back.last_restored_step == 2
    state_bytes = 6 * 4 + 3 * 8 + 2 * 4  # the state's arrays, read with the tree's blocks
    assert stats.local_bytes == saved[2].nbytes + state_bytes and stats.peer_bytes == 0
    np.testing.assert_array_equal(np.asarray(got["w"]), saved[2])
    want = pipeline_state(2)
    assert isinstance(data.received["big"], jax.Array) and data.received["name"] == "run"
    assert data.received["big"].tolist() == want["big"].tolist()
    assert type(data.received["order"]) is np.ndarray and data.received["order"].dtype == np.int64
    assert data.received["order"].tolist() == want["order"].tolist()
    key = jax.random.key_data(data.received["key"])
    np.testing.assert_array_equal(key, jax.random.key_data(want["key"]))


def test_a_local_step_whose_pipeline_state_was_json_still_recovers(tmp_path):
    """A local step written before the state's arrays were data (version 1) holds every
    process's state whole in JSON, its arrays base64 inside: it recovers as it did."""
    import json

    import jax
    import numpy as np
    import pytest

    import distckpt
    from distckpt import _local, _manifest, _procstate
    from distckpt.errors import TreeMismatchError
    from tests.recorder import Recorder

    def manager():
        return distckpt.CheckpointManager(
            tmp_path / "persistent",
            save_interval_steps=100,
            local_directory=tmp_path / "local",
            local_copies=1,
        )

    with manager() as mgr:
        mgr.save(1, {"w": np.arange(3.0)})
        # Saved without pipeline=: asking for a state is an error, as in the persistent tier.
        none = Recorder({"data_source_repr": "Range(4)"})
        with pytest.raises(TreeMismatchError, match="the step holds no pipeline state"):
            mgr.restore(None, {"w": np.empty(3)}, pipeline=none)
        assert none.received is None and mgr.last_restored_step is None
    # The step as that code wrote it: the same files, every state in the record.
    old = {"data_source_repr": "Range(4)", "order": np.arange(4) << 40, "key": jax.random.key(1)}
    path = tmp_path / "local" / "step_1" / _local.DESCRIPTION
    doc = json.loads(path.read_bytes())
    doc.pop("manifest_crc32c")
    assert doc["version"] == 1
    del doc["extra"]["process_state"]
    doc["extra"]["pipeline_states"] = [_procstate.capture(Recorder(old), 0).decode()]
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))
    back = Recorder({"data_source_repr": "Range(4)"})
    with manager() as mgr:
        tree = mgr.restore(None, {"w": np.empty(3)}, pipeline=back)
        assert mgr.last_restore_stats.tier == "local" and tree["w"].tolist() == [0.0, 1.0, 2.0]
        got = back.received
        assert got["order"].dtype == np.int64 and got["order"].tolist() == (old["order"]).tolist()
        assert np.array_equal(jax.random.key_data(got["key"]), jax.random.key_data(old["key"]))
        other = Recorder({"data_source_repr": "Range(5)"})
        with pytest.raises(TreeMismatchError, match="data_source_repr"):
            mgr.restore(None, {"w": np.empty(3)}, pipeline=other)
        assert other.received is None


def _w_collective_with_a_deadline() -> dict:
    import time

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from distckpt import _multihost
    from distckpt.errors import BarrierTimeoutError

    def gather() -> np.ndarray:
        return np.asarray(multihost_utils.process_allgather(np.arange(4) + jax.process_index()))

    if jax.process_index() == 1:
        time.sleep(6)  # late: process 0 gives up first, then this joins its pending gather
        return {"late": gather().tolist()}
    start = time.monotonic()
    try:
        _multihost.bounded(gather, timeout_s=1.5, what="a test gather")
    except BarrierTimeoutError as e:
        return {"error": str(e), "waited": time.monotonic() - start}
    return {"error": None}


def test_a_collective_that_a_process_does_not_join_times_out():
    """The local tier's device collectives have the manager's deadline (``_multihost.bounded``)."""
    first, second = (r.value for r in run_processes(f"{HERE}:_w_collective_with_a_deadline"))
    assert first["error"] is not None and 1.5 <= first["waited"] < 5
    assert "a test gather" in first["error"] and "process 0" in first["error"]
    assert "restart" in first["error"]
    assert second["late"] == [[0, 1, 2, 3], [1, 2, 3, 4]]


def _w_shared_directory(tmp: str) -> dict:
    import distckpt

    state, _ = _state("fsdp")
    mgr = distckpt.CheckpointManager(
        f"{tmp}/persistent", save_interval_steps=100, local_directory=f"{tmp}/one_for_all"
    )
    try:
        mgr.save(1, state)
        mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the test reports what was raised
        return {"type": type(e).__name__, "message": str(e)}
    finally:
        mgr.close()
    return {"type": None}


def test_two_processes_given_one_local_directory_are_refused(tmp_path):
    """Their steps would overwrite each other: the first local save says so on every process."""
    back = _run("_w_shared_directory", tmp_path)
    for r in back:
        assert r["type"] == "ProcessFailure", r
        assert "is also process" in r["message"] and "its own" in r["message"], r
    assert not list((tmp_path / "one_for_all").glob("step_*"))
