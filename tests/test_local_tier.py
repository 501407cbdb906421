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
    return {"w": w, "b": b, "step": np.int64(7), "name": "run"}, full


def _w_save(tmp: str, mesh_kind: str, steps: list) -> dict:
    import jax

    from distckpt._localtier import LocalTier

    state, _ = _state(mesh_kind)
    tier = LocalTier(
        f"{tmp}/local{jax.process_index()}", copies=2, keep=2, host=None, timeout_s=30
    )
    for step in steps:
        state = jax.tree.map(lambda x: x + 1 if hasattr(x, "sharding") else x, state)
        tier.save(step, state, extra={"user_metadata": {"step": step}}, pipeline_state=None)
    return {"steps": tier.steps()}


def _w_recover(tmp: str, mesh_kind: str, last: int) -> dict:
    import jax
    import numpy as np

    import distckpt
    from distckpt._localtier import LocalTier

    state, full = _state(mesh_kind)
    tier = LocalTier(
        f"{tmp}/local{jax.process_index()}", copies=2, keep=2, host=None, timeout_s=30
    )
    got = tier.recover(distckpt.abstract_like(state), newer_than=None)
    if got is None:
        return {"step": None}
    step, tree, extra, _ = got
    bump = len([s for s in (1, 2, 3) if s <= last])  # saves so far added 1 each
    exact_w = all(
        np.array_equal(np.asarray(s.data), (full + bump)[s.index]) for s in tree["w"].addressable_shards
    )
    exact_b = all(
        np.array_equal(
            np.asarray(s.data).astype(np.float32), (np.arange(8) + bump)[s.index].astype(np.float32)
        )
        for s in tree["b"].addressable_shards
    )
    stats = tier.last_recovery
    return {
        "step": step,
        "exact": exact_w and exact_b,
        "extra": extra,
        "host_values": [int(tree["step"]), tree["name"]],
        "local": stats.local_bytes,
        "peer": stats.peer_bytes,
    }


def _run(fn, tmp, **kw):
    env = {0: {"DISTCKPT_HOST": "host0"}, 1: {"DISTCKPT_HOST": "host1"}}
    return [
        r.value
        for r in run_processes(
            f"{HERE}:{fn}",
            args={"tmp": str(tmp), **kw},
            devices_per_process=2,
            per_process_env=env,
        )
    ]


def test_fsdp_state_recovers_after_a_host_lost_its_directory(tmp_path):
    saved = _run("_w_save", tmp_path, mesh_kind="fsdp", steps=[1, 2, 3])
    assert [s["steps"] for s in saved] == [[2, 3], [2, 3]]
    whole = _run("_w_recover", tmp_path, mesh_kind="fsdp", last=3)
    assert [r["step"] for r in whole] == [3, 3] and all(r["exact"] for r in whole)
    assert all(r["peer"] == 0 for r in whole)
    shutil.rmtree(Path(tmp_path) / "local1")  # host 1 replaced by a fresh one
    back = _run("_w_recover", tmp_path, mesh_kind="fsdp", last=3)
    assert [r["step"] for r in back] == [3, 3] and all(r["exact"] for r in back), back
    assert back[1]["peer"] > 0 and back[1]["local"] == 0
    assert back[0]["host_values"] == back[1]["host_values"] == [7, "run"]


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
    assert [r["step"] for r in _run("_w_recover", tmp_path, mesh_kind="fsdp", last=1)] == [None, None]
