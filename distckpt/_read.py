"""Reading: byte ranges of data files, every chunk's checksum, and assembly into boxes.

Given the boxes a process needs and the manifest's chunk records, this
module finds the chunks that overlap them (an index per chunk layout),
plans coalesced reads, reads them in parallel, checks every chunk's crc32c
(and decompresses), and copies each chunk's overlap into the boxes that
need it. Problems are collected, never returned as data.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import crc32c
import numpy as np

from distckpt import _codec, _plan, _reshard
from distckpt._manifest import Manifest
from distckpt._plan import ChunkRecord, LeafSpec, ReadRange
from distckpt._reshard import Box
from distckpt._storage import ALIGN, Reader, aligned_empty
from distckpt.errors import CorruptCheckpointError

# The largest single read: also the size of each reading thread's scratch
# buffer, and of what a copy holds in memory at once. The largest chunk a save
# grows to, so that one chunk always fits in one read.
RANGE_BYTES = _reshard.MAX_CHUNK_BYTES


def corrupt(
    where: str, problems: list[str], consequence: str = "refusing to return wrong data"
) -> CorruptCheckpointError:
    """The one error for damaged data: every problem found (the first 20 in the message)."""
    return CorruptCheckpointError(
        f"checkpoint at {where} is corrupt; {consequence} ({len(problems)} problem(s)):\n  "
        + "\n  ".join(problems[:20]),
        problems,
    )


def chunk_problem(spec: LeafSpec, c: ChunkRecord, view: Any, where: str) -> str | None:
    """Why the stored bytes ``view`` of chunk ``c`` of ``spec`` (in ``where``) are wrong, or None."""
    actual = crc32c.crc32c(view)
    if actual == c.crc32c:
        return None
    return (
        f"{spec.display}: chunk {[list(b) for b in c.box]} in {where}/{c.file} bytes "
        f"{c.offset}..{c.offset + c.nbytes} fails its crc32c (stored {c.crc32c:#010x}, "
        f"read {actual:#010x})"
    )


class ChunkIndex:
    """Finds which of a leaf's chunk boxes overlap a box without scanning all of them.

    Built per chunk layout and shared (``chunk_index``): the leaves of a
    state repeat a few layouts, so each overlap is worked out once.
    """

    def __init__(self, boxes: tuple[Box, ...]):
        self.order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][0] if boxes[i] else 0)
        self.boxes = boxes
        self.starts = [boxes[i][0][0] if boxes[i] else 0 for i in self.order]
        self.longest = max((b[0][1] - b[0][0] for b in boxes if b), default=0)
        self.memo: dict[Box, tuple[int, ...]] = {}

    def overlapping(self, box: Box) -> tuple[int, ...]:
        """Positions (in the leaf's chunk list) of the chunks holding any element of ``box``."""
        found = self.memo.get(box)
        if found is None:
            candidates = self.order
            if box and len(self.order) >= 16:
                lo = bisect.bisect_left(self.starts, box[0][0] - self.longest + 1)
                hi = bisect.bisect_left(self.starts, box[0][1])
                candidates = self.order[lo:hi]
            found = self.memo[box] = tuple(
                sorted(
                    i
                    for i in candidates
                    if not box or _reshard.intersect(self.boxes[i], box) is not None
                )
            )
        return found


@functools.lru_cache(maxsize=256)
def chunk_index(boxes: tuple[Box, ...]) -> ChunkIndex:
    return ChunkIndex(boxes)


_data_lock = threading.Lock()
_data_bytes = 0


def data_bytes_read() -> int:
    """Bytes of chunk data this process has read from checkpoints so far."""
    return _data_bytes


def read_ranges(
    reader: Reader,
    ranges: Sequence[ReadRange],
    manifest: Manifest,
    pool: ThreadPoolExecutor,
    consume: Callable[[ChunkRecord, np.ndarray], None] | None = None,
    adopt: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
) -> list[str]:
    """Reads ``ranges`` in parallel, checks every chunk's crc32c, hands good chunks to ``consume``.

    ``consume`` runs on the reading thread, so copying into place overlaps
    with other reads. A range is read into a per-thread scratch buffer
    (allocated once, so no fresh pages per read) unless it holds a chunk in
    ``adopt``, whose bytes ``consume`` keeps without copying.

    Returns:
      Every problem found (missing or truncated files, checksum failures).
    """
    local = threading.local()

    def scratch(nbytes: int) -> np.ndarray:
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = local.buf = aligned_empty((nbytes,), np.dtype(np.uint8))
        return buf[:nbytes]

    def one(r: ReadRange) -> list[str]:
        global _data_bytes
        with _data_lock:
            _data_bytes += r.nbytes
        fresh = any((c.file, c.offset) in adopt for c in r.chunks)
        try:
            buf = reader.read(r.file, r.offset, r.nbytes, out=None if fresh else scratch(r.nbytes))
        except CorruptCheckpointError as e:
            leaves = sorted({manifest.leaves[c.leaf].display for c in r.chunks})
            return [f"{p} (holds {', '.join(leaves[:4])})" for p in e.problems]
        problems = []
        for c in r.chunks:
            view = buf[c.offset - r.offset : c.offset - r.offset + c.nbytes]
            spec = manifest.leaves[c.leaf]
            bad = chunk_problem(spec, c, view, reader.display)
            if bad is not None:
                problems.append(bad)
                continue
            if spec.compression is not None:
                try:
                    view = _codec.decompress(
                        spec.compression, view, _reshard.box_size(c.box) * spec.itemsize
                    )
                except ValueError as e:
                    problems.append(
                        f"{spec.display}: chunk {[list(b) for b in c.box]} in "
                        f"{reader.display}/{c.file} bytes {c.offset}..{c.offset + c.nbytes}: {e}"
                    )
                    continue
            if consume is not None:
                consume(c, view)
        return problems

    return [p for bad in pool.map(one, ranges) for p in bad]


class Assembler:
    """Builds each needed box of a batch from the chunks as they arrive."""

    def __init__(self, needs: dict[tuple[int, Box], list[ChunkRecord]], manifest: Manifest):
        self.outputs: dict[tuple[int, Box], np.ndarray] = {}
        self.consumers: dict[tuple[str, int], list[tuple[tuple[int, Box], np.dtype, bool]]] = {}
        self.adopt: set[tuple[str, int]] = set()
        for (leaf, box), chunks in needs.items():
            dtype = _plan.np_dtype(manifest.leaves[leaf].dtype)
            whole = len(chunks) == 1 and chunks[0].box == box
            if whole:  # the chunk is the box: keep its bytes, no copy
                self.adopt.add((chunks[0].file, chunks[0].offset))
            else:
                self.outputs[(leaf, box)] = aligned_empty(_reshard.box_shape(box), dtype)
            for c in chunks:
                self.consumers.setdefault((c.file, c.offset), []).append(
                    ((leaf, box), dtype, whole)
                )

    def consume(self, c: ChunkRecord, view: np.ndarray) -> None:
        for key, dtype, whole in self.consumers[(c.file, c.offset)]:
            src = view.view(dtype).reshape(_reshard.box_shape(c.box))
            if whole:
                if src.ctypes.data % ALIGN:
                    src = src.copy()  # unaligned: JAX would copy it anyway
                self.outputs[key] = src
                continue
            into, out_of = _reshard.copy_slices(c.box, key[1])
            self.outputs[key][into] = src[out_of]


def check_files_hold(
    reader: Reader, ranges: list[ReadRange], manifest: Manifest, sizes: dict[str, int | None]
) -> None:
    """Refuses ranges past the end of their file before anything is allocated for them.

    A manifest can be self-consistent and still describe far more data than
    the files hold (a damaged or crafted one); without this check restore
    would first try to allocate it all. Missing files are left to the read,
    which names them per leaf.
    """
    if not reader.sizes_are_cheap():
        return
    problems = []
    for r in ranges:
        if r.file not in sizes:
            sizes[r.file] = reader.size(r.file)
        size = sizes[r.file]
        if size is not None and r.offset + r.nbytes > size:
            leaves = sorted({manifest.leaves[c.leaf].display for c in r.chunks})
            problems.append(
                f"{reader.display}/{r.file}: holds {size} bytes but chunks of "
                f"{', '.join(leaves)} lie at bytes {r.offset}..{r.offset + r.nbytes} "
                "(the file is truncated or the manifest is wrong)"
            )
    if problems:
        raise corrupt(reader.display, problems)
