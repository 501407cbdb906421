"""Collective calls whose processes ask for different things fail on every process.

Real processes: every case here is one where each process, looking only at
its own arguments, would have gone on and returned data (or committed) that
mixes what several processes asked for.
"""

from __future__ import annotations

import os

import pytest

from tests.mp import cases_in_directories, run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_agreement"


def _state(value: float):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    w = jax.make_array_from_callback((8,), sharding, lambda i: jnp.full((8,), value)[i])
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
    return {"w": w}, target


def _gathered(array) -> list[float]:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True).tolist()


# Four cases run one after the other in one 2 x 2 job (tests/mp.py:each_case):
# in each, the processes disagree and the job goes on. Their tests read the
# results (tests/conftest.py runs this module on one xdist worker, so the job
# runs once).
ONE_JOB_CASES = (
    "_w_restore_per_process_path",
    "_w_save_per_process_path",
    "_w_manager_per_process_metrics",
    "_w_delete_per_process_step",
)


@pytest.fixture(scope="module")
def one_job(tmp_path_factory):
    """``case(worker)``: that case's directory and its values on processes 0 and 1."""
    root = tmp_path_factory.mktemp("agreement")
    return cases_in_directories(HERE, ONE_JOB_CASES, root, devices_per_process=2, timeout=150)


def _w_restore_per_process_path(tmp: str) -> dict:
    import os

    import jax

    import distckpt
    from distckpt.errors import InconsistentProcessesError

    one, target = _state(1.0)
    two, _ = _state(2.0)
    distckpt.save(f"{tmp}/a", one)
    distckpt.save(f"{tmp}/b", two)
    if jax.process_index() == 0:
        os.symlink(f"{tmp}/a", f"{tmp}/also_a")
    distckpt.save(f"{tmp}/sync", {"n": 0})  # a collective: the symlink exists from here on

    # The same commit record through two spellings of its path is fine.
    same = distckpt.restore(f"{tmp}/a" if jax.process_index() == 0 else f"{tmp}/also_a", target)
    out = {"same": _gathered(same["w"])}
    mine = f"{tmp}/a" if jax.process_index() == 0 else f"{tmp}/b"
    try:
        distckpt.restore(mine, target)
    except InconsistentProcessesError as e:
        out["error"] = str(e)
        out["is_value_error"] = isinstance(e, ValueError)
    return out


def test_processes_restoring_different_checkpoints_fail_on_every_process(one_job):
    tmp_path, values = one_job("_w_restore_per_process_path")
    for value in values:
        assert value["same"] == [1.0] * 8
        assert value["is_value_error"]
        message = value["error"]
        assert "processes [0]" in message and "processes [1]" in message
        assert f"{tmp_path}/a" in message and f"{tmp_path}/b" in message
    assert values[0]["error"] == values[1]["error"]


def _w_save_per_process_path(tmp: str) -> dict:
    import jax

    import distckpt
    from distckpt.errors import InconsistentProcessesError

    state, _ = _state(1.0)
    try:
        distckpt.save(f"{tmp}/p{jax.process_index()}", state)
    except InconsistentProcessesError as e:
        return {"error": str(e)}
    return {"error": None}


def test_processes_saving_to_different_paths_fail_on_every_process(one_job):
    import distckpt

    tmp_path, values = one_job("_w_save_per_process_path")
    for value in values:
        assert value["error"] and "named different checkpoints" in value["error"]
    assert not distckpt.is_committed(tmp_path / "p0")
    assert not distckpt.is_committed(tmp_path / "p1")


