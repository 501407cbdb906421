"""Test-only fault injection at named points, driven by ``DISTCKPT_FAULT``.

The fault-injection suite runs real processes, so it cannot monkeypatch
them; instead it names, in the environment, where a process should fail::

    DISTCKPT_FAULT="<point>:<action>[@<process>][*<times>][,<more>...]"

``action`` is one of ``raise`` (an ``InjectedFault``), ``kill`` (SIGKILL
to this process), ``stop`` (SIGSTOP), ``stall=<seconds>``, ``eio`` or
``enospc`` (the ``OSError`` a failing disk gives). ``@k`` limits the fault to
process k, ``*n`` to its first n hits in this process. Points are listed in
``POINTS`` and documented in docs/reliability.md. With the variable unset a
hit costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "DISTCKPT_FAULT"

POINTS = (
    # Collective phases of an operation <op> (save, restore, manager,
    # delete): "<op>.<phase>" on entry, before the phase's work;
    # "<op>.<phase>.barrier" after the work, before the phase's barrier;
    # "<op>.final" before the read barrier that ends the operation.
    "save.prepare",
    "save.prepare.barrier",
    "save.write",
    "save.write.barrier",
    "save.commit",
    "save.commit.barrier",
    "save.final",
    "save.report",  # end of the write phase, before this process publishes its report
    "restore.restore",
    "restore.restore.barrier",
    "restore.final",
    "manager.open",
    "manager.open.barrier",
    "manager.scan",
    "manager.scan.barrier",
    "manager.final",
    "delete.agree",
    "delete.agree.barrier",
    "delete.delete",
    "delete.delete.barrier",
    "delete.final",
    # Storage, inside a phase.
    "write.chunk",  # after the first chunk of a data file is written
    "write.fsync",  # before a data file's fsync
    "commit.rename",  # manifest written and fsync'd, before the rename
    "commit.renamed",  # right after the rename, before the directory fsync
    "copy.file",  # distckpt.copy: after each data file is written at the destination
)


class InjectedFault(RuntimeError):
    """The error the ``raise`` action throws."""


_hits: dict[str, int] = {}


def hit(point: str) -> None:
    """Fails here if ``DISTCKPT_FAULT`` names ``point`` for this process."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        name, _, rest = entry.strip().partition(":")
        if name not in POINTS:  # a misspelt point would silently never fire
            raise ValueError(
                f"{ENV} names the fault point {name!r}, which does not exist; the points are: "
                + ", ".join(POINTS)
            )
        if name != point:
            continue
        action, times, process = _parse(rest)
        if process is not None and process != _process_index():
            continue
        key = f"{name}:{rest}"
        _hits[key] = _hits.get(key, 0) + 1
        if times is not None and _hits[key] > times:
            continue
        _act(point, action)


def reset() -> None:
    """Forgets the hit counts (``*<times>``), so that a test starts afresh."""
    _hits.clear()


def _parse(rest: str) -> tuple[str, int | None, int | None]:
    times = process = None
    if "*" in rest:
        rest, n = rest.rsplit("*", 1)
        times = int(n)
    if "@" in rest:
        rest, p = rest.rsplit("@", 1)
        process = int(p)
    return rest, times, process


def _process_index() -> int:
    import jax

    return jax.process_index()


def _act(point: str, action: str) -> None:
    where = f"injected fault at {point} on process {_process_index()}"
    if action == "raise":
        raise InjectedFault(where)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action.startswith("stall="):
        time.sleep(float(action.split("=", 1)[1]))
        return
    if action == "eio":
        raise OSError(errno.EIO, f"Input/output error ({where})")
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device ({where})")
    raise ValueError(f"{ENV}: unknown action {action!r} for point {point!r}")
