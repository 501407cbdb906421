"""CheckpointManager with real local processes forming one JAX job."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.mp import case_value, run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_manager_mp"


def _setup():
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state):
        return {"w": state["w"] + state["n"].astype(jnp.float32), "n": state["n"] + 1}

    def fresh():
        w = jax.make_array_from_callback((32, 16), sharding, lambda i: jnp.zeros((32, 16))[i])
        return {"w": w, "n": jnp.array(0)}

    target = {
        "w": jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=sharding),
        "n": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
    }
    return train_step, fresh, target


def _w_async(directory: str) -> list:
    import numpy as np

    import distckpt

    train_step, fresh, target = _setup()
    state = fresh()
    with distckpt.CheckpointManager(directory, max_to_keep=3, timeout_s=30) as mgr:
        for step in range(1, 9):
            state = train_step(state)
            mgr.save(step, state, metrics={"step": step})
    kept = mgr.all_steps()
    for step in kept:
        out = mgr.restore(step, target)
        # w after k steps is 0 + 0 + 1 + ... + (k - 1).
        expected = step * (step - 1) / 2
        for shard in out["w"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected)
        assert int(out["n"]) == step
    return kept


# _w_async, then _w_background_error, run one after the other in one 2 x 4 job
# (tests/mp.py:each_case); their tests read their own results (tests/conftest.py
# runs this module on one xdist worker, so the job runs once).


@pytest.fixture(scope="module")
def one_job(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("manager_mp")
    cases = {}
    for w in ("_w_async", "_w_background_error"):
        (root / w).mkdir()
        cases[w] = [f"{HERE}:{w}", {"directory": str(root / w)}]
    return root, run_processes("tests.mp:each_case", 2, 4, args={"cases": cases})


def test_async_saves_on_two_processes(one_job):
    root, results = one_job
    assert [case_value(r, "_w_async") for r in results] == [[6, 7, 8], [6, 7, 8]]
    assert sorted(os.listdir(root / "_w_async")) == [
        "step_00000006",
        "step_00000007",
        "step_00000008",
    ]


def _w_background_error(directory: str) -> dict:
    import jax

    import distckpt
    from distckpt import _storage

    train_step, fresh, _ = _setup()
    state = train_step(fresh())
    mgr = distckpt.CheckpointManager(directory, timeout_s=20)
    mgr.save(1, state)
    mgr.wait_until_finished()
    if jax.process_index() == 1:
        from tests.faults import fail_once

        failure = OSError(28, "injected: no space left")
        _storage.PosixStorage.writer = fail_once(_storage.PosixStorage.writer, failure)
    mgr.save(2, state)
    seen = None
    try:
        mgr.save(3, state)
    except distckpt.errors.DistckptError as e:
        seen = {"type": type(e).__name__, "processes": e.processes, "message": str(e)}
    mgr.save(3, state)
    mgr.close()
    return {"error": seen, "steps": mgr.all_steps()}


def test_background_error_surfaces_on_every_process(one_job):
    _, results = one_job
    for value in (case_value(r, "_w_background_error") for r in results):
        assert value["error"]["type"] == "OutOfSpaceError", value  # a full disk is typed
        assert value["error"]["processes"] == [1]
        assert "injected: no space left" in value["error"]["message"]
        assert value["steps"] == [1, 3]


def _w_preempt(directory: str, sig: str = "SIGTERM") -> None:
    import sys
    import time

    import jax

    import distckpt

    train_step, fresh, _ = _setup()
    state = fresh()
    if sig == "SIGUSR1":
        distckpt.forward_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@120
    mgr = distckpt.CheckpointManager(directory, save_interval_steps=1000, timeout_s=20)
    for step in range(1, 200):
        state = train_step(state)
        if step == 5 and jax.process_index() == 1:
            os.kill(
                os.getpid(), getattr(signal, sig)
            )  # what SLURM or a TPU maintenance event sends
        if mgr.reached_preemption(step):
            mgr.wait_until_finished()
            mgr.save(step, state, force=True, blocking=True)
            mgr.close()
            print(json.dumps({"preempted_at": step}), flush=True)
            sys.exit(distckpt.PREEMPTED_EXIT_CODE)
        time.sleep(0.05)  # a training step takes time; the notice needs a moment to spread
    raise AssertionError("never reached the preemption sync point")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_notice_on_one_process_stops_all_at_the_same_step(tmp_path, sig):
    import distckpt

    results = run_processes(
        f"{HERE}:_w_preempt", 2, 4, args={"directory": str(tmp_path), "sig": sig}, check=False
    )
    assert [r.returncode for r in results] == [distckpt.PREEMPTED_EXIT_CODE] * 2, [
        r.stderr[-2000:] for r in results
    ]
    steps = {json.loads(r.stdout.strip().splitlines()[-1])["preempted_at"] for r in results}
    assert len(steps) == 1, steps
    (step,) = steps
    assert step >= 5
    assert distckpt.CheckpointManager(tmp_path).latest_step() == step


def _w_crash_then_resume(directory: str, crash: bool) -> int | None:
    import jax

    import distckpt
    from distckpt import _storage

    train_step, fresh, target = _setup()
    mgr = distckpt.CheckpointManager(directory, async_save=False, timeout_s=20)
    if not crash:
        step = mgr.latest_step()
        out = mgr.restore(step, target)
        assert int(out["n"]) == step
        return step
    state = fresh()
    for step in range(1, 5):
        state = train_step(state)
        if step == 4 and jax.process_index() == 1:
            _storage.PosixStorage.finish_attempt_writes = lambda *a: os.kill(
                os.getpid(), signal.SIGKILL
            )
        mgr.save(step, state)
    return None


def test_restart_after_a_kill_resumes_from_the_last_committed_step(tmp_path):
    results = run_processes(
        f"{HERE}:_w_crash_then_resume",
        2,
        4,
        args={"directory": str(tmp_path), "crash": True},
        check=False,
    )
    assert results[1].returncode == -signal.SIGKILL and results[0].returncode != 0
    assert "step_00000004" in os.listdir(tmp_path)  # the interrupted save's leftovers
    results = run_processes(
        f"{HERE}:_w_crash_then_resume", 2, 4, args={"directory": str(tmp_path), "crash": False}
    )
    assert [r.value for r in results] == [3, 3]
    assert "step_00000004" not in os.listdir(tmp_path)  # cleaned at start-up


def _w_shadowed_sigterm(directory: str) -> list[str]:
    import warnings

    import distckpt

    signal.signal(signal.SIGTERM, lambda *a: None)  # replaces JAX's notifier
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distckpt.CheckpointManager(directory, timeout_s=20)
    return [str(w.message) for w in caught]


def test_a_python_sigterm_handler_is_flagged(tmp_path):
    results = run_processes(f"{HERE}:_w_shadowed_sigterm", 2, 1, args={"directory": str(tmp_path)})
    for r in results:
        assert any("replaces JAX's preemption notifier" in m for m in r.value), r.value
