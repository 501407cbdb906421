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
import os
import shutil
from typing import Any

import numpy as np

from distckpt import _faults
from distckpt._manifest import MANIFEST_NAME
from distckpt.errors import CheckpointExistsError, CorruptCheckpointError

ATTEMPT_PREFIX = "attempt-"
# Held (flock) by the primary of a save from before its attempt directory
# appears until its commit or discard ends: another job's commit must not
# delete an attempt that is still being written (see remove_stale_attempts).
LOCK_NAME = ".lock"


def open_storage(directory: Any) -> Storage:
    """The storage for a checkpoint location: a path, ``memory://...`` or a kvstore spec."""
    if isinstance(directory, dict):
        return KvStorage(directory)
    if isinstance(directory, os.PathLike):
        directory = os.fspath(directory)
    if not isinstance(directory, str):
        raise TypeError(
            f"a checkpoint location must be a path or a kvstore spec, got {directory!r}"
        )
    if "://" in directory:
        scheme, rest = directory.split("://", 1)
        if scheme == "memory":
            return KvStorage(
                {"driver": "memory", "path": rest.rstrip("/") + "/"}, display=directory
            )
        if scheme != "file":
            raise ValueError(
                f"{directory!r}: the {scheme}:// scheme is not supported yet; "
                "use a filesystem path, memory://, or a TensorStore kvstore spec dict"
            )
        directory = rest
    path = os.path.abspath(directory)
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
    def commit_manifest(self, raw: bytes, attempt: str) -> None: ...
    def prepare_attempt(self, attempt: str) -> None: ...
    def check_attempt_visible(self, attempt: str) -> None: ...
    def writer(self, attempt: str, name: str) -> Any: ...
    def finish_attempt_writes(self, attempt: str) -> None: ...
    def reader(self, attempt: str) -> Any: ...
    def attempts(self) -> list[str]: ...
    def remove_attempt(self, attempt: str) -> None: ...
    def remove_stale_attempts(self, keep: str) -> None:
        for stale in self.attempts():
            if stale != keep:
                self.remove_attempt(stale)

    def release_attempt(self, attempt: str) -> None:
        pass

    def exists(self) -> bool: ...
    def entries(self) -> list[str]: ...
    def free_bytes(self) -> int | None:
        return None


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
        building = os.path.join(self.path, f"{attempt}.creating")
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

    def in_flight(self, attempt: str) -> bool:
        """Whether another save (of this or another job) still writes ``attempt``."""
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

    def remove_stale_attempts(self, keep: str) -> None:
        """Removes leftovers of failed or replaced saves, never one still running.

        Another job may save into the same directory at the same time. Its
        attempt is locked while it writes and commits, so it is skipped. An
        attempt found unlocked is finished for good, so the manifest read
        afterwards says for certain whether it is the committed one.
        """
        for stale in self.attempts():
            if stale == keep or self.in_flight(stale):
                continue
            raw = self.read_manifest()
            if raw is not None and _named_attempt(raw) == stale:
                continue  # another job committed it after we did
            self.remove_attempt(stale)

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
        tmp = os.path.join(self.path, f".{MANIFEST_NAME}.tmp-{attempt}")
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
        tmp = os.path.join(self.path, f".{MANIFEST_NAME}.tmp-{attempt}")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

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
    import json

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


class _KvWriter:
    def __init__(self, kv: Any, key: str):
        self.kv, self.key, self.parts = kv, key, []

    def write(self, buf: memoryview) -> None:
        self.parts.append(bytes(memoryview(buf).cast("B")))

    def close(self) -> None:
        _faults.hit("write.fsync")
        self.kv.write(self.key, b"".join(self.parts)).result()
        self.parts = []

    def abort(self) -> None:
        self.parts = []


class _KvReader:
    cheap_size = False  # size() reads the whole value

    def __init__(self, kv: Any, attempt: str, display: str):
        self.kv, self.attempt, self.display = kv, attempt, display

    def size(self, name: str) -> int | None:
        r = self.kv.read(f"{self.attempt}/{name}").result()
        return None if r.state == "missing" else len(r.value)

    def read(
        self, name: str, offset: int, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        try:
            r = self.kv.read(
                f"{self.attempt}/{name}", byte_range=slice(offset, offset + nbytes)
            ).result()
        except ValueError as e:  # TensorStore reports an out-of-range byte range this way
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


_CONTEXT = None


def _context() -> object:
    # One TensorStore context per process, so that memory:// stores (and
    # connection pools) are shared by every open of the same location.
    global _CONTEXT
    if _CONTEXT is None:
        import tensorstore as ts

        _CONTEXT = ts.Context()
    return _CONTEXT


class KvStorage(Storage):
    def __init__(self, spec: dict, *, display: str | None = None, local_path: str | None = None):
        import tensorstore as ts

        self.spec = spec
        self.kv = ts.KvStore.open(spec, context=_context()).result()
        self.display = display or str(spec)
        self.local_path = local_path

    def exists(self) -> bool:
        return bool(self.entries())

    def entries(self) -> list[str]:
        keys = [k.decode() for k in self.kv.list().result()]
        return sorted({k.split("/", 1)[0] for k in keys})

    def read_manifest(self) -> bytes | None:
        r = self.kv.read(MANIFEST_NAME).result()
        return None if r.state == "missing" else bytes(r.value)

    def prepare_attempt(self, attempt: str) -> None:
        pass  # key prefixes need no creation

    def check_attempt_visible(self, attempt: str) -> None:
        pass

    def writer(self, attempt: str, name: str) -> _KvWriter:
        return _KvWriter(self.kv, f"{attempt}/{name}")

    def finish_attempt_writes(self, attempt: str) -> None:
        pass

    def reader(self, attempt: str) -> _KvReader:
        return _KvReader(self.kv, attempt, f"{self.display}/{attempt}")

    def commit_manifest(self, raw: bytes, attempt: str) -> None:
        # THE COMMIT POINT: one put of the manifest, after every data write.
        self.kv.write(MANIFEST_NAME, raw).result()

    def attempts(self) -> list[str]:
        return [e for e in self.entries() if e.startswith(ATTEMPT_PREFIX)]

    def remove_attempt(self, attempt: str) -> None:
        import tensorstore as ts

        self.kv.delete_range(ts.KvStore.KeyRange(f"{attempt}/", f"{attempt}0")).result()


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
