"""``copy``: a committed checkpoint to another location, checked and committed there."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import crc32c

from distckpt import _chunks, _codec, _commit, _faults, _layout, _plan, _read, _reshard
from distckpt._index import IndexRef
from distckpt._location import Location, ParsedLocation
from distckpt._storage import open_storage
from distckpt.errors import CorruptCheckpointError


@dataclass(frozen=True)
class CopyReport:
    """What ``copy`` did."""

    source: str
    destination: str
    files: int
    bytes: int
    seconds: float


def copy(
    src: Location,
    dst: Location,
    *,
    verify: bool = True,
    overwrite: bool = False,
    compression: str | None = "keep",
    compression_level: int = 3,
) -> CopyReport:
    """Copies the committed checkpoint at ``src`` to ``dst``; one process, not collective.

    ``src`` and ``dst`` are any locations distckpt accepts: paths, ``s3://``,
    ``gs://``, ``memory://``, kvstore specs. The data files stream through
    16 MiB at a time, every chunk's crc32c is checked on the way (unless
    ``verify=False``), and the copy is committed at ``dst`` with the same
    protocol as a save: until the manifest is written last, ``dst`` holds no
    checkpoint, so an interrupted or failed copy is never mistaken for one.

    ``compression``: ``"keep"`` (the default) copies the stored bytes as they
    are; ``"zstd"`` or ``None`` re-encodes every chunk (compressed, or raw),
    with new checksums, for long-term storage or fast reading.

    Raises:
      NotCommittedError: nothing committed at ``src``.
      CheckpointExistsError: a checkpoint is at ``dst`` and ``overwrite`` is False.
      CorruptCheckpointError: a chunk of ``src`` fails its checksum (named);
        nothing is committed at ``dst``.
    """
    return copy_parsed(
        src,
        dst,
        verify=verify,
        overwrite=overwrite,
        compression=compression,
        compression_level=compression_level,
    )


def copy_parsed(
    src: Location | ParsedLocation,
    dst: Location | ParsedLocation,
    *,
    verify: bool = True,
    overwrite: bool = False,
    compression: str | None = "keep",
    compression_level: int = 3,
) -> CopyReport:
    """``copy``, also between locations already parsed (a backup's step location)."""
    began = time.perf_counter()
    if compression != "keep":
        _codec.check(compression, compression_level)
    source = open_storage(src)
    manifest = _commit.load(source)
    if compression != "keep":
        leaves = [
            dataclasses.replace(s, compression=compression) if s.stored else s
            for s in manifest.leaves
        ]
        recode = _Recoder(manifest, leaves, compression, compression_level)
    else:
        leaves, recode = manifest.leaves, None
    total = sum(info["bytes"] for info in manifest.files.values())
    target = open_storage(dst)
    found = _commit.preflight(target, overwrite=overwrite, estimated_bytes=total)
    attempt = _layout.new_attempt()
    target.prepare_attempt(attempt)
    try:
        target.check_attempt_visible(attempt)
        by_file: dict[str, list[_plan.ChunkRecord]] = {name: [] for name in manifest.files}
        with source.reader(manifest.attempt) as reader:
            for chunks in _chunks.ChunkTable(manifest, reader, source.display).all():
                for c in chunks:
                    by_file[c.file].append(c)
            for name in sorted(by_file):
                _copy_file(reader, target, attempt, name, by_file[name], manifest, verify, recode)
                _faults.hit("copy.file")
            indexes = manifest.indexes
            if indexes is not None:  # format 3: the indexes as they are, or rewritten
                indexes = _copy_indexes(reader, target, attempt, manifest, recode)
        target.finish_attempt_writes(attempt)
        copied = dataclasses.replace(manifest, attempt=attempt)
        if recode is not None:
            copied = dataclasses.replace(
                copied,
                leaves=leaves,
                chunks=None if indexes is not None else recode.chunks(),
                files=recode.files,
                indexes=indexes,
            )
        _commit.commit(target, copied, found)
    except BaseException:
        _commit.discard_unless_committed(target, attempt)
        raise
    return CopyReport(
        source=source.display,
        destination=target.display,
        files=len(manifest.files),
        bytes=total if recode is None else sum(f["bytes"] for f in recode.files.values()),
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
    recode: _Recoder | None = None,
) -> None:
    """One data file, byte for byte (or re-encoded chunk by chunk), in ranges of whole chunks."""
    expected = manifest.files[name]["bytes"]
    writer = target.writer(attempt, name)
    try:
        at = 0
        for r in _plan.plan_reads(chunks, max_range_bytes=_read.RANGE_BYTES):
            if r.offset != at:
                raise CorruptCheckpointError(
                    f"{reader.display}/{name}: bytes {at}..{r.offset} belong to no chunk; "
                    "the manifest's chunk table is damaged"
                )
            data = reader.read(name, r.offset, r.nbytes)
            if verify:
                for c in r.chunks:
                    part = memoryview(data)[c.offset - r.offset : c.offset - r.offset + c.nbytes]
                    bad = _read.chunk_problem(manifest.leaves[c.leaf], c, part, reader.display)
                    if bad is not None:
                        raise CorruptCheckpointError(
                            f"copy of {reader.display}: {bad}; the source is damaged and "
                            "nothing was committed at the destination. Copy an older step "
                            "or a backup.",
                            [bad],
                        )
            if recode is None:
                writer.write(memoryview(data))
            else:
                for c in r.chunks:
                    part = data[c.offset - r.offset : c.offset - r.offset + c.nbytes]
                    writer.write(recode.chunk(c, part, reader.display))
            at = r.offset + r.nbytes
        if at != expected:
            raise CorruptCheckpointError(
                f"{reader.display}/{name}: chunks cover {at} bytes, the manifest says {expected}"
            )
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_indexes(
    reader: Any, target: Any, attempt: str, manifest: Any, recode: _Recoder | None
) -> list[IndexRef]:
    """The chunk indexes of a format-3 copy: byte for byte (checked by the table that
    listed the chunks), or written anew for re-encoded chunks."""
    if recode is None:
        for ref in manifest.indexes:
            _chunks.write_whole(target, attempt, ref.name, reader.read(ref.name, 0, ref.nbytes))
        return list(manifest.indexes)
    per_process: dict[int, list[_plan.ChunkRecord]] = {}
    for records in recode.chunks():
        for c in records:
            per_process.setdefault(manifest.files[c.file]["process"], []).append(c)
    refs = [
        _chunks.write_index(target, attempt, process, records, manifest.grids)
        for process, records in sorted(per_process.items())
    ]
    return [ref for ref in refs if ref is not None]


class _Recoder:
    """Re-encodes chunks for a copy with another compression; keeps the new chunk table."""

    def __init__(self, manifest: Any, leaves: list, compression: str | None, level: int):
        self.manifest, self.leaves = manifest, leaves
        self.compress = _codec.compressor(compression, level) if compression else None
        self.records: dict[int, list[_plan.ChunkRecord]] = {}
        self.files = {name: {**info, "bytes": 0} for name, info in manifest.files.items()}

    def chunk(self, c: _plan.ChunkRecord, stored: Any, where: str) -> memoryview:
        spec = self.manifest.leaves[c.leaf]
        raw = stored
        if spec.compression is not None:
            try:
                raw = _codec.decompress(
                    spec.compression, stored, _reshard.box_size(c.box) * spec.itemsize
                )
            except ValueError as e:
                raise CorruptCheckpointError(
                    f"copy of {where}: {spec.display}: chunk at bytes {c.offset} of {c.file}: {e}"
                ) from e
        out = memoryview(self.compress(memoryview(raw)) if self.compress else memoryview(raw))
        offset = self.files[c.file]["bytes"]
        self.records.setdefault(c.leaf, []).append(
            _plan.ChunkRecord(c.leaf, c.file, offset, out.nbytes, crc32c.crc32c(out), c.box)
        )
        self.files[c.file]["bytes"] = offset + out.nbytes
        return out

    def chunks(self) -> list[list[_plan.ChunkRecord]]:
        return [self.records.get(i, []) for i in range(len(self.manifest.leaves))]
