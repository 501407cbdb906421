"""Read-only looks at a checkpoint from one process: metadata, verify, is_committed."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distckpt import _chunks, _commit, _knobs, _plan, _procstate, _read, _tree
from distckpt._location import Location
from distckpt._storage import open_storage


@dataclass(frozen=True)
class LeafInfo:
    """One saved leaf, as ``metadata()`` describes it."""

    path: str  # as people read it, e.g. "['params']['w']"
    kind: str  # "array", "numpy", "prng_key", "python" or "none"
    shape: (
        tuple[int, ...] | None
    )  # for a PRNG key leaf: the shape of its key data (key shape + impl dims)
    dtype: str | None
    sharding: dict | None  # how it was laid out at save time
    nbytes: int  # bytes stored (0 for Python values, kept in the manifest)
    value: Any = None  # Python leaves only
    prng_impl: str | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a committed checkpoint holds, read without loading any array."""

    directory: str
    leaves: dict[str, LeafInfo]  # by path string, in save order
    process_count: int
    device_count: int
    user_metadata: Any
    format_version: int
    versions: dict[str, str]
    created: str
    total_bytes: int
    files: int
    # The LeafInfos in nested plain dicts and lists, shaped like the saved tree (the
    # arrays of a pipeline= state are in ``leaves``, under __pipeline_state__, not here).
    tree: Any
    save_stats: dict | None = None  # timings and bytes of the save that wrote it
    step: int | None = None  # set when a CheckpointManager wrote it
    metrics: dict | None = None  # the metrics saved with that step


@dataclass(frozen=True)
class VerifyReport:
    """A clean verification: what was checked and how long it took."""

    directory: str
    leaves: int
    files: int
    chunks: int
    bytes_checked: int
    seconds: float


def is_committed(directory: Location) -> bool:
    """True if a committed checkpoint is at ``directory`` (reads one small file)."""
    return open_storage(directory).read_manifest() is not None


def metadata(directory: Location) -> CheckpointInfo:
    """Describes a checkpoint without reading array data.

    Example::

      info = distckpt.metadata("/ckpt/step_1")
      for path, leaf in info.leaves.items():
          print(path, leaf.shape, leaf.dtype, leaf.sharding)
    """
    storage = open_storage(directory)
    m = _commit.load(storage)
    tree_leaves = len(m.leaves) - _procstate.array_leaves(
        m.process_state, [s.path for s in m.leaves], storage.display
    )
    leaves = {}
    for spec in m.leaves:
        leaves[spec.display] = LeafInfo(
            spec.display,
            spec.kind,
            spec.shape,
            spec.dtype,
            spec.sharding,
            spec.nbytes,
            spec.value,
            spec.impl,
        )
    info = CheckpointInfo(
        directory=storage.display,
        leaves=leaves,
        process_count=m.process_count,
        device_count=m.device_count,
        user_metadata=m.user_metadata,
        format_version=m.format_version,
        versions=m.versions,
        created=m.created,
        total_bytes=sum(f["bytes"] for f in m.files.values()),
        files=len(m.files),
        tree=_tree.unflatten_plain([(s.path, leaves[s.display]) for s in m.leaves[:tree_leaves]]),
        save_stats=m.save_stats,
        step=(m.manager or {}).get("step"),
        metrics=(m.manager or {}).get("metrics"),
    )
    return info


def verify(
    directory: Location, *, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Re-reads every stored byte; checks checksums, file sizes, chunk sizes and coverage.

    ``progress(bytes_checked, bytes_total)`` is called as the reading goes
    (about every 64 MiB) and once at the end.

    Returns:
      A ``VerifyReport`` when everything is intact.

    Raises:
      NotCommittedError: nothing committed at ``directory``.
      CorruptCheckpointError: lists every problem found (leaf path, file, bytes).
    """
    start = time.perf_counter()
    storage = open_storage(directory)
    m = _commit.load(storage)
    problems: list[str] = []
    with storage.reader(m.attempt) as reader:
        # Every index (format 3) is read and checked; damage is listed, not raised.
        all_chunks = [
            c for cs in _chunks.ChunkTable(m, reader, storage.display).all(problems) for c in cs
        ]
        wrong_size = set()
        for name, info in sorted(m.files.items()):
            size = reader.size(name)
            if size is None:
                problems.append(f"{reader.display}/{name}: data file is missing")
            elif size != info["bytes"]:
                problems.append(
                    f"{reader.display}/{name}: data file has {size} bytes, the manifest says {info['bytes']}"
                )
            if size is None or size < info["bytes"]:
                wrong_size.add(name)  # not read: its chunks could be anything, even absurd
        ranges = _plan.plan_reads(
            (c for c in all_chunks if c.file not in wrong_size), max_range_bytes=_read.RANGE_BYTES
        )
        total, done, bad = sum(r.nbytes for r in ranges), 0, []
        with ThreadPoolExecutor(_knobs.get("io_threads")) as pool:
            for group in _groups(ranges, _PROGRESS_BYTES if progress else None):
                bad.extend(_read.read_ranges(reader, group, m, pool))
                done += sum(r.nbytes for r in group)
                if progress is not None:
                    progress(done, total)
    problems.extend(p for p in bad if p not in problems)
    if problems:
        raise _read.corrupt(storage.display, problems, "every problem found is listed")
    return VerifyReport(
        directory=storage.display,
        leaves=len(m.leaves),
        files=len(m.files),
        chunks=len(all_chunks),
        bytes_checked=sum(c.nbytes for c in all_chunks),
        seconds=time.perf_counter() - start,
    )


_PROGRESS_BYTES = 64 << 20


def _groups(ranges: list[_plan.ReadRange], nbytes: int | None) -> list[list[_plan.ReadRange]]:
    """``ranges`` in consecutive groups of about ``nbytes`` (one group if None)."""
    if nbytes is None:
        return [ranges]
    groups: list[list[_plan.ReadRange]] = [[]]
    size = 0
    for r in ranges:
        if size >= nbytes:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += r.nbytes
    return groups
