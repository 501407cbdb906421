"""The storage interface: what the save, restore and manager pipelines ask of a location.

A location holds one checkpoint (``<root>/``, see docs/format.md) or, for a
CheckpointManager, one child location per step. Two backends implement it:
``posix.PosixStorage`` (filesystems) and ``kvstore.KvStorage`` (object
stores and everything TensorStore's kvstore reaches).

Who calls what, in what order:

One save (``_save``, ``_copy``)::

    1) (primary)   preflight(overwrite=...) -> Preflight   before anything is written
    2) (primary)   prepare_attempt(attempt)                 the attempt exists (and is held)
    3) (all)       check_attempt_visible(attempt)
    4) (all)       writer(attempt, name) -> Writer: write()..., close() (durable) or abort()
    5) (all)       finish_attempt_writes(attempt)            the attempt's names are durable
    6) (primary)   commit_manifest(raw, attempt, preflight)  THE COMMIT POINT, after a barrier
    7) (primary)   remove_stale_attempts(attempt, preflight) leftovers a commit cleans up
    8) (primary)   release_attempt(attempt)                  also after a failed save,
                                                             after remove_attempt(attempt)

One restore (``_restore``, every process)::

    1) read_manifest() -> bytes | None
    2) reader(attempt) -> Reader: size(), read()..., close()

A manager directory (``_steps``, the manager's start-up and retention)::

    entries(), child(name), attempts(), attempt_live(attempt),
    remove_dead_attempts(keep), remove_leftover(name, aside),
    remove_entry(name), delete_checkpoint(name, aside)

Decisions travel as values: what the primary found at preflight comes
back as a :class:`Preflight` and goes into the commit, never stashed on
the storage object.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Self

import numpy as np

from distckpt._layout import ATTEMPT_PREFIX
from distckpt.errors import CorruptCheckpointError


@dataclass(frozen=True)
class Preflight:
    """What the primary found at a location before a save wrote anything.

    Attributes:
      manifest: the committed manifest then (None: nothing committed).
      overwrite: whether the save may replace a committed checkpoint.
      token: the backend's name for exactly that manifest, so that the
        commit can be conditional on it (a kvstore generation); None where
        the backend needs none.
    """

    manifest: bytes | None
    overwrite: bool
    token: bytes | None = None

    @property
    def replaced_attempt(self) -> str | None:
        """The attempt the manifest found at preflight named (the data a commit replaces)."""
        return None if self.manifest is None else named_attempt(self.manifest)


class Writer(abc.ABC):
    """One data file being written; durable once ``close`` returns."""

    @abc.abstractmethod
    def write(self, buf: memoryview) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Makes the file durable (fsync, or the object's upload) and releases it."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Releases the file after a failure; safe to call after a failed ``close``."""

    def fd(self) -> int | None:
        """A local file descriptor, where there is one (for writeback hints); else None."""
        return None


