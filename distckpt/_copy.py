"""``copy``: a committed checkpoint to another location, checked and committed there."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import crc32c

from distckpt import _commit, _faults, _plan
from distckpt._storage import open_storage
from distckpt.errors import CorruptCheckpointError

_RANGE_BYTES = 16 << 20  # the most held in memory at once


@dataclass(frozen=True)
class CopyReport:
    """What ``copy`` did."""

    source: str
    destination: str
    files: int
    bytes: int
    seconds: float


def copy(src: Any, dst: Any, *, verify: bool = True, overwrite: bool = False) -> CopyReport:
    """Copies the committed checkpoint at ``src`` to ``dst``; one process, not collective.

    ``src`` and ``dst`` are any locations distckpt accepts: paths, ``s3://``,
    ``gs://``, ``memory://``, kvstore specs. The data files stream through
    16 MiB at a time, every chunk's crc32c is checked on the way (unless
    ``verify=False``), and the copy is committed at ``dst`` with the same
    protocol as a save: until the manifest is written last, ``dst`` holds no
    checkpoint, so an interrupted or failed copy is never mistaken for one.

    Raises:
      NotCommittedError: nothing committed at ``src``.
      CheckpointExistsError: a checkpoint is at ``dst`` and ``overwrite`` is False.
      CorruptCheckpointError: a chunk of ``src`` fails its checksum (named);
        nothing is committed at ``dst``.
    """
    began = time.perf_counter()
    source = open_storage(src)
    manifest = _commit.load(source)
    total = sum(info["bytes"] for info in manifest.files.values())
    target = open_storage(dst)
    _commit.preflight(target, overwrite=overwrite, estimated_bytes=total)
    attempt = _commit.new_attempt()
    target.prepare_attempt(attempt)
    try:
        target.check_attempt_visible(attempt)
        by_file: dict[str, list[_plan.ChunkRecord]] = {name: [] for name in manifest.files}
        for chunks in manifest.chunks:
            for c in chunks:
                by_file[c.file].append(c)
        with source.reader(manifest.attempt) as reader:
            for name in sorted(by_file):
                _copy_file(reader, target, attempt, name, by_file[name], manifest, verify)
                _faults.hit("copy.file")
        target.finish_attempt_writes(attempt)
        _commit.commit(target, dataclasses.replace(manifest, attempt=attempt))
    except BaseException:
        _commit.discard_unless_committed(target, attempt)
        raise
    return CopyReport(
        source=source.display,
        destination=target.display,
        files=len(manifest.files),
        bytes=total,
        seconds=time.perf_counter() - began,
    )


def _copy_file(
    reader: Any,
    target: Any,
    attempt: str,
    name: str,
    chunks: list[_plan.ChunkRecord],
    manifest: Any,
    verify: bool,
) -> None:
    """One data file, byte for byte, in ranges of whole chunks."""
    chunks.sort(key=lambda c: c.offset)
    expected = manifest.files[name]["bytes"]
    writer = target.writer(attempt, name)
    try:
        at = 0
        for r in _plan.plan_reads(chunks, max_range_bytes=_RANGE_BYTES):
            if r.offset != at:
                raise CorruptCheckpointError(
                    f"{reader.display}/{name}: bytes {at}..{r.offset} belong to no chunk; "
                    "the manifest's chunk table is damaged"
                )
            data = reader.read(name, r.offset, r.nbytes)
            if verify:
                for c in r.chunks:
                    part = memoryview(data)[c.offset - r.offset : c.offset - r.offset + c.nbytes]
                    if crc32c.crc32c(part) != c.crc32c:
                        leaf = manifest.leaves[c.leaf].display
                        raise CorruptCheckpointError(
                            f"copy of {reader.display}: {leaf}: chunk at bytes "
                            f"{c.offset}..{c.offset + c.nbytes} of {name} fails its crc32c; "
                            "the source is damaged and nothing was committed at the "
                            "destination. Copy an older step or a backup.",
                            [f"{reader.display}/{name}: {leaf} at {c.offset}"],
                        )
            writer.write(memoryview(data))
            at = r.offset + r.nbytes
        if at != expected:
            raise CorruptCheckpointError(
                f"{reader.display}/{name}: chunks cover {at} bytes, the manifest says {expected}"
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise
