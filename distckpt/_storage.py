"""All bytes in and out of a checkpoint directory. The only module that imports tensorstore.

Two backends share one interface:

* ``PosixStorage`` for local and network filesystems (ext4, NFS, Lustre):
  data moves straight between numpy buffers and the kernel with
  ``os.write``/``os.preadv``; files and every directory we create are fsync'd;
  the commit point is the atomic rename of ``manifest.json``. Measured here,
  TensorStore's ``file`` kvstore wrote 0.2-0.5 GB/s where plain fsync'd writes
  reached 1.1-1.3 GB/s, so filesystems take the direct path by default
  (``DISTCKPT_IO_BACKEND=tensorstore`` forces the kvstore path).
* ``KvStorage`` for everything TensorStore's kvstore reaches (``memory://``,
  kvstore spec dicts; object stores build on it). The manifest is written
  last in one put, which object stores make atomic.

Layout (see docs/format.md)::

    <root>/manifest.json              the commit record, written last
    <root>/attempt-<id>/p00000.s000.bin  data files of one save attempt
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from typing import Any

import numpy as np

from distckpt import _faults, _knobs, _location
from distckpt._layout import (
    ATTEMPT_PREFIX,
    CREATING_SUFFIX,
    LOCK_NAME,
    MANIFEST_NAME,
    STARTED_NAME,
    tmp_manifest,
)
from distckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    StorageUnavailableError,
)

log = logging.getLogger("distckpt")


def open_storage(directory: Any) -> Storage:
    """The storage for a checkpoint location (see ``_location``): a path, an
    ``s3://``/``gs://``/``memory://`` URL or a kvstore spec."""
    loc = _location.parse(directory)
    if loc.spec is not None:
        return KvStorage(loc.spec, display=loc.display)
    path = loc.path
    backend = os.environ.get("DISTCKPT_IO_BACKEND", "posix")
    if backend not in ("posix", "tensorstore"):
        raise ValueError(f"DISTCKPT_IO_BACKEND must be 'posix' or 'tensorstore', got {backend!r}")
    if backend == "tensorstore":
        return KvStorage({"driver": "file", "path": path + "/"}, display=path, local_path=path)
    return PosixStorage(path)


class Storage:
    """Interface of a checkpoint location. ``display`` names it in errors."""

    display: str
    local_path: str | None = None
    # Set by preflight: may the commit replace a manifest that appeared meanwhile?
    overwrite: bool = True

    def read_manifest(self) -> bytes | None: ...
    def preflight_manifest(self) -> bytes | None:
        """The manifest, read by the primary before a save writes anything."""
        return self.read_manifest()

    def commit_manifest(self, raw: bytes, attempt: str) -> None: ...
    def prepare_attempt(self, attempt: str) -> None: ...
    def check_attempt_visible(self, attempt: str) -> None: ...
    def writer(self, attempt: str, name: str) -> Any: ...
    def finish_attempt_writes(self, attempt: str) -> None: ...
    def reader(self, attempt: str) -> Any: ...
    def attempts(self) -> list[str]: ...
    def remove_attempt(self, attempt: str) -> None: ...
    def attempt_live(self, attempt: str) -> bool:
        """Whether a save (of any job) may still be writing or committing ``attempt``."""
        return False

    def remove_stale_attempts(self, keep: str) -> None:
        """After a commit of ``keep``: removes the leftovers a commit cleans up."""
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
            if raw is not None and _named_attempt(raw) == stale:
                continue  # another job committed it after we looked
            self.remove_attempt(stale)

    def remove_leftover(self, name: str, aside: str) -> bool:
        """Removes child ``name``, an uncommitted step holding only save attempts, unless a
        save still holds one of them (or committed meanwhile). Returns whether it went."""
        child = self.child(name)
        if child.read_manifest() is not None or any(
            child.attempt_live(a) for a in child.attempts()
        ):
            return False
        self.remove_entry(name)
        return True

    def release_attempt(self, attempt: str) -> None:
        pass

    def exists(self) -> bool: ...
    def is_file(self) -> bool:
        """True when the location is a regular file on a local disk (not a directory)."""
        return self.local_path is not None and os.path.isfile(self.local_path)

    def entries(self) -> list[str]: ...
    def free_bytes(self) -> int | None:
        return None

    # A CheckpointManager's directory: one child location per step.
    def child(self, name: str) -> Storage: ...
    def remove_entry(self, name: str) -> None:
        """Removes child ``name`` and everything in it (a leftover, never a committed step)."""

    def delete_checkpoint(self, name: str, aside: str) -> None:
        """Deletes the committed checkpoint in child ``name`` so that no crash
        midway leaves something that looks committed but is not whole."""


