"""Checkpoints wherever TensorStore's kvstore reaches: S3, GCS, ``memory://``, files.

The storage layer's only TensorStore user (the Orbax source also reads
zarr arrays through TensorStore; tests/test_layout.py keeps it to these
two). No rename: data goes under
``attempt-<id>/`` and the manifest, written last in one conditional put,
is the commit marker. No locks: an attempt records when it started
(``attempt-<id>/.started``) until its commit, so that clean-up leaves a
recent one alone.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from distckpt import _faults, _knobs, _location
from distckpt._layout import MANIFEST_NAME, STARTED_NAME
from distckpt._storage.interface import (
    Preflight,
    Reader,
    Storage,
    Writer,
    aligned_empty,
    missing,
)
from distckpt.errors import CheckpointExistsError, StorageUnavailableError

if TYPE_CHECKING:  # for annotations only: at run time it is imported where used
    import tensorstore as ts

log = logging.getLogger("distckpt")


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


def _endpoint_hint(where: str) -> str:
    if where.startswith("gs://"):
        return "GCS: storage.googleapis.com, or TENSORSTORE_GCS_HTTP_URL for an emulator"
    if where.startswith("s3://"):
        return "S3: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
    return "for S3: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; for GCS: TENSORSTORE_GCS_HTTP_URL"


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
                f"after retries ({e}). Check that the endpoint is up and reachable "
                f"({_endpoint_hint(where)}, proxies, NO_PROXY) and the credentials; "
                "DISTCKPT_STORAGE_RETRIES sets how long to retry. Nothing this operation had "
                "not committed is committed."
            ) from e
        e.add_note(f"distckpt: {what} {where} (process {_process()})")
        raise


class _KvWriter(Writer):
    def __init__(self, kv: Any, key: str, where: str):
        self.kv, self.key, self.where = kv, key, where
        self.parts: list[bytes] = []

    def write(self, buf: memoryview) -> None:
        self.parts.append(bytes(memoryview(buf).cast("B")))

    def close(self) -> None:
        _faults.hit("write.fsync")
        _kv_result(self.kv.write(self.key, b"".join(self.parts)), "writing", self.where)
        self.parts = []

    def abort(self) -> None:
        self.parts = []


class _KvReader(Reader):
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
            raise missing(self.display, name, f"is truncated ({e})") from None
        if r.state == "missing":
            raise missing(self.display, name, "is missing")
        if len(r.value) != nbytes:
            raise missing(self.display, name, f"is truncated: got {len(r.value)} of {nbytes} bytes")
        data = np.frombuffer(r.value, dtype=np.uint8)
        if out is None:
            out = aligned_empty((nbytes,), np.dtype(np.uint8))
        out[:] = data  # a writable, aligned copy, like the POSIX path gives
        return out

    def close(self) -> None:
        pass  # nothing held open: every read is one request


_CONTEXTS: dict[str, ts.Context] = {}


def _context() -> ts.Context:
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
    a lost race as an empty generation, not as an exception. On the wire
    (tests/test_wire.py): GCS ``ifGenerationMatch=<n>`` (0: create-only),
    S3 ``If-None-Match: *`` or ``If-Match: <etag>``.
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

    def preflight(self, *, overwrite: bool) -> Preflight:
        raw, generation = self._read_manifest_stamped()
        return Preflight(raw, overwrite, token=generation)

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
        pass  # one namespace: every process sees every key

    def release_attempt(self, attempt: str) -> None:
        pass  # nothing held: the start mark goes with the commit

    def holds_whole_files(self) -> bool:
        return True  # _KvWriter sends a file in one put: its parts, then their join

    def writer(self, attempt: str, name: str) -> _KvWriter:
        return _KvWriter(self.kv, f"{attempt}/{name}", self._where(f"{attempt}/{name}"))

    def finish_attempt_writes(self, attempt: str) -> None:
        pass

    def reader(self, attempt: str) -> _KvReader:
        return _KvReader(self.kv, attempt, self._where(attempt))

    def commit_manifest(self, raw: bytes, attempt: str, preflight: Preflight) -> None:
        # THE COMMIT POINT: one conditional put of the manifest, after every
        # data write. Create-only when nothing was committed at preflight;
        # otherwise only over the very manifest preflight read (overwrite).
        expected = preflight.token
        if expected is None:  # a preflight that named no generation
            expected = None if preflight.overwrite else _NO_VALUE
        _faults.hit("commit.rename")
        where = self._where(MANIFEST_NAME)
        if expected is None:
            _kv_result(self.kv.write(MANIFEST_NAME, raw), "committing", where)
            self._drop_started(attempt)
            return
        stamp = _kv_result(
            self.kv.write(MANIFEST_NAME, raw, if_equal=expected), "committing", where
        )
        if not stamp.generation and self.read_manifest() != raw:
            # The condition failed: another save committed first. (A failed
            # condition with our own manifest in place is our write, retried
            # by TensorStore after its answer was lost: the first try landed,
            # the retry found it. The manifest names this save's attempt,
            # which no other save uses, so that is this save's commit.)
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

    def remove_attempt(self, attempt: str) -> None:
        self.remove_entry(attempt)  # a key prefix, like a step's

    def remove_stale_attempts(self, keep: str, preflight: Preflight) -> None:
        if not self.object_store:
            self.remove_dead_attempts(keep)  # one machine: as on a filesystem
            return
        # Listing a bucket on every commit is costly, so only the data of the
        # checkpoint this commit replaced goes now; other leftovers go with
        # the manager's start-up clean-up.
        replaced = preflight.replaced_attempt
        if replaced is not None and replaced != keep:
            self.remove_attempt(replaced)

    def child(self, name: str) -> KvStorage:
        loc = _location.ParsedLocation(self.display, spec=self.spec).child(name)
        assert loc.spec is not None  # the child of a spec location is one
        return KvStorage(loc.spec, display=loc.display, kv=self.kv / f"{name}/")

    def remove_entry(self, name: str) -> None:
        """Deletes every key under ``name/`` (one request)."""
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
