"""A multi-host rehearsal: each process in its own network namespace, on a bridge.

Each process gets its own address on a private veth bridge that this test
creates and removes (10.213.x.0/24, used by nothing else); the coordinator
is on process 0's address; the checkpoint directory is shared. The job
saves, restores on a different process count, and then loses one process's
link in the middle of a save: the others must fail within the timeout bound,
naming it, and the previous step must stay intact. Needs root and
`ip netns`; skipped otherwise, with the reason.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distckpt

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 5  # the workers' distckpt timeout_s
SLACK_S = 15


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Hosts:
    """N namespaces h0..hN-1 with veth links to one bridge, all made by this test."""

    def __init__(self, n: int):
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.net = f"10.213.{random.randrange(1, 250)}"
        self.bridge = f"dkb{tag}"
        self.names = [f"dkh{tag}{i}" for i in range(n)]
        self.peers = [f"dkv{tag}{i}" for i in range(n)]
        self.made: list[tuple[str, str]] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "up")
        for i, (ns, peer) in enumerate(zip(self.names, self.peers, strict=True)):
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            _ip("link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.made.append(("link", peer))
            _ip("link", "set", peer, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: the machine's
            # name resolves to the namespace's own address there, which is where the
            # CPU collectives (gloo) of a process in it listen and are reached.
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            self.made.append(("etc", str(etc)))
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n{self.address(i)} {socket.gethostname()}\n"
            )

    def address(self, i: int) -> str:
        return f"{self.net}.{10 + i}"

    def cut(self, i: int) -> None:
        _ip("link", "set", self.peers[i], "down")

    def heal(self) -> None:
        """Every host's link up again (after ``cut``)."""
        for peer in self.peers:
            _ip("link", "set", peer, "up")

    def kill_all(self) -> None:
        for ns in self.names:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        self.kill_all()
        for kind, name in reversed(self.made):
            if kind == "etc":
                shutil.rmtree(name, ignore_errors=True)
            else:
                _ip(kind, "del", name, check=False)

    def run(
        self,
        n: int,
        mode: str,
        directory: Path,
        devices: int,
        env: dict | None = None,
        env_of=None,
    ):
        """Starts ``n`` workers, worker i in namespace i (with ``env`` and ``env_of(i)``
        in its environment); returns the Popen objects."""
        port = random.randrange(20000, 30000)
        procs = []
        for i in range(n):
            worker_env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("JAX_", "DISTCKPT_", "XLA_"))
            }
            worker_env.update(
                PYTHONPATH=str(ROOT),
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                DISTCKPT_COORDINATOR=f"{self.address(0)}:{port}",
                DISTCKPT_NUM_PROCESSES=str(n),
                DISTCKPT_PROCESS_ID=str(i),
                **(env or {}),
                **(env_of(i) if env_of else {}),
            )
            cmd = [
                "ip",
                "netns",
                "exec",
                self.names[i],
                sys.executable,
                "-m",
                "tests._netns_worker",
            ]
            procs.append(
                subprocess.Popen(
                    [*cmd, mode, str(directory)],
                    cwd=ROOT,
                    env=worker_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        return procs


def _first_record(proc) -> dict:
    """The first JSON line a worker prints (the CPU collectives print their own lines)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return {"exited": proc.wait(timeout=30), "stderr": proc.stderr.read()[-3000:]}


def _finish(procs, timeout: float = 90) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    probe = f"dkprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"network namespaces are not available here: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)
    h = None
    try:
        h = Hosts(3)
        yield h
    finally:
        if h is not None:
            h.remove()


@pytest.mark.timeout(240)
def test_save_restore_elsewhere_then_lose_a_host_mid_save(hosts, tmp_path):
    ckpt = tmp_path / "ckpt"
    # Two hosts with 2 devices each save step 1.
    saved = _finish(hosts.run(2, "save", ckpt, devices=2))
    assert [s["count"] for s in saved] == [2, 2]
    assert distckpt.metadata(ckpt / "step_00000001").process_count == 2
    # Three hosts with 1 device each restore it, resharded.
    restored = _finish(hosts.run(3, "restore", ckpt, devices=1))
    assert [(r["restored"], r["ok"], r["count"]) for r in restored] == [(1, True, 3)] * 3
    # Two hosts save step 2; host 1 is held in the write phase and loses its link there.
    procs = hosts.run(2, "cut", ckpt, devices=2, env={"DISTCKPT_FAULT": "save.write:stall=4@1"})
    try:
        line = procs[1].stdout.readline()
        assert '"saving": 2' in line, line + procs[1].stderr.read()[-2000:]
        hosts.cut(1)
        cut_at = time.monotonic()
        stdout, stderr = procs[0].communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - cut_at
    finally:
        hosts.kill_all()
        hosts.heal()
    lines = [json.loads(s) for s in stdout.strip().splitlines() if s.startswith("{")]
    error = next((r for r in lines if "error" in r), None)
    assert error is not None, stdout + stderr[-3000:]
    assert error["error"] == "BarrierTimeoutError" and error["missing"] == [1], error
    assert "processes [1] did not arrive" in error["message"]
    assert took < TIMEOUT_S + SLACK_S, took
    # The previous step is intact; the interrupted one is not committed.
    mgr = distckpt.CheckpointManager(ckpt)
    assert mgr.all_steps() == [1]
    distckpt.verify(ckpt / "step_00000001")


@pytest.mark.timeout(150)
def test_local_tier_recovers_a_killed_host_with_a_wiped_directory(hosts, tmp_path):
    # Three hosts train with the local tier (each block also on another host),
    # host 1 dies and the job is torn down, host 1 comes back with an empty
    # local directory, and the restarted job resumes from the newest local step
    # (3, newer than the shared directory's 2), host 1's blocks and pipeline
    # state coming from its peers' copies through the job's collectives.
    ckpt = tmp_path / "ckpt"
    hosts.heal()  # whatever an earlier test cut

    def env(i: int) -> dict:
        # Namespaces share a hostname: each names its host, as SLURM_NODEID would.
        return {"DISTCKPT_HOST": f"h{i}", "TEST_LOCAL_DIRECTORY": str(tmp_path / f"local{i}")}

    procs = hosts.run(3, "local_train", ckpt, devices=2, env_of=env)
    try:
        trained = [_first_record(p) for p in procs]
    finally:
        hosts.kill_all()  # host 1 is lost; the scheduler ends the whole job
        for p in procs:
            p.wait(timeout=30)
    assert [t.get("trained") for t in trained] == [3, 3, 3], trained
    assert trained[0]["persistent"] == [2]
    shutil.rmtree(tmp_path / "local1")  # the replacement host starts empty
    back = _finish(hosts.run(3, "local_resume", ckpt, devices=2, env_of=env))
    assert [(b["step"], b["exact"], b["tier"]) for b in back] == [(3, True, "local")] * 3, back
    assert [b["position"] for b in back] == [300, 301, 302]
    assert back[1]["peer"] > 0 and back[1]["local"] == 0, back
    assert all(b["persistent"] == 0 for b in back), back
