"""Run one test function on N local processes forming a single JAX job.

Each worker is ``python -m tests._mp_worker`` with its own fake CPU devices;
the workers join one job through ``jax.distributed.initialize`` on
127.0.0.1, and cross-process collectives run over gloo. Typical use::

    def _worker_roundtrip(tmp: str) -> int:  # runs on every process
        ...
        return jax.process_index()

    @pytest.mark.multiprocess
    def test_roundtrip(tmp_path):
        results = run_processes("tests.test_x:_worker_roundtrip", args={"tmp": str(tmp_path)})
        assert [r.value for r in results] == [0, 1]

The group shares fate and never hangs: with ``check=True`` the first worker
to fail gets the others killed after a short grace period, and a deadline
bounds the whole run. Every worker runs in its own session and its process
group is SIGKILLed on the way out, whatever happened; should the harness
itself be killed, the kernel kills the workers (Linux PR_SET_PDEATHSIG).

JAX itself also shares fate, independently of this module: once a process
dies, its peers are aborted (SIGABRT, returncode -6) by JAX's coordination
service within about ``heartbeat_timeout_s``, or within about a second if the
dead one was process 0, which hosts the coordinator. A process whose function
returned waits in ``jax.distributed.shutdown()`` for the others for up to
``shutdown_timeout_s``, after which all processes are aborted -- so with the
defaults, processes must finish within ~5 s of each other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["WorkerResult", "case_value", "each_case", "free_port", "process_info", "run_processes"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# After the first failure (check=True), how long the others get to exit on
# their own -- enough to flush their own error messages -- before being killed.
FAILURE_GRACE_S = 2.0
# After SIGUSR1 (stack dump request), how long to wait before SIGKILL.
STACK_DUMP_WAIT_S = 0.5
POLL_INTERVAL_S = 0.05
TAIL_CHARS = 6000
# free_port() can race with other tests grabbing the same port; process 0
# then fails to start the coordinator and we start over on a new port.
PORT_ATTEMPTS = 3
# What process 0 logs when the coordinator's gRPC server cannot bind. jaxlib
# then raises "Failed to start RPC server" or, sometimes, segfaults -- so the
# parent looks at the log rather than at the exit code.
_BIND_FAILURE_MARKERS = ("Failed to add port to server", "Failed to start RPC server")


@dataclass
class WorkerResult:
    process_id: int
    returncode: int | None  # None if we had to kill it after the deadline
    stdout: str
    stderr: str
    value: Any  # JSON-decoded return value of the worker function; None if it did not return


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)`` of the calling worker."""
    import jax

    return jax.process_index(), jax.process_count()


def each_case(cases: dict[str, list]) -> dict[str, dict]:
    """Worker side: runs several cases in one job, one after the other.

    ``cases`` maps a case's name to ``[target, kwargs]`` ("module.path:function"
    and its arguments); the target must be one every process calls with its
    case's arguments. Returns ``{name: {"value": ...}}``, or ``{name: {"error":
    traceback}}`` for a case that raised, so that the job goes on to the next
    case and a failure is reported for its own case (:func:`case_value`).
    Launch it as ``run_processes("tests.mp:each_case", args={"cases": ...})``.
    """
    import importlib
    import traceback

    out = {}
    for name, (target, kwargs) in cases.items():
        module_name, _, func_name = target.partition(":")
        func = getattr(importlib.import_module(module_name), func_name)
        try:
            value = func(**kwargs)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
        else:
            # Converted now, as the worker would convert a lone return value.
            out[name] = {"value": json.loads(json.dumps(value, default=_jsonable))}
    return out


def case_value(result: WorkerResult, name: str) -> Any:
    """What case ``name`` of :func:`each_case` returned on ``result``'s process.

    Raises AssertionError naming the case and the process, with the
    traceback, if the case raised there.
    """
    outcome = result.value[name]
    if "error" in outcome:
        raise AssertionError(
            f"case {name!r} raised on process {result.process_id}:\n{outcome['error']}"
        )
    return outcome["value"]


def cases_in_directories(module: str, workers: tuple[str, ...], root: Path, **run: Any):
    """Runs each ``module:worker`` as a case of one job (:func:`each_case`), each called
    with ``tmp``, a directory of its own (``root/worker``); ``run``: for
    :func:`run_processes`. Returns ``case(worker)``: that directory and the case's value
    on every process, in order (AssertionError naming the case if it raised anywhere)."""
    cases = {w: [f"{module}:{w}", {"tmp": str(root / w)}] for w in workers}
    for w in workers:
        (root / w).mkdir()
    results = run_processes("tests.mp:each_case", args={"cases": cases}, **run)

    def case(worker: str) -> tuple[Path, list]:
        return root / worker, [case_value(r, worker) for r in results]

    return case


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"case value of type {type(obj).__name__} is not JSON-serialisable")


