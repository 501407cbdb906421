"""Plans are data: frozen dataclasses and the pure functions that build them.

Nothing here does I/O or talks to other processes, so every planner can be
unit-tested with plain values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from distckpt import _layout, _reshard, _tree
from distckpt._reshard import Box
from distckpt._tree import Path

# Leaves whose values live in data files (the others live in the manifest).
STORED_KINDS = (_tree.ARRAY, _tree.NUMPY, _tree.PRNG_KEY)


@functools.cache
def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a stored dtype name ("bfloat16", "int4", ...)."""
    return np.dtype(jax.numpy.dtype(name))


@dataclass(frozen=True)
class LeafSpec:
    """What every process knows about one saved leaf (identical on all of them)."""

    path: Path
    display: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    sharding: dict | None = None
    value: Any = None  # the value of a Python leaf
    impl: str | None = None  # PRNG implementation of a key leaf
    compression: str | None = None  # codec of its chunks ("zstd"), None: raw bytes

    @property
    def stored(self) -> bool:
        return self.kind in STORED_KINDS

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The shape of a stored leaf (of its key data, for a PRNG key).

        Every stored leaf has one: ``_stage`` and the sources set it, and
        ``_commit.load`` refuses a manifest whose stored leaf lacks it.
        """
        assert self.shape is not None, f"{self.display}: a {self.kind} leaf has no shape"
        return self.shape

    @property
    def array_dtype(self) -> str:
        """The dtype name of a stored leaf (set and checked as ``array_shape`` is)."""
        assert self.dtype is not None, f"{self.display}: a {self.kind} leaf has no dtype"
        return self.dtype

    @property
    def itemsize(self) -> int:
        return np_dtype(self.array_dtype).itemsize

    def describe(self) -> str:
        """What was saved here, as error messages and diffs name it."""
        if self.kind == _tree.PYTHON:
            return f"a Python {type(self.value).__name__} ({self.value!r})"
        if self.kind == _tree.NONE:
            return "None"
        if self.kind == _tree.PRNG_KEY:
            return f"a {self.impl} PRNG key array of key-data shape {self.array_shape}"
        return f"{self.dtype}{list(self.array_shape)}"

    @property
    def nbytes(self) -> int:
        """Bytes of the whole value in data files (0 for values kept in the manifest)."""
        if not self.stored:
            return 0
        return math.prod(self.array_shape) * self.itemsize


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk this process writes: ``box`` of leaf ``leaf``, cut from its shard.

    ``piece`` is the part of the shard fetched to host memory together with
    it (the whole shard unless a memory budget cuts it into pieces); the
    chunks of one piece are consecutive in their file.
    """

    leaf: int
    shard: Box
    box: Box
    nbytes: int
    piece: Box


