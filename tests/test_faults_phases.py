"""Fault injection in the phases of a collective save (docs/reliability.md, cases 4, 5, 7, 11-13, 16).

Real ``jax.distributed`` jobs (tests/mp.py). Each job runs many faulty
saves in a row, one fault each (``DISTCKPT_FAULT``), and carries on after
every one: that the job can continue is part of what is tested.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import distckpt
from tests.mp import run_processes

pytestmark = pytest.mark.multiprocess

W = "tests._fault_workers"
TIMEOUT_S = 3.0
SLACK_S = 6.0  # a loaded 2-core machine

# Issue phase -> our fault point. save() has three phases, prepare, write and
# commit; "plan" is prepare (flatten, describe, preflight, attempt), the
# report is published at the end of write, and the "final barrier" is the
# read barrier after the commit phase's status barrier.
BEFORE_COMMIT = {
    "plan-p0": "save.prepare:raise@0",
    "plan-p1": "save.prepare:raise@1",
    "write-p0": "write.chunk:raise@0",
    "write-p1": "write.chunk:raise@1",
    "report-p0": "save.report:raise@0",
    "report-p1": "save.report:raise@1",
    "commit-p0": "save.commit:raise@0",
    "rename-p0": "commit.rename:raise@0",
    # Case 7 across processes: EIO once, never retried in place.
    "fsync-eio-p1": "write.fsync:eio@1*1",
    "rename-eio-p0": "commit.rename:eio@0*1",
    # Case 6 across processes: a full disk on one process is typed everywhere.
    "enospc-p1": "write.chunk:enospc@1",
}
# Faults on a process that has nothing left to do when the primary commits:
# the outcome is decided without it, so the checkpoint is committed.
AFTER_COMMIT = {
    "commit-p1": "save.commit:raise@1",
    "final-p0": "save.final:raise@0",
    "final-p1": "save.final:raise@1",
}


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    cases = [[k, v] for k, v in {**BEFORE_COMMIT, **AFTER_COMMIT}.items()]
    results = run_processes(
        f"{W}:phase_faults", 2, 2, args={"root": str(root), "cases": cases, "timeout_s": TIMEOUT_S}
    )
    return root, [r.value for r in results]


def _victim(fault: str) -> int:
    return int(fault.split("@")[1].split("*")[0])


@pytest.mark.parametrize("case", list(BEFORE_COMMIT))
def test_an_exception_in_a_phase_is_raised_on_every_process(phase_run, case):
    root, seen = phase_run
    k = _victim(BEFORE_COMMIT[case])
    errors = [s[case] for s in seen]
    for e in errors:
        assert e["type"] == ("OutOfSpaceError" if "enospc" in case else "ProcessFailure"), e
        assert e["processes"] == [k], e
        assert f"process {k}: " in e["message"]
        if "eio" in case:
            assert "OSError: [Errno 5]" in e["message"]
        elif "enospc" in case:
            assert f"out of space on process {k}" in e["message"]
        else:
            assert "InjectedFault" in e["message"]
    assert errors[0]["message"] == errors[1]["message"]  # the same error, everywhere
    directory = root / case
    assert not distckpt.is_committed(directory)
    # The primary removed the failed attempt; a fresh attempt is never reused.
    leftovers = os.listdir(directory) if directory.exists() else []
    assert leftovers == [], leftovers


def test_a_fault_after_the_commit_point_leaves_a_complete_checkpoint(phase_run):
    root, seen = phase_run
    # A non-primary failing in the commit phase: every process raises, naming
    # it, but the primary had already committed (docs/protocol.md: "a save that
    # raises in the commit phase may still have committed").
    for s in seen:
        assert s["commit-p1"]["type"] == "ProcessFailure" and s["commit-p1"]["processes"] == [1]
    # A fault at the final read barrier: the outcome was read by everyone;
    # the failing process raises its own error, the others return normally
    # after waiting at most timeout_s for it.
    for case in ("final-p0", "final-p1"):
        k = _victim(AFTER_COMMIT[case])
        assert seen[k][case]["type"] == "InjectedFault", seen[k][case]
        other = seen[1 - k][case]
        assert other["type"] is None and other["seconds"] < TIMEOUT_S + SLACK_S, other
    for case in AFTER_COMMIT:
        distckpt.verify(root / case)
        assert sorted(os.listdir(root / case))[-1] == "manifest.json"


def test_the_job_continues_and_a_tree_mismatch_lists_everything(phase_run):
    root, seen = phase_run
    distckpt.verify(root / "after")  # saved after all those failures
    for s in seen:
        e = s["mismatch"]
        assert e["type"] == "TreeMismatchError", e
        assert e["processes"] == [0, 1]
        problems = e["problems"]
        assert len(problems) == 6, problems
        text = "\n".join(problems)
        for expected in (
            "['weights']: in the target but not in the checkpoint",
            "['extra']: in the target but not in the checkpoint",
            "['w']: in the checkpoint (float32[32, 16]) but not in the target",
            "['step']: in the checkpoint",
            "['b']: target shape (8,), checkpoint has float32[16]",
            "['n']: target dtype float32, checkpoint has int32[]",
        ):
            assert expected in text, text
    assert seen[0]["mismatch"]["message"] == seen[1]["mismatch"]["message"]


@pytest.mark.slow
def test_a_stalled_or_frozen_process_is_named_within_the_timeout(tmp_path):
    """Cases 5 and 16: a process stalls (sleep) or is frozen (SIGSTOP) before a barrier."""
    timeout_s = 2.0
    cases = [
        # name, fault, process to thaw with SIGCONT afterwards
        ["stall-p1", f"save.write.barrier:stall={timeout_s + 3}@1", None],
        ["sigstop-p1", "save.write.barrier:stop@1", 1],
        ["stall-p0-commit", f"commit.rename:stall={timeout_s + 2}@0", None],
    ]
    results = run_processes(
        f"{W}:stall_then_continue",
        2,
        2,
        args={"root": str(tmp_path), "cases": cases, "timeout_s": timeout_s},
        # A frozen process sends no heartbeats; keep JAX from declaring it dead
        # before distckpt's own timeout fires.
        heartbeat_timeout_s=20,
        timeout=90,
    )
    seen = [r.value for r in results]
    for case in ("stall-p1", "sigstop-p1"):
        waiting = seen[0][case]
        assert waiting["type"] == "BarrierTimeoutError" and waiting["missing"] == [1], waiting
        assert "processes [1] did not arrive" in waiting["message"]
        assert timeout_s - 0.5 < waiting["seconds"] < timeout_s + SLACK_S, waiting
        # The late process fails too once it gets there (JAX fails the barrier for it).
        assert seen[1][case]["type"] == "BarrierTimeoutError", seen[1][case]
        assert not distckpt.is_committed(tmp_path / case)
    # The primary stalls in the commit phase, past the others' timeout: they
    # raise, naming it; the primary then commits and raises too. The result
    # is a complete checkpoint (never a partial one) that is_committed() reports.
    waiting = seen[1]["stall-p0-commit"]
    assert waiting["type"] == "BarrierTimeoutError" and waiting["missing"] == [0], waiting
    assert seen[0]["stall-p0-commit"]["type"] == "BarrierTimeoutError"  # late at the barrier
    assert distckpt.is_committed(tmp_path / "stall-p0-commit")
    distckpt.verify(tmp_path / "stall-p0-commit")
    # Training and checkpointing went on afterwards (the worker saved and restored).
    distckpt.verify(tmp_path / "after")


def _state_of(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (R, S, T, Z, ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_a_frozen_primary_gets_the_others_aborted_by_jax(tmp_path):
    """Case 16 when the frozen process is the primary: it hosts JAX's
    coordination service, which freezes with it, so no barrier can time out
    and nobody can be named. JAX's heartbeat aborts the others instead
    (SIGABRT) within about heartbeat_timeout_s; nothing is committed."""
    markers = tmp_path / "markers"
    markers.mkdir()
    heartbeat_s = 5
    seen = {}

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not (markers / "pid1").exists() or not (markers / "pid0").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        pid0, pid1 = (int((markers / f"pid{i}").read_text()) for i in (0, 1))
        while _state_of(pid0) != "T" and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["stopped"] = time.monotonic()
        while _state_of(pid1) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["others_gone"] = time.monotonic()
        os.kill(pid0, signal.SIGKILL)  # the frozen primary never wakes up

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = run_processes(
        f"{W}:freeze_in_save",
        2,
        2,
        args={
            "directory": str(tmp_path / "c"),
            "marker_dir": str(markers),
            "fault": "save.write.barrier:stop@0",
            "timeout_s": 2.0,
        },
        heartbeat_timeout_s=heartbeat_s,
        check=False,
        timeout=80,
    )
    watcher.join(5)
    assert results[0].returncode == -signal.SIGKILL
    assert results[1].returncode == -signal.SIGABRT, results[1].stderr[-2000:]
    waited = seen["others_gone"] - seen["stopped"]
    assert waited < 2 * heartbeat_s + SLACK_S, f"the others went down {waited:.1f} s later"
    assert not distckpt.is_committed(tmp_path / "c")


def test_async_save_in_flight_and_a_background_error(tmp_path):
    """Case 13."""
    results = run_processes(
        f"{W}:async_faults", 2, 2, args={"directory": str(tmp_path), "timeout_s": 20}
    )
    for r in results:
        out = r.value
        assert out["second_save_waited_s"] > 0.5, out  # it waited for the first
        assert out["step1_committed_then"], out
        (error,) = out["errors"]  # raised once, by the next save() only
        assert error["type"] == "ProcessFailure" and error["processes"] == [1], error
        assert "InjectedFault" in error["message"]
        assert out["steps"] == [1, 2, 4, 5]
    # The failed step left no data: at most its empty directory, which the
    # next manager removes at start-up.
    leftover = tmp_path / "step_00000003"
    assert not distckpt.is_committed(leftover)
    assert not leftover.exists() or not any(leftover.iterdir())
    for s in (1, 2, 4, 5):
        distckpt.verify(tmp_path / f"step_{s:08d}")


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
def test_two_jobs_saving_into_one_directory(tmp_path, overwrite):
    """Case 12: job B stalls before its commit while job A saves and commits.

    Before the fix, A's commit deleted B's attempt as a leftover and B then
    committed a manifest naming deleted data: a checkpoint with no data.
    """
    directory = tmp_path / "c"
    seen = {}

    def job(name: str, env: dict) -> None:
        seen[name] = run_processes(
            f"{W}:concurrent_job",
            1,
            2,
            args={"directory": str(directory), "job": name, "overwrite": overwrite},
            env=env,
            timeout=60,
        )[0].value

    # B stalls between its write barrier and its commit.
    b = threading.Thread(target=job, args=("B", {"DISTCKPT_FAULT": "save.commit:stall=8"}))
    a = threading.Thread(target=job, args=("A", {}))
    b.start()
    a.start()
    a.join()
    b.join()
    assert seen["A"]["type"] is None, seen["A"]
    if overwrite:
        assert seen["B"]["type"] is None, seen["B"]  # both committed, B last
        winner = "B"
    else:
        assert seen["B"]["type"] == "CheckpointExistsError", seen["B"]
        assert "another job saved there" in seen["B"]["message"]
        winner = "A"
    distckpt.verify(directory)
    out = distckpt.restore(directory)
    assert out["job"] == winner
    # Nothing of the loser's data is left, and nothing of the winner's is missing.
    assert len([e for e in os.listdir(directory) if e.startswith("attempt-")]) == 1