def run_processes(
    target: str,
    num_processes: int = 2,
    devices_per_process: int = 4,
    *,
    args: dict | None = None,
    timeout: float = 90.0,
    check: bool = True,
    env: dict[str, str] | None = None,
    per_process_env: dict[int, dict[str, str]] | None = None,
    heartbeat_timeout_s: int = 5,
    shutdown_timeout_s: int = 5,
    initialization_timeout_s: int = 30,
) -> list[WorkerResult]:
    """Run ``target`` ("module.path:function") on ``num_processes`` workers.

    The function is called as ``func(**args)`` on every process after
    ``jax.distributed.initialize``; its return value must be JSON-serialisable
    (numpy/jax arrays and scalars are converted with ``.tolist()``).

    Returns one :class:`WorkerResult` per process, ordered by process id.
    With ``check=True`` raises AssertionError if any worker exits non-zero
    (the others are killed ``FAILURE_GRACE_S`` later); the message holds each
    failing worker's stderr tail, including its Python traceback. With
    ``check=False`` workers are left to finish (or be aborted by JAX) on their
    own. Either way, if workers are still running ``timeout`` seconds after
    the start, their Python stacks are dumped to their stderr, all are killed
    and AssertionError is raised naming them.
    """
    if ":" not in target:
        raise ValueError(f"target must look like 'module.path:function', got {target!r}")
    deadline = time.monotonic() + timeout
    workdir = Path(tempfile.mkdtemp(prefix="distckpt-mp-"))
    try:
        for attempt in range(PORT_ATTEMPTS):
            attempt_dir = workdir / f"attempt{attempt}"
            attempt_dir.mkdir()
            group = _Group(
                attempt_dir,
                target,
                num_processes,
                devices_per_process,
                args=args or {},
                env=env or {},
                per_process_env=per_process_env or {},
                heartbeat_timeout_s=heartbeat_timeout_s,
                shutdown_timeout_s=shutdown_timeout_s,
                initialization_timeout_s=initialization_timeout_s,
            )
            group.run(deadline, check=check)
            if not group.port_in_use:
                break
        results = group.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if group.timed_out:
        raise AssertionError(
            _report(
                results,
                group,
                f"{target}: timed out after {timeout:g}s; processes {group.timed_out} were "
                "still running and have been killed (their Python stacks are dumped in "
                "stderr below)",
                # The hung ones first, then any that failed on the way.
                order=group.timed_out + [r.process_id for r in results if r.returncode],
            )
        )
    failed = [r.process_id for r in results if r.returncode and r.process_id not in group.killed]
    if check and failed:
        headline = f"{target}: processes {failed} failed"
        if group.killed:
            headline += f"; processes {group.killed} were then killed {FAILURE_GRACE_S:g}s later"
        raise AssertionError(_report(results, group, headline, order=failed + group.killed))
    return results


