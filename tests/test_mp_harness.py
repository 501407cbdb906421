"""Tests of the multi-process harness in tests/mp.py.

The ``_worker_*`` functions run inside the worker processes (after
``jax.distributed.initialize``); the ``test_*`` functions run in pytest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tests.mp
from tests.mp import run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_mp_harness"


def _alive(pid: int) -> bool:
    """Whether pid names a live process (zombies count as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # Field 3, after the parenthesised command name, is the state.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _record_pid(pid_dir: str, name: str, pid: int | None = None) -> None:
    Path(pid_dir, name).write_text(str(pid or os.getpid()))


# --- (1) a real cross-process collective ----------------------------------


def _worker_global_sum(n: int) -> dict:
    assert jax.process_count() == 2
    assert jax.device_count() == 8
    assert len(jax.local_devices()) == 4

    mesh = Mesh(np.array(jax.devices()), ("x",))
    data = np.arange(n, dtype=np.int32)
    # Each process materialises only the shards on its own devices.
    arr = jax.make_array_from_callback((n,), NamedSharding(mesh, P("x")), lambda idx: data[idx])
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
    local = sum(int(s.data.sum()) for s in arr.addressable_shards)
    return {
        "process_index": jax.process_index(),
        "num_local_shards": len(arr.addressable_shards),
        "local_sum": local,
        "global_sum": total,  # a replicated jax scalar: converted via .tolist()
        "mark": os.environ.get("MP_TEST_MARK"),
    }


def test_two_processes_run_a_collective():
    n = 64
    start = time.monotonic()
    results = run_processes(
        f"{HERE}:_worker_global_sum",
        num_processes=2,
        devices_per_process=4,
        args={"n": n},
        per_process_env={1: {"MP_TEST_MARK": "one"}},
    )
    elapsed = time.monotonic() - start

    assert [r.returncode for r in results] == [0, 0]
    values = [r.value for r in results]
    assert [v["process_index"] for v in values] == [0, 1]
    assert [v["num_local_shards"] for v in values] == [4, 4]
    expected = n * (n - 1) // 2
    # Each process holds only half the data, yet both get the global sum.
    assert values[0]["local_sum"] + values[1]["local_sum"] == expected
    assert values[0]["local_sum"] != expected
    assert [v["global_sum"] for v in values] == [expected, expected]
    assert [v["mark"] for v in values] == [None, "one"]
    assert elapsed < 30


# --- (2) an exception on one process ----------------------------------------


def _worker_raise_on_1() -> str:
    if jax.process_index() == 1:
        raise ValueError("deliberate failure on process 1")
    return "ok"


def test_exception_reported_without_check():
    start = time.monotonic()
    results = run_processes(f"{HERE}:_worker_raise_on_1", check=False)
    elapsed = time.monotonic() - start

    assert results[1].returncode == 1
    assert results[1].value is None
    assert "ValueError: deliberate failure on process 1" in results[1].stderr
    # Process 0 returned; JAX may then abort it in shutdown (its peer is gone),
    # but its result was already recorded.
    assert results[0].value == "ok"
    assert elapsed < 30


def test_exception_raises_with_check():
    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        run_processes(f"{HERE}:_worker_raise_on_1")
    elapsed = time.monotonic() - start

    message = str(excinfo.value)
    assert "processes [1] failed" in message
    assert "Traceback (most recent call last)" in message
    assert "_worker_raise_on_1" in message
    assert "ValueError: deliberate failure on process 1" in message
    # The survivor is killed after the grace period, not left to JAX's timeouts.
    assert elapsed < 15


# --- (3) a hang --------------------------------------------------------------


def _worker_hang_on_1(pid_dir: str) -> None:
    _record_pid(pid_dir, f"worker{jax.process_index()}")
    if jax.process_index() == 1:
        # A grandchild too: it must die with the worker's process group.
        child = subprocess.Popen(["sleep", "600"])
        _record_pid(pid_dir, "grandchild", child.pid)
        while True:
            time.sleep(1)


def test_hang_hits_deadline_and_leaves_no_process(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        run_processes(
            f"{HERE}:_worker_hang_on_1",
            args={"pid_dir": str(tmp_path)},
            timeout=10,
            # Keep JAX's own fate-sharing (which would abort both processes
            # once process 0 has waited shutdown_timeout_s in shutdown) from
            # ending the hang before our deadline does.
            shutdown_timeout_s=60,
            heartbeat_timeout_s=60,
        )
    elapsed = time.monotonic() - start

    message = str(excinfo.value)
    assert "timed out after 10s" in message
    assert "process 1: still running at the deadline" in message
    # The stack dump taken before the kill shows where it hung.
    assert "in _worker_hang_on_1" in message
    assert 10 <= elapsed < 20

    pids = {p.name: int(p.read_text()) for p in tmp_path.iterdir()}
    assert set(pids) == {"worker0", "worker1", "grandchild"}
    # The grandchild is reparented when its worker dies and reaped by its new
    # parent shortly after, so allow it a moment.
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if _alive(pid)]


# --- (4) a process killed by a signal ----------------------------------------


def _worker_sigkill_on_1() -> None:
    if jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    # The survivor blocks in a collective that needs the dead peer.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("never completes")


def test_sigkilled_peer_takes_the_survivor_down():
    start = time.monotonic()
    results = run_processes(f"{HERE}:_worker_sigkill_on_1", check=False)
    elapsed = time.monotonic() - start

    assert results[1].returncode == -signal.SIGKILL
    # JAX notices the missing heartbeats and aborts the survivor (SIGABRT),
    # or a blocked call raises first (exit 1). Either way it does not hang.
    assert results[0].returncode in (1, -signal.SIGABRT), results[0].stderr[-3000:]
    assert elapsed < 30


# --- (5) the coordinator port was taken meanwhile ----------------------------


def _worker_process_info() -> list[int]:
    return list(tests.mp.process_info())


def test_retries_when_coordinator_port_is_taken(monkeypatch):
    handed_out = []

    def fake_free_port() -> int:
        # First the squatter's port, then genuinely free ones.
        handed_out.append(squatter.getsockname()[1] if not handed_out else real_free_port())
        return handed_out[-1]

    real_free_port = tests.mp.free_port
    monkeypatch.setattr(tests.mp, "free_port", fake_free_port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        results = run_processes(f"{HERE}:_worker_process_info", timeout=60)

    assert len(handed_out) == 2  # one failed attempt, one retry
    assert [r.value for r in results] == [[0, 2], [1, 2]]


# --- (6) several cases in one job -------------------------------------------


def _case_double(x: int):
    return np.arange(3) * x  # numpy: converted like a worker's return value


def _case_fail(x: int):
    raise ValueError(f"case failed with {x}")


def test_each_case_reports_every_case_on_its_own():
    # each_case is what a worker runs; called here directly, it needs no job.
    cases = {
        "first": [f"{HERE}:_case_double", {"x": 2}],
        "broken": [f"{HERE}:_case_fail", {"x": 7}],
        "after": [f"{HERE}:_case_double", {"x": 3}],  # still runs after a failure
    }
    value = json.loads(json.dumps(tests.mp.each_case(cases)))
    result = tests.mp.WorkerResult(1, 0, "", "", value)
    assert tests.mp.case_value(result, "first") == [0, 2, 4]
    assert tests.mp.case_value(result, "after") == [0, 3, 6]
    with pytest.raises(AssertionError) as excinfo:
        tests.mp.case_value(result, "broken")
    message = str(excinfo.value)
    assert "case 'broken' raised on process 1" in message
    assert "ValueError: case failed with 7" in message and "_case_fail" in message


def test_the_shared_job_modules_exist():
    # tests/conftest.py keeps each of these modules on one xdist worker; a name
    # that no longer matches a module would silently split its jobs again.
    from tests.conftest import SHARED_JOB_MODULES

    root = Path(__file__).resolve().parent.parent
    assert SHARED_JOB_MODULES and all((root / m).is_file() for m in SHARED_JOB_MODULES)
