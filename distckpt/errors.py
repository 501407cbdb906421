"""Public exception types.

Every error distckpt raises on purpose derives from :class:`DistckptError`.
In collective calls (``save``, ``restore``) an error on one process is raised
on every process, as the same type, naming the process it came from.

Each error is also the built-in exception that Python code already catches
for the same kind of failure, so ``except FileNotFoundError`` or
``except ValueError`` written for other libraries keeps working:

====================================  =======================================
``NotCommittedError``                 ``FileNotFoundError`` (an ``OSError``)
``CheckpointExistsError``             ``FileExistsError`` (an ``OSError``)
``TreeMismatchError``                 ``ValueError``
``CorruptCheckpointError``            ``ValueError``
``InconsistentProcessesError``        ``ValueError``
``UnsupportedCheckpointError``        ``ValueError``
``BarrierTimeoutError``               ``TimeoutError`` (an ``OSError``)
``OutOfSpaceError``                   ``OSError`` (``errno.ENOSPC``)
``StorageUnavailableError``           ``ConnectionError`` (an ``OSError``)
``ProcessFailure``                    ``RuntimeError``
====================================  =======================================

The built-in base never replaces the specific type: catch ``DistckptError``
(or the specific class) to tell distckpt's errors from the storage's own
``OSError``s. ``distckpt.compat.datarax`` raises subclasses of these that
are also ``ValueError``s where datarax raises ``ValueError``.
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


class NotCommittedError(DistckptError, FileNotFoundError):
    """The path holds no committed checkpoint (wrong path, or an interrupted save).

    Also a ``FileNotFoundError``: what was asked for is not there, as for
    ``open`` of a missing file. ``str(e)`` is the message alone (``e.errno``
    is None).
    """


class UnsupportedCheckpointError(DistckptError, ValueError):
    """A checkpoint of another format uses something distckpt does not read.

    An Orbax layout that is not zarr, a safetensors dtype without a numpy
    counterpart: the message names it and says how to get around it.
    """


class CheckpointExistsError(DistckptError, FileExistsError):
    """A committed checkpoint is already there and ``overwrite=False``.

    Also a ``FileExistsError``, as ``os.mkdir`` of an existing directory.
    """


class TreeMismatchError(DistckptError, ValueError):
    """The restore target and the checkpoint disagree; lists every differing leaf.

    Also a ``ValueError``: the target (the value passed) does not fit what
    was saved. ``problems`` lists each difference, one line per leaf.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class CorruptCheckpointError(DistckptError, ValueError):
    """Stored bytes fail a checksum, or a file is truncated or missing.

    Also a ``ValueError`` (the stored value is bad), as ``json`` or ``zlib``
    raise for damaged input. ``problems`` names each bad chunk or file.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class BarrierTimeoutError(DistckptError, TimeoutError):
    """Some processes did not reach a synchronisation point within the timeout.

    Also a ``TimeoutError`` (an ``OSError``). ``missing`` lists the processes
    that did not arrive, when known.
    """

    def __init__(self, message: str, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


class ProcessFailure(DistckptError, RuntimeError):
    """Another process (or this one) raised during a collective operation.

    Also a ``RuntimeError``: the cause was not one of the typed errors above.
    """

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