class Reader(abc.ABC):
    """The data files of one attempt, read by byte range."""

    display: str

    @abc.abstractmethod
    def read(
        self, name: str, offset: int, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Bytes ``offset..offset+nbytes`` of file ``name`` (into ``out`` if given).

        Raises:
          CorruptCheckpointError: the file is missing or shorter than that.
        """

    @abc.abstractmethod
    def size(self, name: str) -> int | None:
        """The size of file ``name``, None if it is missing."""

    def sizes_are_cheap(self) -> bool:
        """Whether ``size`` costs no more than a metadata lookup (so a restore may check
        every file's size before allocating anything)."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Releases what the reader holds open."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(abc.ABC):
    """One checkpoint location. ``display`` names it in errors; ``local_path`` is its
    path on this machine's filesystem, if it has one."""

    display: str
    local_path: str | None = None

    # ---------------------------------------------------------------- one checkpoint

    @abc.abstractmethod
    def read_manifest(self) -> bytes | None:
        """The committed manifest's bytes, None if nothing is committed here."""

    @abc.abstractmethod
    def preflight(self, *, overwrite: bool) -> Preflight:
        """Primary, before a save writes anything: what is committed here now."""

    @abc.abstractmethod
    def prepare_attempt(self, attempt: str) -> None:
        """Primary: makes ``attempt`` exist, held for this save until ``release_attempt``."""

    @abc.abstractmethod
    def check_attempt_visible(self, attempt: str) -> None:
        """Raises ``FileNotFoundError`` if this process cannot see the primary's attempt."""

    @abc.abstractmethod
    def writer(self, attempt: str, name: str) -> Writer:
        """A new data file ``name`` in ``attempt`` (it must not exist yet)."""

    def holds_whole_files(self) -> bool:
        """Whether a ``Writer`` keeps its whole file in memory until ``close`` (an
        object store sends it in one request): a save then keeps files small
        enough for its memory budget."""
        return False

    @abc.abstractmethod
    def finish_attempt_writes(self, attempt: str) -> None:
        """Makes the names of this process's files in ``attempt`` durable."""

    @abc.abstractmethod
    def commit_manifest(self, raw: bytes, attempt: str, preflight: Preflight) -> None:
        """THE COMMIT POINT: makes ``raw`` the manifest, atomically.

        Unless ``preflight.overwrite``, fails with ``CheckpointExistsError``
        if a manifest appeared since the preflight; with it, if the manifest
        changed since then (where the backend can tell).
        """

    @abc.abstractmethod
    def reader(self, attempt: str) -> Reader: ...

    def attempts(self) -> list[str]:
        """The attempts here (committed, leftovers, and ones being written)."""
        return [e for e in self.entries() if e.startswith(ATTEMPT_PREFIX)]

    @abc.abstractmethod
    def remove_attempt(self, attempt: str) -> None: ...

    @abc.abstractmethod
    def attempt_live(self, attempt: str) -> bool:
        """Whether a save (of any job) may still be writing or committing ``attempt``."""

    @abc.abstractmethod
    def release_attempt(self, attempt: str) -> None:
        """Primary, when its save ends (committed or not): ``attempt`` is no longer held."""

    def remove_stale_attempts(self, keep: str, preflight: Preflight) -> None:
        """Primary, right after committing ``keep``: removes the leftovers a commit cleans up."""
        self.remove_dead_attempts(keep)

    def remove_dead_attempts(self, keep: str) -> None:
        """Removes leftovers of failed or replaced saves, never one still running.

        Another job may save into the same directory at the same time; its
        attempt is live (``attempt_live``) until it commits or gives up, so
        it is skipped. An attempt found finished stays finished, so the
        manifest read afterwards says for certain whether it is the
        committed one.
        """
        for stale in self.attempts():
            if stale == keep or self.attempt_live(stale):
                continue
            raw = self.read_manifest()
            if raw is not None and named_attempt(raw) == stale:
                continue  # another job committed it after we looked
            self.remove_attempt(stale)

    @abc.abstractmethod
    def exists(self) -> bool: ...

    def is_file(self) -> bool:
        """True when the location is a regular file on a local disk (not a directory)."""
        return self.local_path is not None and os.path.isfile(self.local_path)

    @abc.abstractmethod
    def entries(self) -> list[str]:
        """The names directly inside this location, sorted (empty if it does not exist)."""

    def free_bytes(self) -> int | None:
        """Free space for a save here, None where the backend cannot tell."""
        return None

    # ---------------------------------------------------------------- a manager's directory

    @abc.abstractmethod
    def child(self, name: str) -> Storage:
        """The location ``name`` inside this one (a manager's step)."""

    @abc.abstractmethod
    def remove_entry(self, name: str) -> None:
        """Removes child ``name`` and everything in it (a leftover, never a committed step)."""

    @abc.abstractmethod
    def delete_checkpoint(self, name: str, aside: str) -> None:
        """Deletes the committed checkpoint in child ``name`` so that no crash
        midway leaves something that looks committed but is not whole."""

    def remove_leftover(self, name: str, aside: str) -> bool:
        """Removes child ``name``, an uncommitted step holding only save attempts, unless a
        save still holds one of them (or committed meanwhile). Returns whether it went."""
        child = self.child(name)
        if child.read_manifest() is not None or child.has_live_attempt():
            return False
        self.remove_entry(name)
        return True

    def has_live_attempt(self) -> bool:
        """Whether any save (of any job) may still be writing or committing here."""
        return any(self.attempt_live(a) for a in self.attempts())


def named_attempt(raw: bytes) -> str | None:
    """The attempt a manifest's bytes name, None if they name none (read without checks:
    only to decide what clean-up must keep)."""
    try:
        attempt = json.loads(raw).get("attempt")
    except (ValueError, AttributeError):
        return None
    return attempt if isinstance(attempt, str) else None


def missing(display: str, name: str, why: str) -> CorruptCheckpointError:
    """The error for a data file that is missing or shorter than the manifest says."""
    return CorruptCheckpointError(
        f"data file {display}/{name} {why}. The checkpoint is damaged (a deleted or "
        "partially copied file); restore another step or a backup.",
        [f"{display}/{name}: {why}"],
    )


ALIGN = 64  # XLA's CPU client adopts host buffers aligned like this without a copy


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary.

    Read buffers and restored arrays are allocated this way so that JAX can
    take them as device buffers as they are.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)