def _w_manager_per_process_metrics(tmp: str) -> dict:
    import jax

    import distckpt

    pid = jax.process_index()
    _, target = _state(0.0)
    # Each process "evaluates" its own shard: the loss differs per process,
    # and the two disagree on which step is best.
    losses = {1: [0.5, 0.1], 2: [0.2, 0.9], 3: [0.7, 0.8], 4: [0.9, 0.95]}
    with distckpt.CheckpointManager(
        tmp, best_metric="loss", keep_best=1, max_to_keep=1, timeout_s=30
    ) as mgr:
        for step in range(1, 5):
            state, _ = _state(float(step))
            mgr.save(step, state, metrics={"loss": losses[step][pid]})
        mgr.wait_until_finished()
        best = mgr.best_step()
        restored = mgr.restore(best, target)
        seen = {
            "steps": mgr.all_steps(),
            "best": best,
            "metrics": mgr.metrics(best),
            "values": _gathered(restored["w"]),
        }
    reopened = distckpt.CheckpointManager(tmp, best_metric="loss", timeout_s=30)
    seen["reopened_best"] = reopened.best_step()
    reopened.close()
    return seen


def test_a_manager_ranks_by_the_primary_s_metrics_on_every_process(one_job):
    _, values = one_job("_w_manager_per_process_metrics")
    # Process 0's losses: 0.5, 0.2, 0.7, 0.9 -> step 2 is best; kept: best + latest.
    for value in values:
        assert value["steps"] == [2, 4]
        assert value["best"] == 2
        assert value["reopened_best"] == 2
        assert value["metrics"] == {"loss": 0.2}
        assert value["values"] == [2.0] * 8


def _w_delete_per_process_step(tmp: str) -> dict:
    import jax

    import distckpt
    from distckpt.errors import InconsistentProcessesError

    with distckpt.CheckpointManager(tmp, timeout_s=30) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(float(step))[0])
        mgr.wait_until_finished()
        try:
            mgr.delete(1 + jax.process_index())
        except InconsistentProcessesError as e:
            error = str(e)
        mgr.delete(2)
        return {"error": error, "steps": mgr.all_steps()}


def test_deleting_different_steps_deletes_nothing(one_job):
    tmp_path, values = one_job("_w_delete_per_process_step")
    for value in values:
        assert "named different steps" in value["error"]
        assert value["steps"] == [1, 3]
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000003"]


def _w_coordination_reads(tmp: str) -> dict:
    from jax._src.distributed import global_state

    import distckpt

    class Counting:
        """The coordination client, recording what this process asks of it."""

        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def __getattr__(self, name):
            method = getattr(self.inner, name)

            def call(*args, **kwargs):
                self.calls.append((name, args[0]))
                return method(*args, **kwargs)

            return call

    state, target = _state(1.0)
    distckpt.save(f"{tmp}/warm", state)  # imports and first-call costs out of the way
    counting = Counting(global_state.client)
    global_state.client = counting
    try:
        distckpt.save(f"{tmp}/c", state)
        saved = len(counting.calls)
        distckpt.restore(f"{tmp}/c", target)
    finally:
        global_state.client = counting.inner
    return {"save": counting.calls[:saved], "restore": counting.calls[saved:]}


def _by_phase(calls: list[list[str]]) -> dict[str, list[str]]:
    """Each call's method, by the phase it belongs to.

    Keys and barriers are named ``distckpt/<op>/<phase>/...``; a blob's part
    (``distckpt/<op>/blob/...``) belongs to the phase whose barrier follows,
    a call on the whole operation (``distckpt/<op>/``: the primary's listing
    after the write barrier, the final clean-up) to the phase before it.
    """
    named = [(key.split("/") + [""])[2] or None for _, key in calls]
    phases: list[str | None] = []
    for i, phase in enumerate(named):
        if phase == "blob":
            phase = next(p for p in named[i:] if p not in (None, "blob"))
        elif phase is None:
            phase = phases[-1]
        phases.append(phase)
    out: dict[str, list[str]] = {}
    for (method, _), phase in zip(calls, phases, strict=True):
        out.setdefault(phase, []).append(method)
    return out


