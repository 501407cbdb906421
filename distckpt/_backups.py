"""Background copies of selected committed steps to a second location (primary only)."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading

from distckpt import _location
from distckpt._layout import step_name
from distckpt._location import Location

log = logging.getLogger("distckpt")


@dataclasses.dataclass(frozen=True)
class BackupPolicy:
    """Which committed steps go to ``to`` (a path, ``s3://``, ``gs://`` or a kvstore spec).

    Every K-th step with ``every_n_steps=K``, each new best with ``best``,
    both if both are given, every step if neither is; nothing without ``to``.
    """

    to: Location | None = None
    every_n_steps: int | None = None
    best: bool = False

    def __post_init__(self) -> None:
        n = self.every_n_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"backup_every_n_steps must be a positive int or None, got {n!r}")
        if self.to is None and (n is not None or self.best):
            raise ValueError(
                "backup_every_n_steps= and backup_best= need backup_to= (where to copy steps)"
            )

    def wants(self, step: int, is_best: bool) -> bool:
        if self.to is None:
            return False
        if self.every_n_steps is None and not self.best:
            return True
        return (self.every_n_steps is not None and step % self.every_n_steps == 0) or (
            self.best and is_best
        )


class Backups:
    """Copies selected committed steps to a second location, one at a time, in the background.

    Runs on the primary process only (``distckpt.copy`` is a one-process
    operation); a failed backup is logged and kept in ``errors``, never raised
    into the training loop.
    """

    def __init__(self, policy: BackupPolicy, directory: str):
        self.policy, self.directory = policy, directory
        self.errors: list[str] = []
        self._queue: queue.Queue[tuple[int, Location]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._pending: set[int] = set()  # steps submitted and not yet copied
        self._copied = threading.Condition()

    def submit(self, step: int, path: Location) -> None:
        if self._worker is None:  # one thread: one copy at a time, in step order
            self._worker = threading.Thread(target=self._run, name="distckpt-backup", daemon=True)
            self._worker.start()
        with self._copied:
            self._pending.add(step)
        self._queue.put((step, path))

    def _run(self) -> None:
        while True:
            step, path = self._queue.get()
            try:
                self._copy(step, path)
            finally:
                with self._copied:
                    self._pending.discard(step)
                    self._copied.notify_all()
                self._queue.task_done()

    def _copy(self, step: int, path: Location) -> None:
        from distckpt._copy import copy_parsed

        to = self.policy.to
        assert to is not None  # only steps the policy wants are submitted: it has a ``to``
        where = f"{to}/{step_name(step)}"
        try:
            loc = _location.parse(to).child(step_name(step))
            where = loc.display
            report = copy_parsed(path, loc, overwrite=True)
            log.info("backed up step %d to %s in %.2f s", step, report.destination, report.seconds)
        except Exception as e:  # noqa: BLE001 - a backup must never stop training
            message = f"backup of step {step} from {self.directory} to {where} failed: {e}"
            log.warning(message)
            self.errors.append(message)  # list.append is atomic

    def wait(self) -> None:
        self._queue.join()

    def wait_for(self, steps: set[int], timeout_s: float) -> bool:
        """Waits until none of ``steps`` is still to be copied (retention is about to
        delete them); False if some still are after ``timeout_s``."""
        with self._copied:
            return self._copied.wait_for(lambda: not self._pending & steps, timeout_s)

    def close(self) -> None:
        self.wait()
