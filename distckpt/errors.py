"""Public exception types.

Every error distckpt raises on purpose derives from :class:`DistckptError`.
In collective calls (``save``, ``restore``) an error on one process is raised
on every process, as the same type, naming the process it came from.
"""

from __future__ import annotations

import errno

__all__ = [
    "BarrierTimeoutError",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "DistckptError",
    "InconsistentProcessesError",
    "NotCommittedError",
    "OutOfSpaceError",
    "ProcessFailure",
    "StorageUnavailableError",
    "TreeMismatchError",
    "UnsupportedCheckpointError",
]


class DistckptError(Exception):
    """Base class of every error distckpt raises on purpose.

    Raised by a collective call, ``processes`` lists the processes where the
    error happened (the same error is raised on every process).
    """

    processes: list[int] = []  # noqa: RUF012 - read-only default; instances assign their own


class InconsistentProcessesError(DistckptError, ValueError):
    """The processes of one collective call asked for different things.

    Raised on every process when they name different checkpoints (a
    per-process path, or a step chosen from per-process values), different
    save locations or different steps. Also a ``ValueError``: the arguments
    were wrong, not the storage. Nothing was returned or committed.
    """


class NotCommittedError(DistckptError):
    """The path holds no committed checkpoint (wrong path, or an interrupted save)."""


class UnsupportedCheckpointError(DistckptError, ValueError):
    """A checkpoint of another format uses something distckpt does not read.

    An Orbax layout that is not zarr, a safetensors dtype without a numpy
    counterpart: the message names it and says how to get around it.
    """


class CheckpointExistsError(DistckptError):
    """A committed checkpoint is already there and ``overwrite=False``."""


class TreeMismatchError(DistckptError):
    """The restore target and the checkpoint disagree; lists every differing leaf."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class CorruptCheckpointError(DistckptError):
    """Stored bytes fail a checksum, or a file is truncated or missing."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class BarrierTimeoutError(DistckptError):
    """Some processes did not reach a synchronisation point within the timeout."""

    def __init__(self, message: str, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class ProcessFailure(DistckptError):
    """Another process (or this one) raised during a collective operation."""

    def __init__(self, message: str, processes: list[int] | None = None):
        super().__init__(message)
        self.processes = list(processes or [])


class OutOfSpaceError(DistckptError, OSError):
    """The checkpoint's storage ran out of space (or quota) on some process.

    Also an ``OSError`` with ``errno.ENOSPC``, so code that handles a full
    disk the usual way keeps working. Nothing is committed; older
    checkpoints are intact and the job can go on training.
    """

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


class StorageUnavailableError(DistckptError, ConnectionError):
    """The storage (an object store's endpoint) did not answer, after retries.

    Also a ``ConnectionError`` (an ``OSError``). Raised once TensorStore has
    retried the request (``DISTCKPT_STORAGE_RETRIES``); a save that gets it
    has committed nothing, and the checkpoint committed before is intact.
    """
