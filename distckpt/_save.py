"""``save``: flatten -> plan -> stage -> write -> report -> commit, as phases on every process."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import crc32c
import jax
import numpy as np

from distckpt import (
    _chunks,
    _codec,
    _commit,
    _faults,
    _index,
    _knobs,
    _layout,
    _multihost,
    _plan,
    _procstate,
    _reshard,
    _runtime,
    _stage,
    _statearrays,
    _tree,
)
from distckpt._index import Grid
from distckpt._location import Location
from distckpt._manifest import Manifest
from distckpt._plan import ChunkRecord, FileWrite, LeafSpec
from distckpt._storage import Preflight, Storage, open_storage
from distckpt.errors import DistckptError, TreeMismatchError


def save(
    directory: Location,
    tree: Any,
    *,
    overwrite: bool = False,
    metadata: Any = None,
    pipeline: _procstate.Checkpointable | None = None,
    compression: str | None = None,
    compression_level: int = 3,
    timeout_s: float | None = None,
) -> None:
    """Saves ``tree`` to ``directory``; collective: every process calls it.

    Each process writes only the shards it owns (the ``replica_id == 0``
    copies), so replicated data is stored once; the primary process commits.
    Returns once the checkpoint is committed and visible to every process.

    Args:
      directory: a filesystem path (shared by all processes), an ``s3://``,
        ``gs://`` or ``memory://`` URL, or a TensorStore kvstore spec (a dict).
      tree: a pytree of ``jax.Array`` (any sharding, typed PRNG keys
        included), numpy arrays, int, float, bool, str and None. Numpy and
        Python leaves are taken from the primary process.
      overwrite: replace a committed checkpoint at ``directory``. The old one
        stays readable until the new one commits.
      metadata: JSON-serialisable user data stored in the manifest.
      pipeline: a ``distckpt.Checkpointable`` (a data iterator): each
        process's ``get_state()`` is committed with the tree, and
        ``restore(..., pipeline=)`` gives each process its own back. The
        state's arrays (numpy, ``jax.Array``, PRNG keys) are stored in the
        data files after the tree's leaves, checksummed, and come back as
        the same types; only the rest is in the commit record. Per-process
        arrays must have the same shapes and dtypes on every process.
      compression: ``"zstd"`` compresses every chunk of every array (format
        version 2; checksums cover the stored bytes); None (the default)
        stores raw bytes, which is fastest.
      compression_level: the zstd level, 1 (fast) to 22 (small).
      timeout_s: longest wait for the slowest process at any synchronisation
        point (default 300 s or ``DISTCKPT_TIMEOUT_S``).

    Raises:
      CheckpointExistsError: a checkpoint is there and ``overwrite`` is False.
      TreeMismatchError: processes passed trees of different structure.
      BarrierTimeoutError: a process did not arrive in time (named).
      ProcessFailure: a process raised (named, with its error), on every process.

    Example::

      mesh = jax.make_mesh((jax.device_count(),), ("x",))
      x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("x")))
      distckpt.save("/ckpt/step_1", {"x": x, "step": 1})
    """
    job = SaveJob(
        directory,
        tree,
        overwrite=overwrite,
        metadata=metadata,
        pipeline=pipeline,
        compression=compression,
        compression_level=compression_level,
        timeout_s=timeout_s,
    )
    with _runtime.paused_gc():
        job.start(copy=False)
        job.finish()


@dataclass(frozen=True)
class SaveStats:
    """Timings and sizes of one committed save (seconds, bytes), the same on every process.

    A summary of constant size whatever the process count: the primary
    shares it with every process through the coordination service. Each
    process's bytes are in the step's manifest, ``save_stats`` (see
    ``distckpt.metadata(path).save_stats["bytes_per_process"]``).
    """

    blocking_s: float  # longest time any process spent in start(): prepare + host copies
    write_s: float  # longest time any process spent writing and fsyncing its files
    commit_s: float  # primary: merging reports, checking coverage, building the manifest
    total_bytes: int  # of every data file
    max_process_bytes: int  # the most bytes one process wrote
    max_process: int  # the process that wrote them (the lowest-numbered on a tie)
    files: int

    @classmethod
    def summarise(
        cls,
        bytes_per_process: list[int],
        *,
        blocking_s: float,
        write_s: float,
        commit_s: float,
        files: int,
    ) -> SaveStats:
        """The summary of a save whose process ``p`` wrote ``bytes_per_process[p]``."""
        most = max(range(len(bytes_per_process)), key=bytes_per_process.__getitem__)
        return cls(
            blocking_s=blocking_s,
            write_s=write_s,
            commit_s=commit_s,
            total_bytes=sum(bytes_per_process),
            max_process_bytes=bytes_per_process[most],
            max_process=most,
            files=files,
        )

    def to_json(self) -> dict:
        return asdict(self)


class SaveJob:
    """One collective save, split where an async save splits.

    ``start`` runs in the caller: it flattens the tree, agrees on it with the
    other processes, lets the primary create the attempt, and takes what
    this process will write off the devices (copies when ``copy=True``, so
    the caller may donate or overwrite its arrays as soon as it returns).
    ``finish`` writes, reports and commits; it may run on a background
    thread because it talks to other processes only through the
    coordination service, never through XLA collectives.
    """

    def __init__(
        self,
        directory: Location,
        tree: Any,
        *,
        overwrite: bool = False,
        metadata: Any = None,
        pipeline: _procstate.Checkpointable | None = None,
        compression: str | None = None,
        compression_level: int = 3,
        timeout_s: float | None = None,
        manager: dict | None = None,
    ):
        _codec.check(compression, compression_level)
        self.storage = open_storage(directory)
        path = self.storage.local_path
        if path is not None and os.path.dirname(path) == path:
            raise ValueError(
                f"refusing to save into the filesystem root {path!r}: a checkpoint is a "
                "directory of its own; pass a path such as /ckpt/run1/step_1000"
            )
        self.coll = _multihost.Collective(
            "save", self.storage.display, _knobs.get("timeout_s", timeout_s)
        )
        self._tree = tree  # held until start() has taken what it writes
        self.overwrite, self.metadata, self.manager = overwrite, metadata, manager
        self.pipeline = pipeline
        self.compression, self.compression_level = compression, compression_level
        self.attempt: str | None = None  # known to the primary from prepare on
        self.prepared: _Prepared | None = None  # set by start()
        self.staged: _Staged | None = None  # set by start(), released by finish()

    @property
    def record(self) -> dict | None:
        """The manager's record committed with this save: the primary's (after ``start``)."""
        return self.prepared.manager if self.prepared is not None else self.manager

    def start(self, *, copy: bool, pool: _stage.HostPool | None = None) -> None:
        """Collective: prepare phase and host staging. Raises on every process alike."""
        began = time.perf_counter()
        local: dict[str, Any] = {}  # what the prepare phase found on this process only
        try:
            where = self.storage.display

            def disagree(payloads: list[dict]) -> None:
                _check_same_target(payloads)
                _check_same_tree(payloads, where)

            try:
                primary = self.coll.run(
                    "prepare",
                    lambda: self._prepare(local),
                    share=True,
                    agree=_agreement,
                    disagree=disagree,
                )
            except TreeMismatchError as e:
                holder = local.get("holder")
                if holder is None:
                    raise
                raise _statearrays.explain(e, holder) from e
            self.attempt = primary["attempt"]
            self.prepared = _Prepared(
                attempt=primary["attempt"],
                specs=local["specs"],
                structure=local["structure"],
                user_metadata=local["user_metadata"],
                # The primary's record (step, metrics) on every process: the
                # manager ranks and retains by what was committed.
                manager=primary["manager"],
                pipeline_mode=primary["pipeline"],
                pipeline_arrays=local["pipeline_arrays"],
                preflight=local.get("preflight"),
            )
            leaves = [leaf for _, leaf in local["items"]]
            per_process = frozenset(primary.get("per_process", ()))
            shards, buffers = _stage.stage(
                leaves,
                self.prepared.specs,
                is_primary=self.coll.is_primary,
                per_process=per_process,
                copy=copy,
                pool=pool,
            )
            grids, plan = self._grids(leaves, per_process, shards)
        except BaseException:
            self._discard()
            raise
        finally:
            self._tree = None  # the caller owns its arrays again
        self.staged = _Staged(shards, buffers, pool, time.perf_counter() - began, grids, plan)

    def _grids(
        self, leaves: list[Any], per_process: frozenset[int], shards: list
    ) -> tuple[list[Grid | None], str]:
        """Every stored leaf's shard grid, and this process's check of its own writes
        against it (docs/protocol.md, "Coverage")."""
        assert self.prepared is not None
        grids: list[Grid | None] = []
        for i, (leaf, spec) in enumerate(zip(leaves, self.prepared.specs, strict=True)):
            primary_writes = i in per_process
            if not spec.stored or (primary_writes and not self.coll.is_primary):
                grids.append(None)  # nothing to plan, or the primary's own value
            else:
                grids.append(_stage.grid(leaf, spec, primary_writes=primary_writes))
        problems = _index.check_own_writes(grids, shards, self.coll.pid)
        if problems:
            lines = [f"{self.prepared.specs[leaf].display}: {why}" for leaf, why in problems]
            raise DistckptError(
                f"save to {self.storage.display}: process {self.coll.pid} holds shards that "
                "differ from the save's plan:\n  "
                + "\n  ".join(lines[:5])
                + "\nNothing was committed. This is a bug in distckpt; please report it with "
                "the arrays' shardings."
            )
        # What every process must share: the grids of the leaves they may write.
        shared = [None if i in per_process else g for i, g in enumerate(grids)]
        return grids, _index.plan_digest(shared)

    def finish(self) -> SaveStats:
        """Collective: write and commit phases. Returns the same stats on every process."""
        assert self.prepared is not None and self.staged is not None, "start() first"
        prepared, staged = self.prepared, self.staged
        try:
            # The primary's listing after the write barrier also brings every
            # report (and pipeline state): the commit phase reads none of them
            # again, one call fewer there (3N + 2, not 3N + 3).
            self.coll.run("write", lambda: self._write(prepared, staged), collect_blobs=True)
            stats = self.coll.run(
                "commit", lambda: self._commit(prepared, staged.grids), last=True, share=True
            )
        except BaseException:
            self._discard()
            raise
        finally:
            if staged.pool is not None:
                staged.pool.recycle()
            self.staged = None
        return SaveStats(**stats)

    def _prepare(self, local: dict[str, Any]) -> dict:
        """Every process: describes the tree; the primary also checks the location and
        creates the attempt. Returns what the others must know (JSON)."""
        items, structure = _tree.walk(self._tree)  # any depth; records the containers
        holder = None
        arrays: list[Any] = []
        if self.pipeline is not None:
            # Captured now, while the caller waits: the state of this step. Its
            # arrays are leaves after the tree's (the structure record is the tree's).
            arrays, holder = _statearrays.split(self.pipeline)
            local["holder"] = holder
            items = items + _statearrays.leaf_items(arrays)
        specs: list[LeafSpec] = []
        problems: list[str] = []
        for path, leaf in items:
            spec, problem = _stage.describe(path, leaf)
            if problem:
                problems.append(problem)
            else:
                assert spec is not None  # describe() gives a spec or a problem
                specs.append(spec)
        if problems:
            raise TypeError("the tree has leaves distckpt cannot save:\n  " + "\n  ".join(problems))
        _check_unique_paths(specs)
        if self.compression is not None:
            specs = [
                dataclasses.replace(s, compression=self.compression) if s.stored else s
                for s in specs
            ]
        local.update(
            items=items,
            specs=specs,
            pipeline_arrays=len(arrays),
            structure=structure,
            user_metadata=_json_roundtrip(self.metadata),
        )
        out: dict[str, Any] = {  # JSON, to every process
            "fingerprint": _fingerprint(specs),
            "pipeline": None,
            "where": self.storage.display,
            "manager": self.manager,
        }
        if holder is not None:
            raw = _procstate.capture(holder, self.coll.pid)
            self.coll.put_blob(f"pipeline/{self.coll.pid}", raw)
            out.update(_procstate.summary(holder, raw))
        self.pipeline = None
        if self.coll.is_primary and self.coll.count > 1:
            # Who writes an array that lives on one process's devices depends
            # on whether that process is the primary; the others learn it here.
            out["per_process"] = _stage.per_process_leaves([leaf for _, leaf in items], specs)
        if self.coll.is_primary:
            estimate = sum(s.nbytes for s in specs)
            local["preflight"] = _commit.preflight(
                self.storage, overwrite=self.overwrite, estimated_bytes=estimate
            )
            self.attempt = out["attempt"] = _layout.new_attempt()
            self.storage.prepare_attempt(self.attempt)
        return out

    def _write(self, prepared: _Prepared, staged: _Staged) -> dict:
        began = time.perf_counter()
        self.storage.check_attempt_visible(prepared.attempt)
        chunk_bytes, max_chunks = _knobs.get("chunk_bytes"), _knobs.get("max_chunks_per_shard")
        memory = _plan.save_memory(
            _knobs.get("memory_bytes"),
            threads=_knobs.get("io_threads"),
            largest_chunk=_plan.largest_chunk(
                staged.shards, chunk_bytes=chunk_bytes, max_chunks=max_chunks
            ),
            segment_bytes=_knobs.get("segment_bytes"),
            fetch_copies=any(
                isinstance(b, _stage.DeviceShard) and b.piecewise for b in staged.buffers.values()
            ),
            holds_files=self.storage.holds_whole_files(),
        )
        files = _plan.plan_writes(
            staged.shards,
            process=self.coll.pid,
            chunk_bytes=chunk_bytes,
            segment_bytes=memory.segment_bytes,
            max_chunks=max_chunks,
            piece_bytes=memory.piece_bytes,
        )
        codecs = {
            i: (s.compression, self.compression_level)
            for i, s in enumerate(prepared.specs)
            if s.compression is not None
        }
        records = _write_files(
            self.storage, prepared.attempt, files, staged.buffers, codecs, memory.writers
        )
        index = _chunks.write_index(
            self.storage, prepared.attempt, self.coll.pid, records, staged.grids
        )
        self.storage.finish_attempt_writes(prepared.attempt)
        sizes = {fw.name: 0 for fw in files}
        for r in records:  # what was written: less than planned where compressed
            sizes[r.file] = max(sizes[r.file], r.offset + r.nbytes)
        timing = {"stage_s": staged.blocking_s, "write_s": time.perf_counter() - began}
        planned = sum(_reshard.box_size(box) * itemsize for _, box, itemsize in staged.shards)
        report = _commit.Report(
            process=self.coll.pid,
            files=sizes,
            index=index,
            plan=staged.plan,
            planned_bytes=planned,
            timing=timing,
        )
        self.coll.put_blob(f"report/{self.coll.pid}", report.to_json())
        return {}

    def _commit(self, prepared: _Prepared, grids: list[Grid | None]) -> dict | None:
        if not self.coll.is_primary:
            return None
        assert prepared.preflight is not None  # the primary's own
        began = time.perf_counter()
        reports = [_commit.Report.from_json(r) for r in self.coll.get_blobs("report")]
        manifest = _commit.build_root(
            attempt=prepared.attempt,
            specs=prepared.specs,
            grids=grids,
            reports=reports,
            process_count=self.coll.count,
            device_count=jax.device_count(),
            user_metadata=prepared.user_metadata,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            versions=_versions(),
            structure=prepared.structure,
        )
        stats, manifest.save_stats = save_stats(
            manifest, [r.timing for r in reports], commit_s=time.perf_counter() - began
        )
        manifest.manager = prepared.manager
        manifest.process_state = self._gather_pipeline_states(
            prepared.pipeline_mode, prepared.pipeline_arrays
        )
        _commit.commit(self.storage, manifest, prepared.preflight)
        return stats.to_json()  # to every process: its size does not grow with them

    def _gather_pipeline_states(self, mode: str | None, arrays: int) -> dict | None:
        """The manifest entry for the processes' pipeline states (primary only)."""
        if mode is None:
            return None
        states = [raw.decode() for raw in self.coll.get_blobs("pipeline")]
        return _procstate.manifest_entry(mode, states, arrays)

    def _discard(self) -> None:
        if self.coll.is_primary and self.attempt is not None:
            _commit.discard_unless_committed(self.storage, self.attempt)