@dataclass(frozen=True)
class FileWrite:
    """One data file this process writes, and the chunks in it, in order."""

    name: str
    chunks: tuple[ChunkWrite, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


class ChunkRecord(NamedTuple):
    """Where a written chunk lives and how to check it (manifest and reports).

    A named tuple, not a dataclass: a restore makes one per chunk it reads,
    and building a tuple costs a fifth of a frozen dataclass.
    """

    leaf: int
    file: str
    offset: int
    nbytes: int
    crc32c: int
    box: Box


@dataclass(frozen=True)
class ReadRange:
    """One contiguous byte range to read; it holds whole chunks, back to back."""

    file: str
    offset: int
    nbytes: int
    chunks: tuple[ChunkRecord, ...]


def plan_writes(
    shards: Sequence[tuple[int, Box, int]],
    *,
    process: int,
    chunk_bytes: int,
    segment_bytes: int,
    max_chunks: int | None = None,
    piece_bytes: int | None = None,
) -> list[FileWrite]:
    """Cuts this process's shards into chunks and packs them into data files.

    Args:
      shards: ``(leaf index, shard box, itemsize)`` for every shard this
        process owns, in leaf order.
      process: this process's index (names the files).
      chunk_bytes: target chunk size, see ``_reshard.chunk_shape``.
      segment_bytes: a new file starts once a file holds this many bytes.
      max_chunks: most chunks per shard (larger shards get larger chunks, up
        to ``_reshard.MAX_CHUNK_BYTES``); None: no bound, every chunk fits in
        ``chunk_bytes``.
      piece_bytes: most bytes of a shard fetched to host memory at once (see
        ``pieces``); None: whole shards.

    Returns:
      The files to write. Small leaves share a file, so the number of files
      grows with bytes and processes, not with the number of leaves.
    """
    files: list[FileWrite] = []
    current: list[ChunkWrite] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            files.append(FileWrite(_layout.data_file(process, len(files)), tuple(current)))
        current, size = [], 0

    for leaf, shard, itemsize in shards:
        for box, nbytes, piece in _shard_chunks(
            shard, itemsize, chunk_bytes, max_chunks, piece_bytes
        ):
            if current and size + nbytes > segment_bytes:
                flush()
            current.append(ChunkWrite(leaf, shard, box, nbytes, piece))
            size += nbytes
    flush()
    return files


@functools.lru_cache(maxsize=4096)
def _shard_chunks(
    shard: Box, itemsize: int, chunk_bytes: int, max_chunks: int | None, piece_bytes: int | None
) -> tuple[tuple[Box, int, Box], ...]:
    """``(chunk box, bytes, piece)`` of every chunk of ``shard``, in the order written.

    Cached: the leaves of a state repeat a few shard boxes (every layer alike).
    """
    chunk = _reshard.chunk_shape(
        _reshard.box_shape(shard), itemsize, chunk_bytes, max_chunks=max_chunks
    )
    piece_of = pieces(shard, chunk, itemsize, piece_bytes)
    return tuple(
        (box, _reshard.box_size(box) * itemsize, piece_of(box))
        for box in _reshard.chunk_boxes(shard, chunk)
    )


def pieces(
    shard: Box, chunk: Sequence[int], itemsize: int, piece_bytes: int | None
) -> Callable[[Box], Box]:
    """How a shard is fetched to host memory: a function from a chunk's box to its piece.

    A piece is a band of whole rows of the chunk grid (every chunk whose
    leading range falls in the band), as many rows as fit in
    ``piece_bytes``; where one row of chunks alone is larger, each chunk is
    its own piece. Either way the chunks of a piece are consecutive in the
    C order the chunks are written in, and a piece is one box, which a
    device can slice before anything crosses to the host.
    """
    nbytes = _reshard.box_size(shard) * itemsize
    if piece_bytes is None or not shard or nbytes <= piece_bytes:
        return lambda box: shard
    row = chunk[0] * math.prod(_reshard.box_shape(shard)[1:]) * itemsize
    if row > piece_bytes:
        return lambda box: box
    rows = piece_bytes // row * chunk[0]
    (start, stop), rest = shard[0], shard[1:]

    def piece(box: Box) -> Box:
        first = start + (box[0][0] - start) // rows * rows
        return ((first, min(first + rows, stop)), *rest)

    return piece


def largest_chunk(
    shards: Iterable[tuple[int, Box, int]], *, chunk_bytes: int, max_chunks: int | None
) -> int:
    """Bytes of the largest chunk ``plan_writes`` cuts from ``shards`` (0 for none)."""
    return max(
        (
            _chunk_bytes(_reshard.box_shape(shard), itemsize, chunk_bytes, max_chunks)
            for shard, itemsize in {(shard, itemsize) for _, shard, itemsize in shards}
        ),
        default=0,
    )


@functools.lru_cache(maxsize=4096)
def _chunk_bytes(
    shape: tuple[int, ...], itemsize: int, chunk_bytes: int, max_chunks: int | None
) -> int:
    return math.prod(_reshard.chunk_shape(shape, itemsize, chunk_bytes, max_chunks=max_chunks)) * (
        itemsize
    )


@dataclass(frozen=True)
class SaveMemory:
    """How one process's synchronous save spends its host-memory budget.

    Each writer thread holds at most one fetched piece of a shard, counted
    twice: the piece sliced on the device and its host copy (only where
    fetching copies, as from an accelerator; on CPU a shard is already host
    memory and a fetch is a view; the slice is host memory only on a device
    that keeps its memory on the host), one chunk gathered into its scratch
    buffer, one compressed chunk, and, where the storage keeps a data file in
    memory until it closes it (an object store), that file twice (its parts
    and their join). ``writers`` times that stays within the budget, with
    fewer writer threads when the largest chunk leaves room for fewer.
    """

    writers: int
    piece_bytes: int | None  # None: fetches cost no memory, shards are fetched whole
    segment_bytes: int


def save_memory(
    budget: int,
    *,
    threads: int,
    largest_chunk: int,
    segment_bytes: int,
    fetch_copies: bool,
    holds_files: bool,
) -> SaveMemory:
    """Splits ``budget`` bytes between at most ``threads`` writer threads.

    Example::

      save_memory(128 << 20, threads=4, largest_chunk=2 << 20, segment_bytes=256 << 20,
                  fetch_copies=True, holds_files=False)
      # SaveMemory(writers=4, piece_bytes=14 MiB, segment_bytes=256 MiB)
    """
    overhead = 2 * largest_chunk  # the gathered chunk and its compressed copy
    shares = (2 if fetch_copies else 0) + (2 if holds_files else 0)
    least = overhead + shares * largest_chunk
    writers = max(1, min(threads, budget // max(1, least)))
    unit = max(largest_chunk, (budget // writers - overhead) // shares) if shares else 0
    return SaveMemory(
        writers=writers,
        piece_bytes=unit if fetch_copies else None,
        segment_bytes=min(segment_bytes, unit) if holds_files else segment_bytes,
    )


def restore_threads(budget: int, *, threads: int, range_bytes: int) -> int:
    """Reading threads a restore uses within ``budget``: their scratch buffers
    (``range_bytes`` each) take at most half of it, and at least one reads."""
    return max(1, min(threads, budget // (2 * range_bytes)))


def restore_batch_bytes(budget: int, *, threads: int, range_bytes: int) -> int:
    """Bytes of output a restore stages per batch within ``budget``.

    The reading threads hold one scratch buffer of up to ``range_bytes``
    each; the batch gets the rest, and at least half the budget: below
    ``2 * threads * range_bytes`` the buffers take more than the other half
    and the budget is exceeded by the difference (fewer ``io_threads`` fit a
    smaller one).
    """
    return max(budget - threads * range_bytes, budget // 2)


def plan_reads(
    chunks: Iterable[ChunkRecord], *, max_range_bytes: int = 64 << 20
) -> list[ReadRange]:
    """Merges the chunks to read into as few contiguous ranges as possible.

    Each chunk is read once even if several target boxes need it; chunks that
    sit back to back in a file become one read of at most ``max_range_bytes``.
    """
    unique = {(c.file, c.offset): c for c in chunks}
    ordered = sorted(unique.values(), key=lambda c: (c.file, c.offset))
    ranges: list[ReadRange] = []
    group: list[ChunkRecord] = []

    def flush() -> None:
        if group:
            start = group[0].offset
            end = group[-1].offset + group[-1].nbytes
            ranges.append(ReadRange(group[0].file, start, end - start, tuple(group)))
        group.clear()

    for c in ordered:
        if group:
            last = group[-1]
            contiguous = last.file == c.file and last.offset + last.nbytes == c.offset
            if not contiguous or c.offset + c.nbytes - group[0].offset > max_range_bytes:
                flush()
        group.append(c)
    flush()
    return ranges


def chunk_table_problems(spec: LeafSpec, chunks: Sequence[ChunkRecord]) -> list[str]:
    """What is wrong with a stored leaf's chunks: holes, overlaps, wrong sizes.

    Checked by the primary before it commits, by ``verify``, and by
    ``restore`` before it fills a leaf from them.
    """
    problems = _reshard.coverage_problems(spec.array_shape, [c.box for c in chunks])
    problems += chunk_size_problems(spec, chunks)
    return [f"{spec.display}: {p}" for p in problems]


def chunk_size_problems(spec: LeafSpec, chunks: Iterable[ChunkRecord]) -> list[str]:
    """Chunks whose recorded size cannot be right: raw ones must hold exactly their box."""
    if spec.compression is not None:
        return [
            f"chunk {[list(b) for b in c.box]} records {c.nbytes} stored bytes"
            for c in chunks
            if c.nbytes <= 0
        ]
    return [
        f"chunk {[list(b) for b in c.box]} records {c.nbytes} bytes, its box holds "
        f"{_reshard.box_size(c.box) * spec.itemsize}"
        for c in chunks
        if c.nbytes != _reshard.box_size(c.box) * spec.itemsize
    ]


def chunks_for(box: Box, chunks: Sequence[ChunkRecord]) -> list[ChunkRecord]:
    """The saved chunks of one leaf that hold any element of ``box``."""
    if not box:
        return list(chunks)
    return [c for c in chunks if _reshard.intersect(c.box, box) is not None]
