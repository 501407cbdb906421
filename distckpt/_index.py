"""Where chunk records live in format 3: shard grids in the commit record, chunk indexes in files.

Pure: nothing here does I/O or talks to other processes.

A *grid* is the layout a leaf was saved in: per dimension the boundaries
of the saved shards, and for each cell of that grid the process that wrote
it. Every process can compute it from the global sharding, so it proves
coverage without anyone merging chunk records (``check_grid``,
``check_own_writes``), and it tells a reader which processes' indexes hold
the chunks of a box (``Grid.owners_in``).

A *chunk index* is one process's chunk records in fixed-width binary form
(``encode_index``/``decode_index``), written next to its data files and
covered by a crc32c that the commit record holds. See docs/format.md.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from distckpt import _reshard
from distckpt._plan import ChunkRecord
from distckpt._reshard import Box

# --------------------------------------------------------------------------- grids


@dataclass(frozen=True, eq=False)
class Grid:
    """The saved shards of one leaf: cell boundaries per dimension, and each cell's writer."""

    shape: tuple[int, ...]
    edges: tuple[tuple[int, ...], ...]  # per dimension: 0 = e0 < e1 < ... = n (just (0,) if n is 0)
    owners: np.ndarray  # int32, one per cell, shape (len(e) - 1 for e in edges)
    writers: frozenset[int]  # the distinct owners

    def cell_ranges(self, box: Box) -> tuple[slice, ...]:
        """The cells (per dimension, a range of cell positions) that hold elements of ``box``."""
        out = []
        for (lo, hi), e in zip(box, self.edges, strict=True):
            if lo >= hi:
                return tuple(slice(0, 0) for _ in self.edges)
            out.append(slice(bisect.bisect_right(e, lo) - 1, bisect.bisect_left(e, hi)))
        return tuple(out)

    def owners_in(self, box: Box) -> list[int]:
        """The processes whose writes hold any element of ``box``, sorted."""
        if len(self.writers) == 1 and _reshard.box_size(box) > 0:
            return list(self.writers)  # the common case: one writer, or all cells alike
        return sorted(set(self.owners[self.cell_ranges(box)].ravel().tolist()))

    def cell_box(self, cell: Sequence[int]) -> Box:
        return tuple((e[i], e[i + 1]) for e, i in zip(self.edges, cell, strict=True))

    def cells_of(self, process: int) -> list[Box]:
        """The boxes of the cells ``process`` writes."""
        return [self.cell_box(c.tolist()) for c in np.argwhere(self.owners == process)]

    def owner_key(self) -> tuple[tuple[int, ...], bytes]:
        """What identifies the owner table (shared by leaves saved the same way)."""
        return self.owners.shape, self.owners.astype("<i4").tobytes()

    def edges_json(self) -> list:
        """Per dimension: the shard size when every shard but the last has it, else the edges."""
        out: list = []
        for n, e in zip(self.shape, self.edges, strict=True):
            block = e[1] if len(e) > 1 else max(n, 1)
            regular = list(e) == [*range(0, n, block), n] if n else list(e) == [0]
            out.append(block if regular else list(e))
        return out

    @classmethod
    def from_json(cls, shape: tuple[int, ...], edges: list, owners: OwnerTable) -> Grid:
        """Parses a grid record (raises ValueError or TypeError on a malformed one)."""
        if not isinstance(edges, list) or len(edges) != len(shape):
            raise ValueError(f"grid has {_len(edges)} dimensions, the leaf {len(shape)}")
        parsed = []
        for n, e in zip(shape, edges, strict=True):
            if isinstance(e, int) and not isinstance(e, bool):
                if e < 1 or -(-n // e) > max(len(owners), 1):  # more cells than owners
                    raise ValueError(f"grid block {e} does not fit {len(owners)} owners")
                e = [*range(0, n, e), n] if n else [0]
            if not (isinstance(e, list) and all(_is_int(v) for v in e)):
                raise ValueError(f"grid edges {e!r} are not a list of integers")
            if e[0] != 0 or e[-1] != n or any(b <= a for a, b in zip(e, e[1:], strict=False)):
                raise ValueError(f"grid edges {e} do not run from 0 up to {n}")
            parsed.append(tuple(e))
        cells = tuple(len(e) - 1 for e in parsed)
        if len(owners) != math.prod(cells):
            raise ValueError(f"grid has {math.prod(cells)} cells but {len(owners)} owners")
        return cls(tuple(shape), tuple(parsed), owners.cells.reshape(cells), owners.writers)


@dataclass(frozen=True, eq=False)
class OwnerTable:
    """One owner table of a commit record, parsed once for all the leaves that share it."""

    cells: np.ndarray  # int32, flat
    writers: frozenset[int]

    def __len__(self) -> int:
        return int(self.cells.size)

    @classmethod
    def from_json(cls, owners: object) -> OwnerTable:
        if not isinstance(owners, list) or not all(_is_int(v) for v in owners):
            raise ValueError("an owner table is not a list of process indices")
        if any(not -(1 << 31) <= v < 1 << 31 for v in owners):
            raise ValueError("an owner table names a process index out of range")
        cells = np.asarray(owners, dtype=np.int32)
        return cls(cells, frozenset(np.unique(cells).tolist()))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _len(v: object) -> int | str:
    return len(v) if isinstance(v, list) else "no list of"


def build_grid(shape: Sequence[int], shards: Iterable[tuple[Box, int]]) -> Grid:
    """The grid of distinct saved shards ``(box, writer)``.

    Raises ValueError if the shards overlap or leave a hole: then they do not
    describe a save that writes every element exactly once.
    """
    shape = tuple(shape)
    nonempty = [(b, p) for b, p in shards if _reshard.box_size(b) > 0 or not shape]
    edges = tuple(
        tuple(sorted({0, n} | {b[d][0] for b, _ in nonempty} | {b[d][1] for b, _ in nonempty}))
        if n
        else (0,)
        for d, n in enumerate(shape)
    )
    owners = np.full([len(e) - 1 for e in edges], -1, dtype=np.int32)
    position = [{v: i for i, v in enumerate(e)} for e in edges]
    for box, process in nonempty:
        cells = tuple(slice(position[d][lo], position[d][hi]) for d, (lo, hi) in enumerate(box))
        if (owners[cells] != -1).any():
            raise ValueError(f"saved shard {[list(r) for r in box]} overlaps another one")
        owners[cells] = process
    if (owners == -1).any():
        hole = np.argwhere(owners == -1)[0]
        box = tuple((e[i], e[i + 1]) for e, i in zip(edges, hole, strict=True))
        raise ValueError(f"no saved shard holds {[list(r) for r in box]}")
    return Grid(shape, edges, owners, frozenset(np.unique(owners).tolist()))


def check_own_writes(
    grids: Sequence[Grid | None], shards: Sequence[tuple[int, Box, int]], process: int
) -> list[tuple[int, str]]:
    """What is wrong with the shards ``process`` is about to write, against the plan.

    The grids tile every leaf and give each cell one writer, so if every
    process writes exactly the cells the grid gives it (checked here, on
    each process, for its own shards), every element is written exactly
    once without anyone comparing all chunk records.
    """
    mine: dict[int, list[Box]] = {}  # returns (leaf, problem) pairs
    for leaf, box, _ in shards:
        mine.setdefault(leaf, []).append(box)
    problems = []
    for leaf, grid in enumerate(grids):
        if grid is None:
            continue
        boxes = [b for b in mine.pop(leaf, []) if _reshard.box_size(b) > 0 or not grid.shape]
        planned = grid.cells_of(process) if process in grid.writers else []
        covered = sum(_reshard.box_size(b) for b in boxes)
        expected = sum(_reshard.box_size(b) for b in planned)
        outside = [b for b in boxes if (grid.owners[grid.cell_ranges(b)] != process).any()]
        if outside or covered != expected or len(set(boxes)) != len(boxes):
            problems.append(
                (
                    leaf,
                    f"holds shards {[[list(r) for r in b] for b in boxes]}, the plan gives it "
                    f"{[[list(r) for r in b] for b in planned]}",
                )
            )
    problems += [(leaf, "holds shards of a leaf the plan stores nothing of") for leaf in mine]
    return problems


def plan_digest(grids: Sequence[Grid | None]) -> str:
    """A digest of a save's grids: processes that share it planned the same writes."""
    h = hashlib.sha256()
    for grid in grids:
        if grid is None:
            h.update(b"-;")
        else:
            h.update(json.dumps(grid.edges_json()).encode() + grid.owners.astype("<i4").tobytes())
            h.update(b";")
    return h.hexdigest()


def check_grid(grid: Grid, process_count: int) -> list[str]:
    """What is wrong with a grid read from a commit record (writers out of range)."""
    if grid.writers and (min(grid.writers) < 0 or max(grid.writers) >= process_count):
        return [
            f"the grid names writer processes {min(grid.writers)}..{max(grid.writers)}, "
            f"the save had {process_count}"
        ]
    return []


# --------------------------------------------------------------------------- indexes

MAGIC = b"DCKPTIDX"
INDEX_VERSION = 1
# One record per chunk; its box follows in ``bounds`` (start, stop per
# dimension of its leaf), int32 where every bound fits, else int64.
RECORD = np.dtype(
    [("leaf", "<u4"), ("file", "<u4"), ("crc32c", "<u4"), ("offset", "<u8"), ("nbytes", "<u8")]
)


@dataclass(frozen=True)
class IndexRef:
    """What the commit record holds about one process's chunk index."""

    process: int
    name: str
    nbytes: int
    crc32c: int
    chunks: int

    def to_json(self) -> dict:
        return {
            "process": self.process,
            "name": self.name,
            "bytes": self.nbytes,
            "crc32c": self.crc32c,
            "chunks": self.chunks,
        }

    @classmethod
    def from_json(cls, doc: dict) -> IndexRef:
        return cls(doc["process"], doc["name"], doc["bytes"], doc["crc32c"], doc["chunks"])


def encode_index(process: int, records: Sequence[ChunkRecord]) -> bytes:
    """One process's chunk records as an index file (sorted by leaf, then position)."""
    records = sorted(records, key=lambda c: (c.leaf, c.box))
    files = sorted({c.file for c in records})
    number = {name: i for i, name in enumerate(files)}
    table = np.zeros(len(records), RECORD)
    if records:
        table["leaf"] = [c.leaf for c in records]
        table["file"] = [number[c.file] for c in records]
        table["crc32c"] = [c.crc32c for c in records]
        table["offset"] = [c.offset for c in records]
        table["nbytes"] = [c.nbytes for c in records]
    flat = [v for c in records for r in c.box for v in r]
    wide = any(v >= 1 << 31 for v in flat)
    bounds = np.asarray(flat, dtype="<i8" if wide else "<i4")
    header = json.dumps(
        {
            "process": process,
            "files": files,
            "records": len(records),
            "bounds": bounds.dtype.str,
            "bound_count": int(bounds.size),
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    head = MAGIC + np.asarray([INDEX_VERSION, len(header)], "<u4").tobytes()
    return head + header + table.tobytes() + bounds.tobytes()


@dataclass(frozen=True)
class Index:
    """A decoded, checked chunk index: the records of one process, by leaf."""

    process: int
    files: list[str]
    table: np.ndarray  # RECORD
    bounds: np.ndarray  # int64, 2 values per dimension per record
    starts: np.ndarray  # where each record's bounds begin

    def records(self, leaf: int) -> list[ChunkRecord]:
        lo, hi = (int(i) for i in np.searchsorted(self.table["leaf"], [leaf, leaf + 1]))
        if lo == hi:
            return []
        end = int(self.starts[hi]) if hi < len(self.starts) else self.bounds.size
        rank = (end - int(self.starts[lo])) // (2 * (hi - lo))  # one leaf: one rank
        flat = self.bounds[int(self.starts[lo]) : end].tolist()
        part = self.table[lo:hi]
        return [
            ChunkRecord(
                leaf,
                self.files[f],
                off,
                n,
                crc,
                tuple((flat[j], flat[j + 1]) for j in range(k * 2 * rank, (k + 1) * 2 * rank, 2)),
            )
            for k, (f, off, n, crc) in enumerate(
                zip(
                    part["file"].tolist(),
                    part["offset"].tolist(),
                    part["nbytes"].tolist(),
                    part["crc32c"].tolist(),
                    strict=True,
                )
            )
        ]

    def all_records(self) -> list[ChunkRecord]:
        return [c for leaf in np.unique(self.table["leaf"]) for c in self.records(int(leaf))]


def decode_index(
    raw: bytes | np.ndarray,
    ref: IndexRef,
    shapes: Sequence[tuple[int, ...] | None],
    file_bytes: dict[str, int],
) -> Index:
    """Checks and decodes an index file read as ``raw``.

    ``shapes`` gives each leaf's stored shape (None for leaves without
    data) and ``file_bytes`` the size of every data file the commit record
    lists. Raises ValueError naming what is wrong: a checksum that does not
    match, a record of an unknown leaf or file, a box outside its leaf or a
    chunk past the end of its file. A damaged or hostile index gives this
    error, never a read elsewhere or a huge allocation.
    """
    data = bytes(raw) if not isinstance(raw, bytes) else raw
    if len(data) != ref.nbytes:
        raise ValueError(f"holds {len(data)} bytes, the commit record says {ref.nbytes}")
    actual = crc32c.crc32c(data)
    if actual != ref.crc32c:
        raise ValueError(
            f"fails its crc32c (stored {ref.crc32c:#010x}, read {actual:#010x}): it was "
            "damaged after it was written"
        )
    if data[:8] != MAGIC:
        raise ValueError("is not a distckpt chunk index (bad magic)")
    version, hlen = np.frombuffer(data, "<u4", 2, 8).tolist()
    if version != INDEX_VERSION:
        raise ValueError(f"is index version {version}, this distckpt reads {INDEX_VERSION}")
    header = json.loads(data[16 : 16 + hlen])
    n, files = header["records"], header["files"]
    if header["process"] != ref.process or n != ref.chunks:
        raise ValueError("does not match its entry in the commit record (process, record count)")
    if not all(isinstance(f, str) and f in file_bytes for f in files):
        raise ValueError(f"names data files the commit record does not list: {files[:4]}")
    at = 16 + hlen
    table = np.frombuffer(data, RECORD, n, at)
    at += RECORD.itemsize * n
    bound_type = np.dtype(header["bounds"])
    if bound_type not in (np.dtype("<i4"), np.dtype("<i8")):
        raise ValueError(f"has bounds of type {bound_type}")
    count = header["bound_count"]
    if at + count * bound_type.itemsize != len(data):
        raise ValueError("its size does not match its header")
    bounds = np.frombuffer(data, bound_type, count, at).astype(np.int64)
    leaf = table["leaf"].astype(np.int64)
    if n and (leaf.max() >= len(shapes) or (np.diff(leaf) < 0).any()):
        raise ValueError("has records of leaves the checkpoint does not have, or out of order")
    ranks = np.asarray([len(s) if s is not None else -1 for s in shapes], np.int64)
    record_ranks = ranks[leaf] if n else np.zeros(0, np.int64)
    if (record_ranks < 0).any():
        raise ValueError("has chunk records for leaves that store no data")
    widths = 2 * record_ranks
    if int(widths.sum()) != count:
        raise ValueError("its boxes do not match the ranks of their leaves")
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]) if n else np.zeros(0, np.int64)
    # Every box inside its leaf's shape (records of one leaf are consecutive).
    for value in np.unique(leaf):
        lo, hi = np.searchsorted(leaf, [value, value + 1])
        shape = shapes[int(value)] or ()
        if not shape:
            continue
        end = int(starts[hi]) if hi < n else count
        boxes = bounds[int(starts[lo]) : end].reshape(-1, len(shape), 2)
        if (
            (boxes[..., 0] < 0).any()
            or (boxes[..., 1] < boxes[..., 0]).any()
            or (boxes[..., 1] > np.asarray(shape, np.int64)).any()
        ):
            raise ValueError(f"has a chunk box outside its leaf {int(value)} (or inverted)")
    # Every chunk inside its file.
    sizes = np.asarray([file_bytes[f] for f in files], np.uint64)
    if n and (table["file"].max() >= len(files)):
        raise ValueError("has a record naming a file number it does not list")
    ends = table["offset"] + table["nbytes"]
    if n and ((ends < table["offset"]) | (ends > sizes[table["file"]])).any():
        bad = int(np.argmax((ends < table["offset"]) | (ends > sizes[table["file"]])))
        raise ValueError(
            f"has a chunk at {files[int(table['file'][bad])]} bytes "
            f"{int(table['offset'][bad])}..{int(ends[bad])} past the end of the file"
        )
    return Index(ref.process, list(files), table, bounds, starts)