@dataclass(frozen=True)
class _Prepared:
    """What the prepare phase decided: shared by all processes, but for ``preflight``."""

    attempt: str
    specs: list[LeafSpec]
    structure: list | None  # the tree's containers, for the manifest
    user_metadata: Any
    manager: dict | None  # the primary's record
    pipeline_mode: str | None
    pipeline_arrays: int  # the pipeline state's arrays: the last leaves of ``specs``
    preflight: Preflight | None  # the primary's findings at the location; None elsewhere


@dataclass(frozen=True)
class _Staged:
    """What this process writes, off the devices."""

    shards: list
    buffers: dict  # (leaf, shard box) -> host array, or a thunk fetching it
    pool: _stage.HostPool | None  # where the buffers go back after the save
    blocking_s: float
    grids: list[Grid | None]  # the plan: each stored leaf's shard grid (_stage.grid)
    plan: str  # digest of the grids every process must share (_index.plan_digest)


# Without a hint, the kernel starts writing dirty pages to disk only past
# vm.dirty_background_ratio (10% of RAM by default), i.e. usually not before
# the fsync at the end, so the disk idles while we checksum and copy and then
# the fsync waits for all of it. Asking for writeback every few MiB overlaps
# the two. It is only a hint: durability still comes from fsync.
_WRITEBACK_BYTES = 8 << 20


