"""The only module that talks to jax.distributed's coordination service.

A collective operation (one ``save`` or ``restore``) runs as a sequence of
phases. After each phase's work every process waits at a barrier with a
timeout, having written only what others must read (a failure, the
primary's payload, an agreement counter), then makes one listing that says
whether any process failed and, if so, raises the *same* error, naming the
process(es) at fault. So no process fails alone, nothing waits forever, and
no process reads every other's status: at most 4 calls per process per
phase, and at most 4N at the coordination service for N processes, the
primary's extra calls and clean-up included (docs/protocol.md, Phases).

Barriers and keys are namespaced by an operation counter. All processes call
collective operations in the same order (SPMD), so the counters agree.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import re
import threading
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from distckpt import _faults, errors
from distckpt.errors import BarrierTimeoutError, DistckptError, OutOfSpaceError, ProcessFailure

_op_counter = itertools.count()
T = TypeVar("T")
_BLOB_PART = 1 << 20  # stay well under the coordination service's message limit


def client() -> Any:
    """The coordination-service client, or None without jax.distributed."""
    try:
        from jax._src.distributed import global_state
    except ImportError:  # pragma: no cover - layout of a future jax
        return None
    return global_state.client


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def _late_tasks(message: str) -> list[int]:
    """The task ids a coordination-service barrier timeout names as late, if it does."""
    _, found, rest = message.partition("timed out task names:")
    if not found:
        return []
    late = []
    for line in rest.strip().splitlines():
        m = re.fullmatch(r"\s*(?:\S*task:)?(\d+)\s*", line)
        if m is None:
            break
        late.append(int(m.group(1)))
    return sorted(set(late))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def bounded(fn: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """``fn()`` (a collective through the job's devices), or ``BarrierTimeoutError`` after
    ``timeout_s``.

    A device collective waits for every process with no deadline of its own; a
    process that is stopped, or in another collective, would hold the others
    forever. ``fn`` runs on a helper thread while this one waits with the
    deadline (the caller's thread issues nothing meanwhile, so collectives stay
    in the same order on every process). After a timeout the collective may
    still be pending in the runtime: the job cannot go on and must be restarted.
    """
    result: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="distckpt-collective", daemon=True).start()
    if not done.wait(timeout_s):
        raise BarrierTimeoutError(
            f"{what}: the collective did not finish within {timeout_s:g} s on process "
            f"{process_index()}; some process is not taking part (it stopped, or waits in "
            "another collective: look at its log). The job cannot go on: restart it (steps "
            "already written are intact)."
        )
    if failure:
        raise failure[0]
    return result[0]


class Collective:
    """One collective operation, run phase by phase on every process.

    Args:
      op: what is being done, for messages ("save", "restore").
      where: the checkpoint location, for messages.
      timeout_s: the longest any phase may wait for the slowest process.
    """

    def __init__(self, op: str, where: str, timeout_s: float):
        self.op, self.where, self.timeout_s = op, where, timeout_s
        self.seq = next(_op_counter)
        self.ns = f"distckpt/{self.seq}"
        self.pid, self.count = process_index(), process_count()
        self.client = client() if self.count > 1 else None
        # Agreement by counters needs key_value_increment (present in the JAX
        # versions tested); without it every payload is read to compare.
        self._counting = hasattr(self.client, "key_value_increment")
        self._local_blobs: dict[str, bytes] = {}  # blobs of a single-process run
        # The blobs the primary's listing of a ``collect_blobs`` phase found, by key.
        self._listed_blobs: dict[str, bytes] | None = None

    @property
    def is_primary(self) -> bool:
        return self.pid == 0

    def run(
        self,
        phase: str,
        fn: Callable[[], Any],
        *,
        last: bool = False,
        share: bool = False,
        agree: Callable[[Any], Any] | None = None,
        disagree: Callable[[list[Any]], None] | None = None,
        collect_blobs: bool = False,
    ) -> Any:
        """Runs ``fn`` here, then waits for every process to finish the phase.

        ``last`` marks the operation's final phase: every process then also
        waits until all have read what it needs, so that the primary (which
        hosts the coordination service) cannot return and exit while
        another process still reads from it.

        ``share`` returns the primary's payload on every process (one read);
        without it ``run`` returns None.

        ``agree``, if given, maps this process's payload to what every
        process must share (a location, a commit, a tree's fingerprint).
        Each process adds one to a counter named by the digest of its value;
        after the barrier, the value is shared iff its counter equals the
        process count, which every process learns with one read. Only when
        they differ are all payloads read, and ``disagree(payloads)`` raises
        the error that names who differs (the same on every process). The
        one process whose increment brings the counter to the process count
        knows that without the listing, and skips it unless ``share`` (the
        listing brings the primary's payload).

        ``collect_blobs``: the primary's listing after the barrier is of the
        whole operation (this phase's failures and every blob put so far),
        so that ``get_blobs`` in a later phase needs no call of its own.

        Cost per process in the common path: the barrier and one listing
        (of the agreement counters with ``agree``, else of the failures, with
        the primary's payload in it when ``share``), an increment with
        ``agree``, the read barrier with ``last``; the primary also writes
        its payload and, with ``last``, deletes the operation's keys. Never
        every other process's status. So a phase costs at most 4N calls at
        the coordination service for N processes: with ``agree`` and
        ``last`` (a restore), the listing one process skips pays for the
        primary's clean-up.

        Returns:
          With ``share``, the primary's return value of ``fn`` (JSON-able),
          on every process; else None.

        Raises:
          BarrierTimeoutError: some process did not finish within the timeout.
          The error a process raised, on every process: the same
          ``DistckptError`` subclass if it was one, else ``ProcessFailure``.
          What ``disagree`` raises (else ``InconsistentProcessesError``)
          when the processes' ``agree`` values differ.
        """
        local_error: Exception | None = None
        payload = None
        try:
            _faults.hit(f"{self.op}.{phase}")
            payload = fn()
        except Exception as e:  # noqa: BLE001 - every error must reach the other processes
            local_error = self._typed(e)
        _faults.hit(f"{self.op}.{phase}.barrier")
        if self.client is None:
            if local_error is not None:
                raise local_error
            return payload if share else None

        base = f"{self.ns}/{phase}"
        # Nothing is written on success but what others must read: the
        # primary's payload (``share``) and the agreement counters; a failure
        # is written where everyone looks for the outcome.
        votes = 0  # with counters: this process's agreement counter, once it added to it
        if local_error is None:
            if self.is_primary and share:
                self.client.key_value_set(
                    f"{base}/{self._shared_dir(agree)}/shared", json.dumps(payload)
                )
            if agree is not None and self._counting:
                votes = self.client.key_value_increment(self._agree_key(phase, agree(payload)), 1)
            elif agree is not None:  # no counters: every payload is compared after the barrier
                self.client.key_value_set(f"{base}/payload/{self.pid}", json.dumps(payload))
        else:
            status = {
                "type": type(local_error).__name__,
                "message": _describe(local_error),
                # The details a caller may inspect travel with the error.
                "problems": list(getattr(local_error, "problems", []) or []),
                "missing": list(getattr(local_error, "missing", []) or []),
            }
            self.client.key_value_set(f"{base}/outcome/failed-{self.pid}", json.dumps(status))
        try:
            self.client.wait_at_barrier(base, self._timeout_ms())
        except jax.errors.JaxRuntimeError as e:
            # The slow path: whom the coordination service names as late,
            # and what the processes that failed said.
            missing = _late_tasks(str(e))
            failed, _ = self._outcome(base)
            detail = "".join(f"\n  process {p}: {s['message']}" for p, s in failed.items())
            err = BarrierTimeoutError(
                f"{self.op} of {self.where}: phase '{phase}' timed out after "
                f"{self.timeout_s:g} s on process {self.pid}; processes {missing or '?'} did "
                f"not arrive.{detail}\nIf the phase is legitimately slow, raise timeout_s= "
                "or DISTCKPT_TIMEOUT_S; otherwise look at the logs of those processes.",
                missing,
            )
            err.add_note(f"coordination service said: {e}")
            raise err from local_error
        # One listing per process in the common path: with ``agree``, the
        # counters (all processes agree and none failed iff this process's
        # counter holds them all; a failed process adds to none) and the
        # shared payload; otherwise the failures (usually none) and the shared
        # payload. Never every process's status.
        outcome: Exception | None = None
        shared: Any = None
        clean = False
        if agree is not None and local_error is None and self._counting:
            if int(votes) == self.count and not share:
                # This process cast the last of N votes for one value: every
                # process succeeded (a failed one votes for nothing) and all
                # agree. It needs no listing (unless for the primary's
                # payload); in the common path exactly one process skips it,
                # which pays for the primary's clean-up at the end of a last
                # phase (a restore: 4N calls, not 4N + 1).
                clean = True
            else:
                counters = dict(self.client.key_value_dir_get(f"{base}/agree/"))
                clean = int(counters.get(self._agree_key(phase, agree(payload)), 0)) == self.count
                shared = counters.get(f"{base}/agree/shared")
        if not clean:
            failed, shared_here = self._outcome(base, collect_blobs and self.is_primary)
            shared = shared if shared is not None else shared_here
            if failed:
                outcome = self._combined(phase, failed)
            elif agree is not None:
                outcome = self._disagreement(phase, base, payload, agree, disagree)
        primary: Any = None
        if share and outcome is None:
            if self.is_primary:
                primary = payload
            elif shared is None:
                raise BarrierTimeoutError(
                    f"{self.op} of {self.where}: phase '{phase}' ended without the primary's "
                    "result; the coordination service lost it"
                )
            else:
                primary = json.loads(shared)
        if last:
            _faults.hit(f"{self.op}.final")
            try:
                self.client.wait_at_barrier(f"{base}/read", self._timeout_ms())
                if self.is_primary:  # everyone has read: this operation's keys can go
                    self.client.key_value_delete(f"{self.ns}/")
            except jax.errors.JaxRuntimeError:
                pass  # the outcome is decided; a peer that left early changes nothing
        if outcome is not None:
            raise outcome from local_error
        return primary

    def _shared_dir(self, agree: Callable[[Any], Any] | None) -> str:
        """Where the primary's payload goes: next to what every process lists anyway
        (the agreement counters, else the failures)."""
        return "agree" if agree is not None and self._counting else "outcome"

    def _outcome(
        self, base: str, collect_blobs: bool = False
    ) -> tuple[dict[int, dict], str | None]:
        """The failures of a phase, by process, and the primary's payload if it is there.

        ``collect_blobs``: list the whole operation instead, in one call, and
        keep the blobs found for ``get_blobs``.
        """
        assert self.client is not None  # run() returns before this in a single process
        outcome = f"{base}/outcome/"
        if collect_blobs:
            listed = self.client.key_value_dir_get_bytes(f"{self.ns}/")
            blobs = f"{self.ns}/blob/"
            self._listed_blobs = {k: v for k, v in listed if k.startswith(blobs)}
            entries = [(k, v.decode()) for k, v in listed if k.startswith(outcome)]
        else:
            entries = self.client.key_value_dir_get(outcome)
        failed, shared = {}, None
        for k, v in entries:
            name = k.rsplit("/", 1)[-1]
            if name == "shared":
                shared = v
            elif name.startswith("failed-"):
                try:
                    failed[int(name.removeprefix("failed-"))] = json.loads(v)
                except ValueError:
                    continue
        return dict(sorted(failed.items())), shared

    def _agree_key(self, phase: str, value: Any) -> str:
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]
        return f"{self.ns}/{phase}/agree/{digest}"

    def _disagreement(
        self,
        phase: str,
        base: str,
        payload: Any,
        agree: Callable[[Any], Any],
        disagree: Callable[[list[Any]], None] | None,
    ) -> Exception | None:
        """The error for processes whose ``agree`` values differ; None if they turn out
        to agree (a client without counters checks this way).

        Only here are every process's payloads read: with counters, each
        process publishes its own now (every process reaches this point
        alike: no counter holds all of them) and waits for the others.
        """
        assert self.client is not None  # a multi-process job
        if self._counting:
            self.client.key_value_set(f"{base}/payload/{self.pid}", json.dumps(payload))
            try:
                self.client.wait_at_barrier(f"{base}/payloads", self._timeout_ms())
            except jax.errors.JaxRuntimeError as e:
                return BarrierTimeoutError(
                    f"{self.op} of {self.where}: the processes disagree in phase '{phase}', "
                    f"and not all of them said how within {self.timeout_s:g} s ({e})"
                )
        published = self._statuses(f"{base}/payload")
        payloads = [published.get(p) for p in range(self.count)]
        values = [json.dumps(agree(p), sort_keys=True) for p in payloads]
        if all(v == values[0] for v in values):
            return None
        try:
            if disagree is not None:
                disagree(payloads)
        except Exception as e:  # noqa: BLE001 - returned, raised by the caller on every process
            return e
        return errors.InconsistentProcessesError(
            f"{self.op} of {self.where}: the processes disagree in phase '{phase}' "
            "(every process must pass the same arguments to a collective call)"
        )

    def _typed(self, e: Exception) -> Exception:
        """A full disk, whatever raised it, becomes ``OutOfSpaceError`` (chained)."""
        if isinstance(e, OSError) and not isinstance(e, OutOfSpaceError):
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                typed = OutOfSpaceError(
                    f"{self.op} of {self.where}: out of space on process {self.pid} "
                    f"({e.strerror or e}{': ' + e.filename if e.filename else ''}). Nothing was "
                    "committed and older checkpoints are intact; free space (fewer kept "
                    "steps) or save elsewhere."
                )
                typed.__cause__ = e
                return typed
        return e

    def _timeout_ms(self) -> int:
        return max(1, int(self.timeout_s * 1000))

    def _statuses(self, key: str) -> dict[int, dict]:
        assert self.client is not None  # run() returns before this in a single process
        out = {}
        for k, v in self.client.key_value_dir_get(key):
            try:
                out[int(k.rsplit("/", 1)[-1])] = json.loads(v)
            except ValueError:
                continue
        return out

    def _combined(self, phase: str, failed: dict[int, dict]) -> DistckptError:
        first = next(iter(failed.values()))
        cls = getattr(errors, first["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, DistckptError)):
            cls = ProcessFailure
        pids = list(failed)
        lines = "".join(f"\n  process {p}: {s['message']}" for p, s in failed.items())
        err = cls(
            f"{self.op} of {self.where} failed in phase '{phase}' on process(es) {pids}:{lines}"
        )
        err.processes = pids
        # Details a caller may inspect travel with the error.
        # Processes that fail alike (every process finds the same tree
        # mismatch) report each problem once. Set on whichever subclass was
        # raised, though only some declare them (hence the two ignores).
        err.problems = list(  # type: ignore[attr-defined]
            dict.fromkeys(p for s in failed.values() for p in s.get("problems", []))
        )
        err.missing = sorted({m for s in failed.values() for m in s.get("missing", [])})  # type: ignore[attr-defined]
        return err

    # Large payloads (per-process write reports) go through blobs that only
    # the primary reads, instead of through the status every process reads.

    def put_blob(self, name: str, data: bytes) -> None:
        if name.startswith("report/"):
            _faults.hit(f"{self.op}.report")
        if self.client is None:
            self._local_blobs[name] = data
            return
        packed = zlib.compress(data, 1)
        parts = [packed[i : i + _BLOB_PART] for i in range(0, len(packed), _BLOB_PART)] or [b""]
        for i, part in enumerate(parts):
            self.client.key_value_set_bytes(f"{self.ns}/blob/{name}/{i}", part)
        self.client.key_value_set(f"{self.ns}/blob/{name}/n", str(len(parts)))

    def get_blobs(self, family: str) -> list[bytes]:
        """Blob ``<family>/<p>`` of every process ``p``, in one listing.

        For the primary, after the barrier of the phase in which every
        process put its blob: one round trip for all N, not 2N, or none if
        a ``collect_blobs`` phase's listing already brought them. A blob not
        wholly there yet is waited for, with the timeout.
        """
        if self.client is None:
            return [self._local_blobs[f"{family}/{p}"] for p in range(self.count)]
        prefix = f"{self.ns}/blob/{family}/"
        if self._listed_blobs is not None:
            listed = [(k, v) for k, v in self._listed_blobs.items() if k.startswith(prefix)]
            for key, _ in listed:  # each family is read once: let it go
                del self._listed_blobs[key]
        else:
            listed = self.client.key_value_dir_get_bytes(prefix)
        found: dict[int, dict[str, bytes]] = {}
        for key, value in listed:
            process, _, part = key.rpartition(f"blob/{family}/")[2].partition("/")
            found.setdefault(int(process), {})[part] = value
        out = []
        for p in range(self.count):
            got = found.get(p, {})
            n = int(got["n"]) if "n" in got else -1
            if n < 0 or any(str(i) not in got for i in range(n)):
                out.append(self.get_blob(f"{family}/{p}"))
                continue
            out.append(zlib.decompress(b"".join(got[str(i)] for i in range(n))))
        return out  # the operation's last phase deletes them with its namespace

    def get_blob(self, name: str) -> bytes:
        if self.client is None:
            return self._local_blobs[name]
        try:
            n = int(
                self.client.blocking_key_value_get(f"{self.ns}/blob/{name}/n", self._timeout_ms())
            )
            parts = [
                self.client.blocking_key_value_get_bytes(
                    f"{self.ns}/blob/{name}/{i}", self._timeout_ms()
                )
                for i in range(n)
            ]
        except jax.errors.JaxRuntimeError as e:
            raise BarrierTimeoutError(
                f"{self.op} of {self.where}: timed out after {self.timeout_s:g} s waiting for {name}"
            ) from e
        self.client.key_value_delete(f"{self.ns}/blob/{name}/")
        return zlib.decompress(b"".join(parts))
