"""Run one command as N local processes of one JAX job: ``distckpt launch``.

Each process gets the environment ``distckpt.initialize()`` (and plain
``jax.distributed.initialize()``) reads: a coordinator on 127.0.0.1 and a
free port, the process count and its id, K CPU devices, gloo collectives.
Output lines are prefixed with the process id. SIGINT, SIGTERM, SIGUSR1
and SIGUSR2 are forwarded to every process. The first process to exit
non-zero makes the launcher stop the others (SIGTERM, then SIGKILL after a
grace period) and exit with that code, so a failure never leaves orphans;
the processes also die if the launcher itself is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from distckpt import _cluster
from distckpt.manager import PREEMPTED_EXIT_CODE

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    process: int, num_processes: int, devices: int, port: int, base: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of local process ``process`` of ``num_processes``."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
    env.update(
        {
            _cluster.ENV_COORDINATOR: f"127.0.0.1:{port}",
            _cluster.ENV_NUM_PROCESSES: str(num_processes),
            _cluster.ENV_PROCESS_ID: str(process),
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(num_processes),
            "JAX_PROCESS_ID": str(process),
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(devices),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


def _pump(stream: IO[bytes], prefix: bytes, out: IO[bytes], lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    stream.close()


def run(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int = 1,
    *,
    grace_s: float = GRACE_S,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
) -> int:
    """Runs ``command`` as ``num_processes`` local processes; returns the job's exit code.

    0 if all exit 0; else the exit code of the first to fail (128 + the
    signal number for one killed by a signal, as a shell reports it).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("need at least one process and one device per process")
    if not command:
        raise ValueError("no command to run")
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    port, lock = free_port(), threading.Lock()
    width = len(str(num_processes - 1))
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for p in range(num_processes):
        proc = subprocess.Popen(
            list(command),
            env=process_env(p, num_processes, devices_per_process, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        procs.append(proc)
        prefix = f"[p{p:0{width}d}] ".encode()
        for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
            t = threading.Thread(target=_pump, args=(stream, prefix, sink, lock), daemon=True)
            t.start()
            pumps.append(t)

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = _wait(procs, grace_s, err, lock)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)
    return code


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _wait(procs: list[subprocess.Popen], grace_s: float, err: IO[bytes], lock) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            first, code = failed[0]
            if code == PREEMPTED_EXIT_CODE:
                # A preempted job saved together and is exiting together: let it.
                _wait_all(procs, grace_s)
            with lock:
                err.write(
                    f"distckpt launch: process {first} exited with {_exit_code(code)}; "
                    "stopping the others\n".encode()
                )
                err.flush()
            _stop(procs, grace_s)
            return _exit_code(code)
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.05)


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
