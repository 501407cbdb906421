"""Fault injection: processes killed mid-save, and preemption (docs/reliability.md, cases 1-3, 15).

Real ``jax.distributed`` jobs (tests/mp.py); the victim kills itself with
SIGKILL at a point named by ``DISTCKPT_FAULT``. After each run the test
looks at the disk, then restarts the job, which must resume from the last
committed step, save the next one and leave no leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import distckpt
from tests.mp import case_value, run_processes

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

W = "tests._fault_workers"
TIMEOUT_S = 3.0
HEARTBEAT_S = 5  # tests/mp.py default heartbeat_timeout_s and shutdown_timeout_s
# Survivors must be gone this long after the fault: their barrier timeout or
# JAX's heartbeat, then the shutdown timeout, plus slack for a loaded 2-core box.
EXIT_BOUND_S = TIMEOUT_S + 2 * HEARTBEAT_S + 12

# case -> (fault, victim, committed): does the interrupted step survive?
KILLS = {
    "non-primary-writing-shards": ("write.chunk:kill@1", 1, False),
    "primary-writing-shards": ("write.chunk:kill@0", 0, False),
    "primary-before-rename": ("commit.rename:kill@0", 0, False),
    "primary-after-rename": ("commit.renamed:kill@0", 0, True),
}


def _last_json(text: str, key: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and key in line:
            return json.loads(line)
    return None


def _step_dirs(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _check_the_killed_job(case: str, directory: Path) -> None:
    """Runs ``case``'s job, killed mid-save, and checks it and the disk it left."""
    fault, victim, committed = KILLS[case]
    results = run_processes(
        f"{W}:kill_during_save",
        2,
        2,
        args={"directory": str(directory), "fault": fault, "at_step": 2, "timeout_s": TIMEOUT_S},
        check=False,
        timeout=90,
    )
    ended = time.time()
    assert results[victim].returncode == -signal.SIGKILL, results[victim].stderr[-3000:]
    armed = _last_json(results[victim].stdout, "armed")["armed"]
    assert ended - armed < EXIT_BOUND_S, f"survivors exited {ended - armed:.1f} s after the fault"
    survivor = results[1 - victim]
    # The survivor never believes the save worked: it raised, or JAX aborted it.
    assert survivor.returncode != 0 or (survivor.value or {}).get("type"), survivor.stdout

    step1, step2 = directory / "step_00000001", directory / "step_00000002"
    distckpt.verify(step1)
    assert distckpt.is_committed(step2) == committed
    if committed:  # killed right after the rename: the step is complete
        distckpt.verify(step2)
    elif step2.exists():  # killed before the commit point: leftovers at most
        assert all(e.startswith(("attempt-", ".")) for e in os.listdir(step2)), os.listdir(step2)


@pytest.fixture(scope="module")
def kills(tmp_path_factory) -> tuple[Path, dict, list]:
    """Every case's killed job, checked at once (a failure is kept for the case's test);
    then one restarted job resumes every case's directory in turn (tests/mp.py:each_case)."""
    root = tmp_path_factory.mktemp("kills")
    failures: dict[str, BaseException | None] = {}
    for case in KILLS:
        try:
            _check_the_killed_job(case, root / case)
            failures[case] = None
        except Exception as e:  # noqa: BLE001 - raised again by the case's test
            failures[case] = e
    cases = {
        case: [
            f"{W}:resume",
            {
                "directory": str(root / case),
                "expect": 2 if committed else 1,
                "next_step": 3,
                "timeout_s": 20,
            },
        ]
        for case, (_, _, committed) in KILLS.items()
    }
    return root, failures, run_processes("tests.mp:each_case", 2, 2, args={"cases": cases})


# The killed jobs and the restarted one are shared by the cases (tests/conftest.py
# runs this module on one xdist worker), in the first case's set-up (hence its
# time limit: five jobs).
@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_during_save(kills, case):
    _, _, committed = KILLS[case]
    root, failures, again_jobs = kills
    directory = root / case
    if failures[case] is not None:  # the killed job, or the disk it left, is not as it must be
        raise failures[case]

    # Restart (one job for every case, in `kills`): resume from the last committed
    # step, save the next one.
    expect = 2 if committed else 1
    again = [case_value(r, case) for r in again_jobs]
    assert again[0]["latest"] == expect
    steps = list(range(1, expect + 1)) + [3]
    assert again[0]["steps"] == steps
    # Stale temporary data is gone: every step dir holds its manifest and one attempt.
    assert _step_dirs(directory) == [f"step_{s:08d}" for s in steps]
    for s in steps:
        entries = sorted(os.listdir(directory / f"step_{s:08d}"))
        assert len(entries) == 2 and entries[0].startswith("attempt-"), entries
        assert entries[1] == "manifest.json"
        distckpt.verify(directory / f"step_{s:08d}")


def test_sigterm_saves_everywhere_at_one_step_and_the_rerun_resumes_there(tmp_path):
    """Case 15: SIGTERM (sent from outside) to one process during training."""
    directory, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    sent = {}

    def preempt() -> None:
        deadline = time.monotonic() + 80
        while not (markers / "ready").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        pid = int((markers / "pid1").read_text())
        os.kill(pid, signal.SIGTERM)  # what SLURM or a maintenance event sends
        sent["at"] = time.time()

    sender = threading.Thread(target=preempt, daemon=True)
    sender.start()
    results = run_processes(
        f"{W}:train_until_preempted",
        2,
        2,
        args={"directory": str(directory), "marker_dir": str(markers), "timeout_s": 20},
        check=False,
        timeout=90,
    )
    sender.join(5)
    assert "at" in sent
    codes = [r.returncode for r in results]
    assert codes == [distckpt.PREEMPTED_EXIT_CODE] * 2, [r.stderr[-2000:] for r in results]
    steps = {_last_json(r.stdout, "preempted_at")["preempted_at"] for r in results}
    assert len(steps) == 1, steps  # every process saved at the same step
    (step,) = steps
    assert step >= 6
    distckpt.verify(directory / f"step_{step:08d}")

    again = run_processes(
        f"{W}:resume",
        2,
        2,
        args={"directory": str(directory), "expect": step, "next_step": step + 1, "timeout_s": 20},
    )
    assert again[0].value["latest"] == step and again[1].value["latest"] == step
    assert again[0].value["steps"][-2:] == [step, step + 1]
