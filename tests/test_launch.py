"""`distckpt launch`, `distckpt.initialize()` and slurm/train.sbatch, with real processes."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distckpt

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "distckpt.cli", "launch"]
WORKER = [sys.executable, "-m", "tests._launch_worker"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DISTCKPT_", "JAX_"))}
    env.pop("XLA_FLAGS", None)
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _records(out: str) -> dict[str, dict]:
    recs = {}
    for line in out.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("{"):
            recs[prefix] = json.loads(rest)
    return recs


def _launch(*args: str) -> subprocess.CompletedProcess:
    """``distckpt launch ARGS`` run to completion (90 s at most), output captured."""
    return subprocess.run(
        [*LAUNCH, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=90
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_forms_one_job_and_prefixes_output(tmp_path):
    r = _launch("-n", "2", "-d", "2", "--", *WORKER, "save", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(r.stdout)
    assert set(recs) == {"[p0]", "[p1]"}
    for p, rec in enumerate([recs["[p0]"], recs["[p1]"]]):
        assert rec == {**rec, "found": "explicit", "process": p, "count": 2, "devices": 4}
    assert r.stdout.count("saved and restored") == 2
    assert distckpt.metadata(tmp_path / "c").process_count == 2


def test_the_first_failure_stops_the_others_and_is_the_exit_code(tmp_path):
    began = time.monotonic()
    r = _launch("-n", "3", "--grace", "3", "--", *WORKER, "fail", str(tmp_path))
    assert r.returncode == 1, r.stderr[-3000:]
    assert time.monotonic() - began < 60  # not the 120 s the others would sleep
    assert "RuntimeError: process 1 fails now" in r.stderr
    assert "process 1 exited with 1; stopping the others" in r.stderr
    for rec in _records(r.stdout).values():
        assert _gone(rec["pid"]), rec  # no orphans


def test_sigterm_reaches_every_process_which_save_together(tmp_path):
    proc = subprocess.Popen(
        [*LAUNCH, "-n", "2", "--", *WORKER, "preempt", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "training" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == distckpt.PREEMPTED_EXIT_CODE, err[-3000:]
    saved = [line for line in "".join(lines).splitlines() + out.splitlines() if "saved at" in line]
    assert len(saved) == 2 and len({s.split()[-1] for s in saved}) == 1  # the same step
    step = int(saved[0].split()[-1])
    assert distckpt.CheckpointManager(tmp_path).all_steps() == [step]


def test_initialize_without_a_cluster_does_nothing(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "DISTCKPT_COORD", "JAX_COORDINATOR", "OMPI_", "KUBERNETES_")):
            monkeypatch.delenv(name)
    assert distckpt.initialize() == "single process"


def _slurm_job_id() -> str:
    """A job id whose port (JAX: id % 4096 + 61440) is free here."""
    for _ in range(100):
        job = random.randrange(10_000, 10_000_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", job % 4096 + 61440))
            except OSError:
                continue
        return str(job)
    raise RuntimeError("no free port in JAX's SLURM range")


def _sbatch(tmp_path: Path, steps: int, **extra: str) -> subprocess.Popen:
    env = _env(
        PATH=f"{ROOT / 'tests' / 'fake_slurm'}:{os.environ['PATH']}",
        SLURM_JOB_ID=_slurm_job_id(),
        SLURM_JOB_NAME="rehearsal",
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="127.0.0.1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        TRAIN=f"{sys.executable} examples/train_mlp.py --batch 64 --save-every 10",
        STEPS=str(steps),
        CKPT_DIR=str(tmp_path / "ckpt"),
        LOG_DIR=str(tmp_path / "logs"),
        FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"),
        **extra,
    )
    return subprocess.Popen(
        ["bash", "slurm/train.sbatch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_job(job: subprocess.Popen) -> None:
    """The batch shell, srun and every task: one process group."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def test_the_sbatch_script_forms_one_job_is_preempted_requeues_and_resumes(tmp_path):
    job = _sbatch(tmp_path, steps=100_000)
    try:
        deadline = time.monotonic() + 120
        task_log = None
        while time.monotonic() < deadline:
            logs = sorted((tmp_path / "logs").glob("rehearsal-*-task0.out"))
            if logs and "step   30" in logs[0].read_text():
                task_log = logs[0]
                break
            time.sleep(0.5)
        assert task_log is not None, job.stdout.read() if job.poll() is not None else "no progress"
        # SLURM's --signal=USR1@120 signals every task of the step.
        pids = subprocess.run(
            ["pgrep", "-f", "--", f"--dir {tmp_path / 'ckpt'}"], capture_output=True, text=True
        ).stdout.split()
        cmdlines = {int(p): Path(f"/proc/{p}/cmdline").read_text() for p in pids}
        tasks = [p for p, c in cmdlines.items() if "train_mlp.py" in c and "srun" not in c]
        assert len(tasks) == 2, pids
        for pid in tasks:
            os.kill(pid, signal.SIGUSR1)
        out, _ = job.communicate(timeout=120)
    finally:
        _kill_job(job)
    assert job.returncode == 0, out
    assert "requeueing job" in out
    assert "scontrol requeue" in (tmp_path / "scontrol.log").read_text()
    mgr = distckpt.CheckpointManager(tmp_path / "ckpt")
    saved = mgr.latest_step()
    assert saved is not None and saved >= 30
    assert distckpt.metadata(mgr.path(saved)).process_count == 2  # the two tasks were one job
    # The requeued job resumes there and runs to the end.
    rerun = _sbatch(tmp_path, steps=saved + 10)
    try:
        out, _ = rerun.communicate(timeout=180)
    finally:
        _kill_job(rerun)
    assert rerun.returncode == 0, out
    text = (tmp_path / "logs").glob("rehearsal-*-task0.out")
    assert any(f"resumed from step {saved}" in p.read_text() for p in text)
    assert distckpt.CheckpointManager(tmp_path / "ckpt").latest_step() == saved + 10