@pytest.mark.parametrize("processes", [2, 4])
def test_a_phase_costs_at_most_4n_calls_at_the_coordination_service(tmp_path, processes):
    n = processes
    results = run_processes(
        f"{HERE}:_w_coordination_reads",
        n,
        devices_per_process=1,
        args={"tmp": str(tmp_path)},
    )
    phases = [{**_by_phase(r.value["save"]), **_by_phase(r.value["restore"])} for r in results]
    assert all(list(p) == ["prepare", "write", "commit", "restore"] for p in phases), phases
    count = {ph: [len(p[ph]) for p in phases] for ph in phases[0]}
    # What a process asks of the coordination service does not depend on
    # how many processes there are. prepare: increment, barrier, listing of
    # the agreement counters (which also say that no process failed, and
    # hold the primary's payload); the primary also writes its payload.
    assert count["prepare"] == [4] + [3] * (n - 1)
    # write: the report's part and part count, barrier, listing of the
    # failures; the primary's listing is of the whole operation, every
    # report included.
    assert count["write"] == [4] * n
    assert phases[0]["write"].count("key_value_dir_get_bytes") == 1
    # commit: barrier, listing of the failures (with the primary's summary),
    # read barrier; the primary also writes the summary and deletes the
    # operation's keys, and reads no report (it has them all already).
    assert count["commit"] == [5] + [3] * (n - 1)
    assert sorted(phases[0]["commit"]) == sorted(
        ["key_value_set", "wait_at_barrier", "key_value_dir_get"]
        + ["wait_at_barrier", "key_value_delete"]
    )
    # restore: increment, barrier, listing of the counters, read barrier;
    # the one process whose increment completed the count knows that all
    # agree without the listing, which pays for the primary's clean-up.
    restore = count["restore"]
    assert sum(restore) == 4 * n
    assert [p["restore"].count("key_value_dir_get") for p in phases].count(0) == 1
    assert restore[0] in (4, 5) and all(c in (3, 4) for c in restore[1:])
    assert phases[0]["restore"][-1] == "key_value_delete"
    # At most 4N per phase (issue 15), at 2 processes too.
    totals = {ph: sum(c) for ph, c in count.items()}
    assert totals == {"prepare": 3 * n + 1, "write": 4 * n, "commit": 3 * n + 2, "restore": 4 * n}
    # Every listing is of the agreement counters or of the failures (the
    # primary's payload sits in the same directory); the primary's one
    # other listing is of its own operation, for the reports. Nothing reads
    # every process's status, nor waits on a key.
    for r in results:
        calls = r.value["save"] + r.value["restore"]
        listed = [
            key.rstrip("/").rsplit("/", 1)[-1] for m, key in calls if m == "key_value_dir_get"
        ]
        assert set(listed) <= {"agree", "outcome"}, listed
    for p in phases:
        methods = [m for calls in p.values() for m in calls]
        assert "blocking_key_value_get" not in methods and "key_value_try_get" not in methods
        assert "blocking_key_value_get_bytes" not in methods


def _w_without_counters(tmp: str) -> dict:
    import jax
    from jax._src.distributed import global_state

    jax.devices()  # the backend's collectives are built on the real client first

    class NoCounters:
        """A coordination client of a JAX without key_value_increment."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "key_value_increment":
                raise AttributeError(name)
            return getattr(self.inner, name)

    inner = global_state.client
    global_state.client = NoCounters(inner)
    try:
        return _w_restore_per_process_path(tmp)
    finally:
        global_state.client = inner


def test_agreement_without_counters_reads_every_payload_and_still_refuses(tmp_path):
    results = run_processes(
        f"{HERE}:_w_without_counters", args={"tmp": str(tmp_path)}, devices_per_process=2
    )
    for r in results:
        assert r.value["same"] == [1.0] * 8
        assert "read different checkpoints" in r.value["error"]
        assert f"{tmp_path}/a" in r.value["error"] and f"{tmp_path}/b" in r.value["error"]