def _missing(display: str, name: str, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"data file {display}/{name} {why}. The checkpoint is damaged (a deleted or "
        "partially copied file); restore another step or a backup.",
        [f"{display}/{name}: {why}"],
    )


# --------------------------------------------------------------------------- POSIX


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PosixWriter:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.nbytes = 0

    def write(self, buf: memoryview) -> None:
        view = memoryview(buf).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.nbytes += n

    def close(self) -> None:
        try:
            _faults.hit("write.fsync")
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        # Closes once. The caller aborts after a failed close(): closing the
        # number again would hide the real error behind EBADF, or close a file
        # another writer thread has just opened under the same number.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _PosixReader:
    cheap_size = True  # size() is a stat: restore checks files before allocating

    def __init__(self, directory: str, display: str):
        self.directory = directory
        self.display = display
        self.fds: dict[str, int] = {}

    def size(self, name: str) -> int | None:
        try:
            return os.stat(os.path.join(self.directory, name)).st_size
        except FileNotFoundError:
            return None

    def read(
        self, name: str, offset: int, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        fd = self.fds.get(name)
        if fd is None:
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDONLY)
            except FileNotFoundError:
                raise _missing(self.display, name, "is missing") from None
            self.fds[name] = fd
        if out is None:
            out = aligned_empty((nbytes,), np.dtype(np.uint8))
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [memoryview(out)[got:]], offset + got)
            if n == 0:
                raise _missing(
                    self.display,
                    name,
                    f"is truncated: wanted bytes {offset}..{offset + nbytes}, file ends at {offset + got}",
                )
            got += n
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> _PosixReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PosixStorage(Storage):
    def __init__(self, path: str):
        self.path = path
        self.display = path
        self.local_path = path
        self._locks: dict[str, int] = {}  # attempt -> fd of its held lock file

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def entries(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_manifest(self) -> bytes | None:
        try:
            with open(os.path.join(self.path, MANIFEST_NAME), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def prepare_attempt(self, attempt: str) -> None:
        # Create missing ancestors one by one so that each new directory entry
        # can be made durable: fsync the parent of everything we create.
        missing = []
        p = self.path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            _fsync_dir(os.path.dirname(d))
        # The attempt appears under its name already locked. Should another
        # job's cleanup remove it while unlocked, before the rename, this save
        # fails here; a crash here leaves a leftover like any other attempt.
        building = os.path.join(self.path, attempt + CREATING_SUFFIX)
        os.mkdir(building)
        fd = os.open(os.path.join(building, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no locks on this filesystem: concurrent jobs are not protected
        self._locks[attempt] = fd
        os.rename(building, os.path.join(self.path, attempt))
        _fsync_dir(self.path)

    def release_attempt(self, attempt: str) -> None:
        fd = self._locks.pop(attempt, None)
        if fd is None:
            return
        try:
            os.unlink(os.path.join(self.path, attempt, LOCK_NAME))
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def attempt_live(self, attempt: str) -> bool:
        """Whether a save (of this or another job) still holds ``attempt``'s lock."""
        if attempt in self._locks:
            return True
        try:
            fd = os.open(os.path.join(self.path, attempt, LOCK_NAME), os.O_RDWR)
        except (FileNotFoundError, NotADirectoryError):
            return False  # released (or a crashed save of an older version)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no locks here: cannot tell, behave as before
        finally:
            os.close(fd)  # a dead owner's lock is gone with it; ours goes with the fd
        return False

    def check_attempt_visible(self, attempt: str) -> None:
        d = os.path.join(self.path, attempt)
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"{d} was created by the primary process but is not visible here: "
                "the checkpoint directory must be on a filesystem every process shares"
            )

    def writer(self, attempt: str, name: str) -> _PosixWriter:
        return _PosixWriter(os.path.join(self.path, attempt, name))

    def finish_attempt_writes(self, attempt: str) -> None:
        _fsync_dir(os.path.join(self.path, attempt))

    def reader(self, attempt: str) -> _PosixReader:
        return _PosixReader(os.path.join(self.path, attempt), f"{self.path}/{attempt}")

    def commit_manifest(self, raw: bytes, attempt: str) -> None:
        tmp = os.path.join(self.path, tmp_manifest(attempt))
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        # THE COMMIT POINT: rename is atomic, so readers see the old manifest
        # or the new one, never a mix; the directory fsync makes it durable.
        _faults.hit("commit.rename")
        target = os.path.join(self.path, MANIFEST_NAME)
        if self.overwrite or not _link_no_replace(tmp, target):
            os.rename(tmp, target)
        _faults.hit("commit.renamed")
        _fsync_dir(self.path)

    def attempts(self) -> list[str]:
        return [e for e in self.entries() if e.startswith(ATTEMPT_PREFIX)]

    def remove_attempt(self, attempt: str) -> None:
        shutil.rmtree(os.path.join(self.path, attempt), ignore_errors=True)
        tmp = os.path.join(self.path, tmp_manifest(attempt))
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

    def child(self, name: str) -> PosixStorage:
        return PosixStorage(os.path.join(self.path, name))

    def remove_entry(self, name: str) -> None:
        remove_tree(os.path.join(self.path, name))

    def delete_checkpoint(self, name: str, aside: str) -> None:
        remove_aside(self.path, name, aside)

    def remove_leftover(self, name: str, aside: str) -> bool:
        # Renamed aside first (atomic), so no save can start or commit in it
        # while we look; put back if one holds it or committed meanwhile.
        try:
            os.rename(os.path.join(self.path, name), os.path.join(self.path, aside))
        except FileNotFoundError:
            return False
        held = PosixStorage(os.path.join(self.path, aside))
        if held.read_manifest() is not None or any(held.attempt_live(a) for a in held.attempts()):
            os.rename(os.path.join(self.path, aside), os.path.join(self.path, name))
            return False
        _fsync_dir(self.path)
        remove_tree(os.path.join(self.path, aside))
        return True

    def free_bytes(self) -> int | None:
        p = self.path
        while not os.path.isdir(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
        try:
            st = os.statvfs(p)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize


def _named_attempt(raw: bytes) -> str | None:
    try:
        return json.loads(raw).get("attempt")
    except (ValueError, AttributeError):
        return None


def _link_no_replace(tmp: str, target: str) -> bool:
    """Commits ``tmp`` as ``target`` unless ``target`` exists, atomically.

    ``rename`` replaces silently, so two jobs saving with ``overwrite=False``
    would both "succeed". A hard link fails instead if the name is taken.
    Returns False where links are not supported (the caller renames).
    """
    try:
        os.link(tmp, target)
    except FileExistsError:
        os.unlink(tmp)
        raise CheckpointExistsError(
            f"{target} appeared while this save was writing (another job saved there); "
            "this save is not committed and the other checkpoint is left as it is. "
            "Pass overwrite=True to replace it, or save somewhere else."
        ) from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            return False
        raise
    os.unlink(tmp)
    return True


# --------------------------------------------------------------------------- TensorStore kvstore


def _is_unavailable(e: BaseException) -> bool:
    """Whether a TensorStore error means the store could not be reached (after retries)."""
    text = str(e)
    return any(
        marker in text
        for marker in (
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
            "retry attempts failed",
            "CURL error",
            "Could not connect",
        )
    )


def _process() -> int:
    try:
        from distckpt import _multihost

        return _multihost.process_index()
    except Exception:  # noqa: BLE001 - only for a message
        return 0


def _kv_result(future: Any, what: str, where: str) -> Any:
    """Waits for a kvstore operation; an unreachable store becomes StorageUnavailableError.

    TensorStore retries failed requests itself (``DISTCKPT_STORAGE_RETRIES``);
    once it gives up, so does this.
    """
    try:
        return future.result()
    except ValueError as e:
        if _is_unavailable(e):
            raise StorageUnavailableError(
                f"{what} {where} failed on process {_process()}: the storage did not answer "
                f"after retries ({e}). Check that the endpoint is up and reachable (for S3: "
                "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, proxies, NO_PROXY) and the credentials; "
                "DISTCKPT_STORAGE_RETRIES sets how long to retry. Nothing this operation had "
                "not committed is committed."
            ) from e
        e.add_note(f"distckpt: {what} {where} (process {_process()})")
        raise


class _KvWriter:
    def __init__(self, kv: Any, key: str, where: str):
        self.kv, self.key, self.where, self.parts = kv, key, where, []

    def write(self, buf: memoryview) -> None:
        self.parts.append(bytes(memoryview(buf).cast("B")))

    def close(self) -> None:
        _faults.hit("write.fsync")
        _kv_result(self.kv.write(self.key, b"".join(self.parts)), "writing", self.where)
        self.parts = []

    def abort(self) -> None:
        self.parts = []


class _KvReader:
    cheap_size = False  # size() reads the whole value

    def __init__(self, kv: Any, attempt: str, display: str):
        self.kv, self.attempt, self.display = kv, attempt, display

    def size(self, name: str) -> int | None:
        r = _kv_result(self.kv.read(f"{self.attempt}/{name}"), "reading", f"{self.display}/{name}")
        return None if r.state == "missing" else len(r.value)

    def read(
        self, name: str, offset: int, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        try:
            r = _kv_result(
                self.kv.read(f"{self.attempt}/{name}", byte_range=slice(offset, offset + nbytes)),
                "reading",
                f"{self.display}/{name}",
            )
        except ValueError as e:  # TensorStore reports an out-of-range byte range this way
            if "OUT_OF_RANGE" not in str(e):
                raise
            raise _missing(self.display, name, f"is truncated ({e})") from None
        if r.state == "missing":
            raise _missing(self.display, name, "is missing")
        if len(r.value) != nbytes:
            raise _missing(
                self.display, name, f"is truncated: got {len(r.value)} of {nbytes} bytes"
            )
        data = np.frombuffer(r.value, dtype=np.uint8)
        if out is None:
            out = aligned_empty((nbytes,), np.dtype(np.uint8))
        out[:] = data  # a writable, aligned copy, like the POSIX path gives
        return out

    def close(self) -> None:
        pass

    def __enter__(self) -> _KvReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_CONTEXTS: dict[str, object] = {}


def _context() -> object:
    # One TensorStore context per process (per retry setting), so that
    # memory:// stores, connection pools and credentials are shared by every
    # open of a location.
    spec = _location.context_spec()
    key = json.dumps(spec, sort_keys=True)
    if key not in _CONTEXTS:
        import tensorstore as ts

        _CONTEXTS[key] = ts.Context(spec)
    return _CONTEXTS[key]


_NO_VALUE = b"\x02"  # TensorStore's generation of a key without a value: create-only


class KvStorage(Storage):
    """A location reached through TensorStore's kvstore (object stores, memory, file).

    No rename: data goes under ``attempt-<id>/`` and the manifest, written
    last with a conditional write, is the commit marker. The condition is
    the manifest's generation as the primary read it at preflight (none:
    create-only), so of two saves racing to commit one location exactly one
    wins and the other gets ``CheckpointExistsError``; TensorStore reports
    a lost race as an empty generation, not as an exception.
    """

    def __init__(
        self,
        spec: dict,
        *,
        display: str | None = None,
        local_path: str | None = None,
        kv: Any = None,
    ):
        import tensorstore as ts

        self.spec = spec
        self.display = display or _location.parse(spec).display
        self.local_path = local_path
        self.object_store = spec.get("driver") in _location.OBJECT_DRIVERS
        if kv is None:
            kv = _kv_result(ts.KvStore.open(spec, context=_context()), "opening", self.display)
        self.kv = kv
        self._expected: bytes | None = None  # manifest generation seen at preflight
        self._replaced: str | None = None  # the attempt that manifest named

    def _where(self, key: str = "") -> str:
        return f"{self.display.rstrip('/')}/{key}" if key else self.display

    def exists(self) -> bool:
        return bool(self.entries())

    def entries(self) -> list[str]:
        # LIST finds candidates only: whether something is committed is
        # decided by reading its manifest, never by what a listing shows.
        keys = [k.decode() for k in _kv_result(self.kv.list(), "listing", self._where())]
        return sorted({k.split("/", 1)[0] for k in keys})

    def _read_manifest_stamped(self) -> tuple[bytes | None, bytes]:
        r = _kv_result(self.kv.read(MANIFEST_NAME), "reading", self._where(MANIFEST_NAME))
        if r.state == "missing":
            return None, _NO_VALUE
        return bytes(r.value), bytes(r.stamp.generation)

    def read_manifest(self) -> bytes | None:
        return self._read_manifest_stamped()[0]

    def preflight_manifest(self) -> bytes | None:
        raw, self._expected = self._read_manifest_stamped()
        self._replaced = None if raw is None else _named_attempt(raw)
        return raw

    def prepare_attempt(self, attempt: str) -> None:
        # Key prefixes need no creation. An object store has no locks, so the
        # attempt's first object records when it started: clean-up leaves an
        # attempt alone until it is older than any save could run.
        key = f"{attempt}/{STARTED_NAME}"
        stamp = json.dumps({"started": time.time()}).encode()
        _kv_result(self.kv.write(key, stamp), "writing", self._where(key))

    def attempt_live(self, attempt: str) -> bool:
        key = f"{attempt}/{STARTED_NAME}"
        r = _kv_result(self.kv.read(key), "reading", self._where(key))
        if r.state == "missing":
            return False  # written by a save before it wrote anything, so none is running
        try:
            started = float(json.loads(bytes(r.value))["started"])
        except (ValueError, KeyError, TypeError):
            return False
        return time.time() - started < _knobs.get("live_attempt_s")

    def check_attempt_visible(self, attempt: str) -> None:
        pass

    def writer(self, attempt: str, name: str) -> _KvWriter:
        return _KvWriter(self.kv, f"{attempt}/{name}", self._where(f"{attempt}/{name}"))

    def finish_attempt_writes(self, attempt: str) -> None:
        pass

    def reader(self, attempt: str) -> _KvReader:
        return _KvReader(self.kv, attempt, self._where(attempt))

    def commit_manifest(self, raw: bytes, attempt: str) -> None:
        # THE COMMIT POINT: one conditional put of the manifest, after every
        # data write. Create-only when nothing was committed at preflight;
        # otherwise only over the very manifest preflight read (overwrite).
        expected = self._expected
        if expected is None:  # no preflight (not a save's primary): as before
            expected = None if self.overwrite else _NO_VALUE
        _faults.hit("commit.rename")
        where = self._where(MANIFEST_NAME)
        if expected is None:
            _kv_result(self.kv.write(MANIFEST_NAME, raw), "committing", where)
            self._drop_started(attempt)
            return
        stamp = _kv_result(
            self.kv.write(MANIFEST_NAME, raw, if_equal=expected), "committing", where
        )
        if not stamp.generation:  # the condition failed: another save committed first
            if expected == _NO_VALUE:
                found = "appeared while this save was writing"
            else:
                found = "was replaced by another save while this save was writing"
            raise CheckpointExistsError(
                f"{where} {found} (another job saved there); process {_process()} did not "
                f"commit {attempt}, and the other checkpoint is left as it is. Save "
                "somewhere else, or save again with overwrite=True to replace it."
            )
        _faults.hit("commit.renamed")
        self._drop_started(attempt)

    def _drop_started(self, attempt: str) -> None:
        # Committed: the manifest names the attempt now, so its start mark has
        # done its job. Without it, what a deletion that stopped after the
        # manifest went leaves behind is a leftover at once, not for an hour.
        key = f"{attempt}/{STARTED_NAME}"
        try:
            _kv_result(self.kv.write(key, None), "deleting", self._where(key))
        except (OSError, ValueError) as e:  # the commit stands; the mark only delays clean-up
            log.warning("could not remove %s after the commit: %s", self._where(key), e)

    def attempts(self) -> list[str]:
        return [e for e in self.entries() if e.startswith(ATTEMPT_PREFIX)]

    def remove_attempt(self, attempt: str) -> None:
        import tensorstore as ts

        _kv_result(
            self.kv.delete_range(ts.KvStore.KeyRange(f"{attempt}/", f"{attempt}0")),
            "deleting",
            self._where(attempt),
        )

    def remove_stale_attempts(self, keep: str) -> None:
        if not self.object_store:
            self.remove_dead_attempts(keep)  # one machine: as on a filesystem
            return
        # An object store has no locks to tell a crashed save's leftovers from
        # another job's save in progress, so only the data of the checkpoint
        # this commit replaced goes now; leftovers go with the manager's
        # start-up cleanup or ``distckpt gc``.
        if self._replaced is not None and self._replaced != keep:
            self.remove_attempt(self._replaced)

    def child(self, name: str) -> KvStorage:
        loc = _location.Location(self.display, spec=self.spec).child(name)
        return KvStorage(loc.spec, display=loc.display, kv=self.kv / f"{name}/")

    def remove_entry(self, name: str) -> None:
        import tensorstore as ts

        _kv_result(
            self.kv.delete_range(ts.KvStore.KeyRange(f"{name}/", f"{name}0")),
            "deleting",
            self._where(name),
        )

    def delete_checkpoint(self, name: str, aside: str) -> None:
        # The marker goes first: from then on nothing is committed there, and
        # a crash before the data is gone leaves an uncommitted leftover.
        key = f"{name}/{MANIFEST_NAME}"
        _kv_result(self.kv.write(key, None), "deleting", self._where(key))
        self.remove_entry(name)


def list_dir(path: str) -> list[str]:
    """Entries of a local directory, sorted; empty if it does not exist."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_aside(parent: str, name: str, aside: str) -> None:
    """Deletes ``parent/name`` so that a crash midway never leaves a partial
    ``name``: rename it to ``aside`` (atomic), make that durable, then remove."""
    os.rename(os.path.join(parent, name), os.path.join(parent, aside))
    _fsync_dir(parent)
    shutil.rmtree(os.path.join(parent, aside), ignore_errors=True)