@dataclass
class _Group:
    """One launch of all workers, in its own directory."""

    workdir: Path
    target: str
    num_processes: int
    devices_per_process: int
    args: dict
    env: dict[str, str]
    per_process_env: dict[int, dict[str, str]]
    heartbeat_timeout_s: int
    shutdown_timeout_s: int
    initialization_timeout_s: int

    procs: list[subprocess.Popen] = field(default_factory=list)
    timed_out: list[int] = field(default_factory=list)  # killed by us at the deadline
    killed: list[int] = field(default_factory=list)  # killed by us after a peer failed
    port_in_use: bool = False
    returned: set[int] = field(default_factory=set)  # ids whose function returned
    _bind_failed: bool | None = field(default=None, init=False)  # None: not looked yet

    def _path(self, kind: str, i: int) -> Path:
        return self.workdir / f"{kind}{i}"

    def run(self, deadline: float, *, check: bool) -> None:
        port = free_port()
        out_files = []
        try:
            for i in range(self.num_processes):
                # Files, not pipes: a chatty worker can never block on a full
                # pipe while we are busy polling another one.
                stdout = open(self._path("stdout", i), "wb")
                out_files.append(stdout)
                stderr = open(self._path("stderr", i), "wb")
                out_files.append(stderr)
                self.procs.append(self._start(i, port, stdout, stderr))
            self._watch(deadline, check)
        finally:
            # Also reached on KeyboardInterrupt, pytest-timeout or any error
            # above: never leave a worker behind.
            for p in self.procs:
                _kill_group(p)
            for p in self.procs:
                p.wait()
            for f in out_files:
                f.close()

    def _start(self, i: int, port: int, stdout, stderr) -> subprocess.Popen:
        spec = {
            "target": self.target,
            "args": self.args,
            "process_id": i,
            "num_processes": self.num_processes,
            "devices_per_process": self.devices_per_process,
            "port": port,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "shutdown_timeout_s": self.shutdown_timeout_s,
            "initialization_timeout_s": self.initialization_timeout_s,
            "result_path": str(self._path("result", i)),
            "parent_pid": os.getpid(),
        }
        spec_path = self._path("spec", i)
        spec_path.write_text(json.dumps(spec))

        env = {**os.environ, **self.env, **self.per_process_env.get(i, {})}
        # The repo root comes first so `tests._mp_worker` and the target resolve.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONUNBUFFERED"] = "1"  # output survives a SIGKILL
        return subprocess.Popen(
            [sys.executable, "-m", "tests._mp_worker", str(spec_path)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )

    def _watch(self, deadline: float, check: bool) -> None:
        """Poll until all workers exit, or it is time to kill the rest."""
        kill_at = None  # set when the first worker fails (check=True)
        while True:
            running = [i for i, p in enumerate(self.procs) if p.poll() is None]
            if self.procs[0].returncode and self._coordinator_bind_failed():
                self.port_in_use = True
                return
            if not running:
                return
            now = time.monotonic()
            if kill_at is None and check and any(p.returncode for p in self.procs):
                kill_at = now + FAILURE_GRACE_S
            if kill_at is not None and now >= kill_at:
                self.killed = running
                return
            if now >= deadline:
                self.timed_out = running
                for i in running:
                    _kill_group(self.procs[i], signal.SIGUSR1)
                time.sleep(STACK_DUMP_WAIT_S)
                return
            time.sleep(POLL_INTERVAL_S)

    def _coordinator_bind_failed(self) -> bool:
        if self._bind_failed is None:  # process 0 has exited: read its log once
            log = self._path("stderr", 0).read_text(errors="replace")
            self._bind_failed = any(m in log for m in _BIND_FAILURE_MARKERS)
        return self._bind_failed

    def collect(self) -> list[WorkerResult]:
        results = []
        for i, p in enumerate(self.procs):
            result_path = self._path("result", i)
            if result_path.exists():  # written only once the function returned
                self.returned.add(i)
            results.append(
                WorkerResult(
                    process_id=i,
                    returncode=None if i in self.timed_out else p.returncode,
                    stdout=self._path("stdout", i).read_text(errors="replace"),
                    stderr=self._path("stderr", i).read_text(errors="replace"),
                    value=json.loads(result_path.read_text()) if i in self.returned else None,
                )
            )
        return results


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    # start_new_session=True made the worker the leader of a process group
    # whose id is its pid, so this also reaches anything it spawned.
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _describe(r: WorkerResult, returned: bool) -> str:
    if r.returncode is None:
        state = "still running at the deadline"
    elif r.returncode < 0:
        try:
            state = f"killed by {signal.Signals(-r.returncode).name} (returncode {r.returncode})"
        except ValueError:
            state = f"killed by signal {-r.returncode}"
    else:
        state = f"exit code {r.returncode}"
    if returned:
        # Typically stuck in, or aborted from, jax.distributed.shutdown()
        # because a peer never got there.
        state += "; its function had returned"
    return state


def _tail(text: str, limit: int = TAIL_CHARS) -> str:
    if len(text) <= limit:
        return text
    return "[...]\n" + text[-limit:]


def _report(results: list[WorkerResult], group: _Group, headline: str, order: list[int]) -> str:
    parts = [headline]
    for i in dict.fromkeys(order):  # dedupe, keep order
        r = results[i]
        parts.append(f"\n===== process {i}: {_describe(r, i in group.returned)} =====")
        if r.stdout.strip():
            parts.append(f"--- stdout (tail) ---\n{_tail(r.stdout)}")
        parts.append(f"--- stderr (tail) ---\n{_tail(r.stderr)}")
    return "\n".join(parts)
