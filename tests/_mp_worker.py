"""Entry point of one worker process launched by :func:`tests.mp.run_processes`.

Usage: ``python -m tests._mp_worker SPEC.json``. The spec file, written by the
parent, names the target function, its kwargs, this process's id, the
coordinator port, device count, timeouts and where to write the result.

Exit codes: 0 after the target returned and its result was written; 1 if
anything raised (traceback on stderr); the code of ``sys.exit()`` if the target
called it. All paths leave through ``os._exit`` so that neither an atexit
handler nor JAX's shutdown barrier can keep a process alive after its outcome
is known.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import signal
import sys
import traceback


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the harness process dies.

    Workers run in sessions of their own so that the harness can kill each
    one's whole process group; the flip side is that nothing takes them down
    if the harness itself is killed (CI cancelling the job, say) before its
    cleanup runs. PR_SET_PDEATHSIG closes that gap on Linux.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # from <linux/prctl.h>
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # it died before prctl took effect
        _exit(1)


def _configure_cpu_devices(num_devices: int) -> None:
    """Force ``num_devices`` fake CPU devices; must run before jax is imported."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(num_devices)
    # Keep any other XLA flags the caller passed, but replace a device count
    # inherited from the parent (conftest sets 8 for single-process tests).
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def _to_jsonable(obj):
    # numpy / jax scalars and arrays: convert to plain Python values.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"worker return value of type {type(obj).__name__} is not JSON-serialisable")


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(spec: dict) -> None:
    _configure_cpu_devices(spec["devices_per_process"])

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port = spec["port"]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        # Default is [::]:port (all interfaces); loopback is all we need and
        # is the address free_port() probed.
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=spec["num_processes"],
        process_id=spec["process_id"],
        initialization_timeout=spec["initialization_timeout_s"],
        heartbeat_timeout_seconds=spec["heartbeat_timeout_s"],
        shutdown_timeout_seconds=spec["shutdown_timeout_s"],
    )

    module_name, _, func_name = spec["target"].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    value = func(**spec["args"])
    _write_atomically(spec["result_path"], json.dumps(value, default=_to_jsonable))

    # Shutdown waits at a barrier for every peer. If a peer died or hangs,
    # JAX aborts this process from a background thread (SIGABRT) once the
    # heartbeat or shutdown timeout expires; that cannot be caught. An
    # exception can be, and must not turn a returned result into a failure:
    # the culprit's own exit code reports the problem.
    try:
        jax.distributed.shutdown()
    except Exception:
        print("[mp-worker] jax.distributed.shutdown() failed:", file=sys.stderr)
        traceback.print_exc()


def main() -> None:
    # On SIGUSR1 dump every thread's Python stack to stderr: the parent sends
    # it before killing a worker that ran past the deadline, so the failure
    # report shows where it hung.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    _die_with_parent(spec["parent_pid"])
    try:
        _run(spec)
    except SystemExit as e:
        # The target called sys.exit(): honour an integer code as os._exit would.
        if isinstance(e.code, int) or e.code is None:
            _exit(e.code or 0)
        print(e.code, file=sys.stderr)
        _exit(1)
    except BaseException:
        print(f"[mp-worker] process {spec['process_id']} failed:", file=sys.stderr)
        traceback.print_exc()
        _exit(1)
    _exit(0)


if __name__ == "__main__":
    main()