def _load_sync_file_range() -> Any:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE: start writeback of the range, do not wait for it

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, write)  # errors (EINVAL on odd filesystems) only lose the hint

    return start


_start_writeback = _load_sync_file_range()


def _write_files(
    storage: Storage,
    attempt: str,
    files: list[FileWrite],
    staged: dict[tuple[int, _reshard.Box], np.ndarray | _stage.DeviceShard],
    codecs: dict[int, tuple[str, int]] | None = None,
    writers: int | None = None,
) -> list[ChunkRecord]:
    """Writes this process's data files in parallel; returns the chunk records.

    ``codecs`` maps a leaf index to (compression, level) for compressed leaves;
    ``writers`` caps the writer threads (default ``io_threads``), which the
    memory budget may lower (``_plan.save_memory``).
    """
    codecs = codecs or {}

    def write_file(fw: FileWrite) -> list[ChunkRecord]:
        writer = storage.writer(attempt, fw.name)
        compress = {leaf: _codec.compressor(*c) for leaf, c in codecs.items()}
        records, offset = [], 0
        # Strided chunks are gathered into one reused buffer: a fresh array
        # per chunk would fault in new pages for every byte written.
        scratch = np.empty(max((c.nbytes for c in fw.chunks), default=0), np.uint8)
        # A local file's descriptor, if the storage has one (object stores do not).
        fd = writer.fd() if _start_writeback is not None else None
        kicked = 0  # bytes of this file handed to the disk so far
        # The one piece of a shard this thread holds in host memory, by (leaf, box).
        held: tuple[tuple[int, _reshard.Box], np.ndarray] | None = None
        try:
            for c in fw.chunks:
                src = staged[(c.leaf, c.shard)]
                # Only a copying fetch is done piece by piece; a view or a host
                # array costs nothing more whole.
                unit = c.piece if isinstance(src, _stage.DeviceShard) and src.piecewise else c.shard
                if held is None or held[0] != (c.leaf, unit):
                    held = None  # chunks of a piece are consecutive: let the last one go first
                    held = (
                        (c.leaf, unit),
                        src.fetch(unit) if isinstance(src, _stage.DeviceShard) else src,
                    )
                part = held[1][_reshard.relative(c.box, unit)]
                if part.flags.c_contiguous:
                    # numpy's stubs give ndarray __buffer__ only on Python >= 3.12 (mypy checks 3.11)
                    view = memoryview(part.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
                else:
                    packed = scratch[: c.nbytes].view(part.dtype).reshape(part.shape)
                    np.copyto(packed, part)
                    # numpy's stubs give ndarray __buffer__ only on Python >= 3.12 (mypy checks 3.11)
                    view = memoryview(scratch[: c.nbytes])  # type: ignore[arg-type]
                del part
                if c.leaf in compress:
                    view = memoryview(compress[c.leaf](view))
                stored = view.nbytes
                records.append(
                    ChunkRecord(c.leaf, fw.name, offset, stored, crc32c.crc32c(view), c.box)
                )
                writer.write(view)
                del view
                if not offset:
                    _faults.hit("write.chunk")
                offset += stored
                if fd is not None and offset - kicked >= _WRITEBACK_BYTES:
                    _start_writeback(fd, kicked, offset - kicked)
                    kicked = offset
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return records

    threads = min(writers or _knobs.get("io_threads"), max(1, len(files)))
    with ThreadPoolExecutor(threads, thread_name_prefix="distckpt-write") as pool:
        per_file = list(pool.map(write_file, files))
    return [r for rs in per_file for r in rs]


def save_stats(
    manifest: Manifest, timings: list[dict[str, float]], *, commit_s: float
) -> tuple[SaveStats, dict]:
    """The summary of a save (``SaveStats``) and its manifest entry ``save_stats``:
    the summary with each process's bytes, ``bytes_per_process``.

    ``timings``: each process's report's (``stage_s``, ``write_s``).
    """
    per_process = [0] * manifest.process_count
    for info in manifest.files.values():
        per_process[info["process"]] += info["bytes"]
    stats = SaveStats.summarise(
        per_process,
        blocking_s=max(t["stage_s"] for t in timings),
        write_s=max(t["write_s"] for t in timings),
        commit_s=commit_s,
        files=len(manifest.files),
    )
    return stats, {**stats.to_json(), "bytes_per_process": per_process}


def _fingerprint(specs: list[LeafSpec]) -> str:
    doc = [[list(map(list, s.path)), s.kind, s.shape and list(s.shape), s.dtype] for s in specs]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()


def _agreement(payload: dict) -> list:
    """What every process of a save must share: the location, the manager's step, the
    tree's structure, shapes and dtypes, and the kind (and global state) of pipeline."""
    return [
        payload["where"],
        (payload["manager"] or {}).get("step"),
        payload["fingerprint"],
        payload["pipeline"],
        payload.get("pipeline_digest"),
    ]


def _check_same_target(prepared: list[dict]) -> None:
    """Refuses a save whose processes name different locations or manager steps."""
    keys = [(d["where"], (d["manager"] or {}).get("step")) for d in prepared]

    def describe(p: int) -> str:
        where, step = keys[p]
        return where + (f" (step {step})" if step is not None else "")

    _commit.refuse_if_different(
        keys,
        describe,
        "save: the processes named different checkpoints",
        "Nothing was committed. save is collective: pass the same location (and step) on "
        "every process.",
    )


def _check_same_tree(prepared: list[dict], where: str) -> None:
    differ = [p for p, d in enumerate(prepared) if d["fingerprint"] != prepared[0]["fingerprint"]]
    if differ:
        raise TreeMismatchError(
            f"save to {where}: processes {differ} passed a tree whose structure, shapes or dtypes "
            "differ from process 0's. save() is collective: every process must pass the same tree."
        )
    _procstate.check_agreement(prepared, where)


def _check_unique_paths(specs: list[LeafSpec]) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for s in specs:
        key = _tree.match_key(s.path)
        if key in seen:
            raise TypeError(
                f"leaves {seen[key]} and {s.display} have the same key path; rename one"
            )
        seen[key] = s.display


def _json_roundtrip(metadata: Any) -> Any:
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (dicts, lists, str, numbers): {e}"
        ) from None


def _versions() -> dict[str, str]:
    from distckpt import __version__

    return {
        "distckpt": __version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
