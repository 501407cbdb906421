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
import functools
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
    ranks: np.ndarray  # int32 like owners: a cell's position among its owner's cells (row-major)

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

    def cells_in(self, box: Box) -> list[tuple[int, int]]:
        """The cells holding elements of ``box``, as ``(owner, rank)``: where their chunk
        records are in the owners' indexes."""
        ranges = self.cell_ranges(box)
        owners, ranks = self.owners[ranges].ravel().tolist(), self.ranks[ranges].ravel().tolist()
        return sorted(zip(owners, ranks, strict=True))

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
        return list(self._edges_json)

    @functools.cached_property
    def _edges_json(self) -> tuple:
        out: list = []
        for n, e in zip(self.shape, self.edges, strict=True):
            block = e[1] if len(e) > 1 else max(n, 1)
            regular = list(e) == [*range(0, n, block), n] if n else list(e) == [0]
            out.append(block if regular else list(e))
        return tuple(out)

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
        return cls(
            tuple(shape),
            tuple(parsed),
            owners.cells.reshape(cells),
            owners.writers,
            owners.ranks.reshape(cells),
        )


@dataclass(frozen=True, eq=False)
class OwnerTable:
    """One owner table of a commit record, parsed once for all the leaves that share it."""

    cells: np.ndarray  # int32, flat
    writers: frozenset[int]

    @functools.cached_property
    def ranks(self) -> np.ndarray:
        return _ranks(self.cells)

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


def _ranks(owners: np.ndarray) -> np.ndarray:
    """For each cell, how many cells of the same owner come before it in row-major order."""
    flat = owners.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_owners = flat[order]
    first = np.searchsorted(sorted_owners, sorted_owners)  # where each owner's run starts
    ranks = np.empty(flat.size, np.int32)
    ranks[order] = np.arange(flat.size) - first
    return ranks.reshape(owners.shape)


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
    return Grid(shape, edges, owners, frozenset(np.unique(owners).tolist()), _ranks(owners))


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
    checked: dict[tuple[int, tuple[Box, ...]], bool] = {}  # leaves saved alike: one check
    for leaf, grid in enumerate(grids):
        if grid is None:
            continue
        boxes = [b for b in mine.pop(leaf, []) if _reshard.box_size(b) > 0 or not grid.shape]
        key = (id(grid), tuple(boxes))
        if key not in checked:
            planned = grid.cells_of(process) if process in grid.writers else []
            covered = sum(_reshard.box_size(b) for b in boxes)
            expected = sum(_reshard.box_size(b) for b in planned)
            outside = [b for b in boxes if (grid.owners[grid.cell_ranges(b)] != process).any()]
            checked[key] = not outside and covered == expected and len(set(boxes)) == len(boxes)
        if not checked[key]:
            planned = grid.cells_of(process) if process in grid.writers else []
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
    described: dict[int, bytes] = {}  # leaves saved alike share a Grid: described once
    for grid in grids:
        if grid is None:
            h.update(b"-;")
            continue
        if id(grid) not in described:
            described[id(grid)] = (
                json.dumps(grid.edges_json()).encode() + grid.owners.astype("<i4").tobytes() + b";"
            )
        h.update(described[id(grid)])
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
INDEX_VERSION = 2
# One record per chunk: its leaf, the rank of its grid cell among the
# writer's cells of that leaf (``Grid.ranks``), where its bytes are and
# their checksum. Its box follows in the section's bounds (start, stop per
# dimension of its leaf), int32 where every bound of the index fits, else int64.
RECORD = np.dtype(
    [
        ("leaf", "<u4"),
        ("cell", "<u4"),
        ("file", "<u4"),
        ("crc32c", "<u4"),
        ("offset", "<u8"),
        ("nbytes", "<u8"),
    ]
)
# The section table in the index's head: per section, the (cell, leaf) of
# its first record, its record count, its size and its crc32c. Sections
# follow the head in this order, records sorted by (cell, leaf, box).
SECTION = np.dtype(
    [("cell", "<u4"), ("leaf", "<u4"), ("records", "<u4"), ("nbytes", "<u4"), ("crc32c", "<u4")]
)
# A section closes once it holds this many bytes; one cell's records of
# one leaf are never split. Smaller sections let a reader skip more of
# what it does not need; each costs 20 bytes of head.
SECTION_BYTES = 4096


@dataclass(frozen=True)
class IndexRef:
    """What the commit record holds about one process's chunk index."""

    process: int
    name: str
    nbytes: int  # the whole file
    head_bytes: int  # its head: header and section table
    crc32c: int  # of the head (each section carries its own in the head)
    chunks: int

    def to_json(self) -> dict:
        return {
            "process": self.process,
            "name": self.name,
            "bytes": self.nbytes,
            "head_bytes": self.head_bytes,
            "crc32c": self.crc32c,
            "chunks": self.chunks,
        }

    @classmethod
    def from_json(cls, doc: dict) -> IndexRef:
        if "head_bytes" not in doc:
            raise ValueError(
                f"index {doc.get('name')!r} has no head size: it was written by a development "
                "build of distckpt before chunk index version 2; save the checkpoint again"
            )
        return cls(
            doc["process"],
            doc["name"],
            doc["bytes"],
            doc["head_bytes"],
            doc["crc32c"],
            doc["chunks"],
        )


def encode_index(
    process: int, records: Sequence[ChunkRecord], grids: Sequence[Grid | None]
) -> bytes:
    """``process``'s chunk records as an index file; ``grids`` are the save's, by leaf.

    Raises ValueError if a record lies outside the cells the grid gives ``process``.
    """
    return encode_records(process, records, _cells_of(process, records, grids))


def encode_records(process: int, records: Sequence[ChunkRecord], cells: Sequence[int]) -> bytes:
    """The index of ``records``, each filed under the cell rank ``cells`` gives it."""
    order = sorted(range(len(records)), key=lambda i: (cells[i], records[i].leaf, records[i].box))
    records = [records[i] for i in order]
    cells = [cells[i] for i in order]
    files = sorted({c.file for c in records})
    number = {name: i for i, name in enumerate(files)}
    table = np.zeros(len(records), RECORD)
    if records:
        table["leaf"] = [c.leaf for c in records]
        table["cell"] = cells
        table["file"] = [number[c.file] for c in records]
        table["crc32c"] = [c.crc32c for c in records]
        table["offset"] = [c.offset for c in records]
        table["nbytes"] = [c.nbytes for c in records]
    wide = any(v >= 1 << 31 for c in records for r in c.box for v in r)
    bound_type = np.dtype("<i8" if wide else "<i4")
    sections: list[tuple[int, int, int, bytes]] = []  # cell, leaf, records, payload
    start, size = 0, 0
    for i, c in enumerate(records):
        size += RECORD.itemsize + bound_type.itemsize * 2 * len(c.box)
        last = i + 1 == len(records)
        if last or (
            size >= SECTION_BYTES and (cells[i + 1], records[i + 1].leaf) != (cells[i], c.leaf)
        ):
            flat = [v for r in records[start : i + 1] for b in r.box for v in b]
            payload = table[start : i + 1].tobytes() + np.asarray(flat, bound_type).tobytes()
            sections.append((cells[start], records[start].leaf, i + 1 - start, payload))
            start, size = i + 1, 0
    head_table = np.zeros(len(sections), SECTION)
    for j, (cell, leaf, count, payload) in enumerate(sections):
        head_table[j] = (cell, leaf, count, len(payload), crc32c.crc32c(payload))
    header = json.dumps(
        {
            "process": process,
            "files": files,
            "records": len(records),
            "bounds": bound_type.str,
            "sections": len(sections),
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    head = MAGIC + np.asarray([INDEX_VERSION, len(header)], "<u4").tobytes() + header
    return head + head_table.tobytes() + b"".join(s[3] for s in sections)


def _cells_of(
    process: int, records: Sequence[ChunkRecord], grids: Sequence[Grid | None]
) -> list[int]:
    """The rank of each record's grid cell among ``process``'s cells of its leaf."""
    out = [0] * len(records)
    by_grid: dict[int, list[int]] = {}  # leaves saved alike share a Grid: one check each
    for i, c in enumerate(records):
        grid = grids[c.leaf] if c.leaf < len(grids) else None
        if grid is None:
            raise ValueError(f"chunk records of leaf {c.leaf}, which has no grid")
        by_grid.setdefault(id(grid), []).append(i)
    for positions in by_grid.values():
        grid = grids[records[positions[0]].leaf]
        assert grid is not None
        boxes = np.asarray([records[i].box for i in positions], np.int64).reshape(
            len(positions), len(grid.shape), 2
        )
        owner, rank = _containing_cells(grid, boxes)
        if (owner != process).any():
            leaf = records[positions[int(np.argmax(owner != process))]].leaf
            raise ValueError(f"a chunk of leaf {leaf} lies outside the cells of process {process}")
        for i, r in zip(positions, rank.tolist(), strict=True):
            out[i] = r
    return out


def _containing_cells(grid: Grid, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Owner and rank of the cell holding each box (shape (n, rank, 2)); owner -1 for a
    box that does not fit in one cell."""
    n = boxes.shape[0]
    if grid.owners.size == 0:
        return np.full(n, -1, np.int64), np.zeros(n, np.int64)
    cell = []
    fits = np.ones(n, bool)
    for d, e in enumerate(grid.edges):
        edges = np.asarray(e, np.int64)
        i = np.clip(np.searchsorted(edges, boxes[:, d, 0], side="right") - 1, 0, len(e) - 2)
        fits &= (boxes[:, d, 0] >= edges[i]) & (boxes[:, d, 1] <= edges[i + 1])
        cell.append(i)
    key = tuple(cell)
    owner = np.where(fits, grid.owners[key], -1)
    return np.broadcast_to(owner, (n,)), np.broadcast_to(grid.ranks[key], (n,)).astype(np.int64)


def make_ref(process: int, name: str, raw: bytes) -> IndexRef:
    """What the commit record holds about the index ``raw`` that ``encode_index`` made."""
    version, hlen = np.frombuffer(raw, "<u4", 2, 8).tolist()
    header = json.loads(raw[16 : 16 + hlen])
    head = 16 + hlen + SECTION.itemsize * header["sections"]
    return IndexRef(process, name, len(raw), head, crc32c.crc32c(raw[:head]), header["records"])


@dataclass(frozen=True)
class IndexHead:
    """A checked index head: where each section is, and what the records refer to."""

    ref: IndexRef
    files: list[str]
    file_bytes: np.ndarray  # uint64, the size of each of ``files``
    bound_type: np.dtype
    sections: np.ndarray  # SECTION
    starts: np.ndarray  # int64, each section's offset in the file
    keys: np.ndarray  # uint64, each section's first (cell << 32 | leaf)

    def sections_for(self, keys: Iterable[tuple[int, int]]) -> list[int]:
        """The sections that hold the records of these ``(cell, leaf)`` keys."""
        wanted = np.asarray(sorted({(c << 32) | leaf for c, leaf in keys}), np.uint64)
        found = np.searchsorted(self.keys, wanted, side="right") - 1
        return sorted(set(found[found >= 0].tolist()))


def decode_head(raw: bytes | np.ndarray, ref: IndexRef, file_bytes: dict[str, int]) -> IndexHead:
    """Checks and decodes an index's head read as ``raw`` (its first ``ref.head_bytes``).

    ``file_bytes`` gives the size of every data file the commit record
    lists. Raises ValueError naming what is wrong.
    """
    data = bytes(raw) if not isinstance(raw, bytes) else raw
    if len(data) != ref.head_bytes:
        raise ValueError(
            f"has a head of {len(data)} bytes, the commit record says {ref.head_bytes}"
        )
    actual = crc32c.crc32c(data)
    if actual != ref.crc32c:
        raise ValueError(
            f"fails its crc32c (stored {ref.crc32c:#010x}, read {actual:#010x}): it was "
            "damaged after it was written"
        )
    if len(data) < 16 or data[:8] != MAGIC:
        raise ValueError("is not a distckpt chunk index (bad magic)")
    version, hlen = np.frombuffer(data, "<u4", 2, 8).tolist()
    if version != INDEX_VERSION:
        raise ValueError(f"is index version {version}, this distckpt reads {INDEX_VERSION}")
    header = json.loads(data[16 : 16 + hlen])
    files = header["files"]
    if header["process"] != ref.process or header["records"] != ref.chunks:
        raise ValueError("does not match its entry in the commit record (process, record count)")
    if not all(isinstance(f, str) and f in file_bytes for f in files):
        raise ValueError(f"names data files the commit record does not list: {files[:4]}")
    bound_type = np.dtype(header["bounds"])
    if bound_type not in (np.dtype("<i4"), np.dtype("<i8")):
        raise ValueError(f"has bounds of type {bound_type}")
    count = header["sections"]
    at = 16 + hlen
    if not _is_int(count) or at + count * SECTION.itemsize != len(data):
        raise ValueError("its head's size does not match its section count")
    sections = np.frombuffer(data, SECTION, count, at)
    keys = (sections["cell"].astype(np.uint64) << np.uint64(32)) | sections["leaf"]
    if (
        int(sections["records"].sum(dtype=np.int64)) != ref.chunks
        or (sections["records"] == 0).any()
        or (sections["nbytes"] < sections["records"].astype(np.int64) * RECORD.itemsize).any()
        or (keys[1:] <= keys[:-1]).any()
        or ref.head_bytes + int(sections["nbytes"].sum(dtype=np.int64)) != ref.nbytes
    ):
        raise ValueError("has a section table that does not add up to its records and size")
    starts = ref.head_bytes + np.concatenate([[0], np.cumsum(sections["nbytes"], dtype=np.int64)])
    return IndexHead(
        ref,
        list(files),
        np.asarray([file_bytes[f] for f in files], np.uint64),
        bound_type,
        sections,
        starts[:-1],
        keys,
    )


@dataclass(frozen=True)
class LeafFacts:
    """What ``decode_section`` checks records against, per leaf."""

    ranks: np.ndarray  # int64: the leaf's rank, -1 for a leaf without data
    itemsizes: np.ndarray  # int64: bytes per element
    raw: np.ndarray  # bool: stored uncompressed, so a chunk holds exactly its box's bytes


def leaf_facts(leaves: Sequence[tuple[tuple[int, ...] | None, int, bool]]) -> LeafFacts:
    """``LeafFacts`` of ``(shape or None, itemsize, compressed)`` per leaf."""
    return LeafFacts(
        np.asarray([len(s) if s is not None else -1 for s, _, _ in leaves], np.int64),
        np.asarray([size for _, size, _ in leaves], np.int64),
        np.asarray([not compressed for _, _, compressed in leaves], bool),
    )


def decode_section(
    raw: bytes | np.ndarray,
    head: IndexHead,
    number: int,
    facts: LeafFacts,
    grids: Sequence[Grid | None],
) -> dict[tuple[int, int], list[ChunkRecord]]:
    """Checks and decodes section ``number`` of an index, read as ``raw``: its records
    by ``(cell, leaf)``.

    ``facts`` gives each leaf's rank (-1 for leaves without data), item size
    and codec (``leaf_facts``), and ``grids`` each leaf's grid. Raises ValueError naming what is wrong: a
    checksum that does not match, a record of an unknown leaf or file, one
    out of order, a box outside its cell, a raw chunk whose size is not its
    box's, or a chunk past the end of its file.
    A damaged or hostile index gives this error, never a read elsewhere or a
    huge allocation.
    """
    data = bytes(raw) if not isinstance(raw, bytes) else raw
    entry = head.sections[number]
    where = f"section {number}"
    if len(data) != int(entry["nbytes"]):
        raise ValueError(f"{where} holds {len(data)} bytes, its head says {int(entry['nbytes'])}")
    actual = crc32c.crc32c(data)
    if actual != int(entry["crc32c"]):
        raise ValueError(
            f"{where} fails its crc32c (stored {int(entry['crc32c']):#010x}, read "
            f"{actual:#010x}): it was damaged after it was written"
        )
    n = int(entry["records"])
    table = np.frombuffer(data, RECORD, n)
    rest = len(data) - RECORD.itemsize * n
    if rest % head.bound_type.itemsize:
        raise ValueError(f"{where}: its size does not match its records")
    bounds = np.frombuffer(data, head.bound_type, rest // head.bound_type.itemsize, n * 32)
    bounds = bounds.astype(np.int64)
    leaf = table["leaf"].astype(np.int64)
    key = (table["cell"].astype(np.uint64) << np.uint64(32)) | table["leaf"]
    last = head.keys[number + 1] if number + 1 < len(head.keys) else None
    if (
        key[0] != head.keys[number]
        or (key[1:] < key[:-1]).any()
        or (last is not None and key[-1] >= last)
    ):
        raise ValueError(f"{where} has records out of order or outside its key range")
    if leaf.max() >= len(facts.ranks):
        raise ValueError(f"{where} has records of leaves the checkpoint does not have")
    record_ranks = facts.ranks[leaf]
    if (record_ranks < 0).any():
        raise ValueError(f"{where} has chunk records for leaves that store no data")
    widths = 2 * record_ranks
    if int(widths.sum()) != bounds.size:
        raise ValueError(f"{where}: its boxes do not match the ranks of their leaves")
    if (table["file"] >= len(head.files)).any():
        raise ValueError(f"{where} has a record naming a file number the index does not list")
    ends = table["offset"] + table["nbytes"]
    past = (ends < table["offset"]) | (ends > head.file_bytes[table["file"]])
    if past.any():
        bad = int(np.argmax(past))
        raise ValueError(
            f"{where} has a chunk at {head.files[int(table['file'][bad])]} bytes "
            f"{int(table['offset'][bad])}..{int(ends[bad])} past the end of the file"
        )
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    # Every box inside the cell its record names, one check per grid: leaves saved
    # alike share their Grid, so a section of many leaves needs few.
    if any(grids[v] is None for v in np.unique(leaf).tolist()):
        raise ValueError(f"{where} has chunk records of a leaf that has no grid")
    by_grid: dict[int, list[int]] = {}
    for i, value in enumerate(leaf.tolist()):
        by_grid.setdefault(id(grids[value]), []).append(i)
    for members in by_grid.values():
        idx = np.asarray(members)
        grid = grids[int(leaf[idx[0]])]
        assert grid is not None
        rank = len(grid.shape)
        if rank:
            columns = starts[idx][:, None] + np.arange(2 * rank)
            boxes = bounds[columns].reshape(len(idx), rank, 2)
        else:
            boxes = np.zeros((len(idx), 0, 2), np.int64)
        owner, got = _containing_cells(grid, boxes)
        outside = (owner != head.ref.process) | (got != table["cell"][idx])
        if outside.any():
            at = int(idx[int(np.argmax(outside))])
            raise ValueError(
                f"{where} has a chunk box of leaf {int(leaf[at])} outside its cell "
                f"{int(table['cell'][at])} of process {head.ref.process}"
            )
        if rank and (boxes[..., 1] <= boxes[..., 0]).any():
            at = int(idx[int(np.argmax((boxes[..., 1] <= boxes[..., 0]).any(axis=1)))])
            raise ValueError(f"{where} has an empty or inverted chunk box of leaf {int(leaf[at])}")
        # A raw chunk holds exactly its box's bytes; a compressed one at least one byte.
        held = np.prod(boxes[..., 1] - boxes[..., 0], axis=1) * facts.itemsizes[leaf[idx]]
        stored = table["nbytes"][idx].astype(np.int64)
        wrong = np.where(facts.raw[leaf[idx]], stored != held, stored <= 0)
        if wrong.any():
            k = int(np.argmax(wrong))
            raise ValueError(
                f"{where} has a chunk of leaf {int(leaf[idx[k]])} that records {int(stored[k])} "
                f"bytes, its box holds {int(held[k])}"
            )
    out: dict[tuple[int, int], list[ChunkRecord]] = {}
    flat = bounds.tolist()
    pairs = list(zip(flat[0::2], flat[1::2], strict=True))  # (start, stop) per dimension
    files = [head.files[f] for f in table["file"].tolist()]
    at = 0
    for leaf_k, cell_k, rank, f, off, size, crc in zip(
        leaf.tolist(),
        table["cell"].tolist(),
        record_ranks.tolist(),
        files,
        table["offset"].tolist(),
        table["nbytes"].tolist(),
        table["crc32c"].tolist(),
        strict=True,
    ):
        box = tuple(pairs[at : at + rank])
        at += rank
        group = out.get((cell_k, leaf_k))
        if group is None:
            group = out[(cell_k, leaf_k)] = []
        group.append(ChunkRecord(leaf_k, f, off, size, crc, box))
    return out


def decode_index(
    raw: bytes,
    ref: IndexRef,
    facts: LeafFacts,
    grids: Sequence[Grid | None],
    file_bytes: dict[str, int],
) -> list[ChunkRecord]:
    """Every record of a whole index file read as ``raw``, checked (tools and tests)."""
    if len(raw) != ref.nbytes:
        raise ValueError(f"holds {len(raw)} bytes, the commit record says {ref.nbytes}")
    head = decode_head(raw[: ref.head_bytes], ref, file_bytes)
    out: list[ChunkRecord] = []
    for i, start in enumerate(head.starts.tolist()):
        part = decode_section(
            raw[start : start + int(head.sections["nbytes"][i])], head, i, facts, grids
        )
        out += [c for records in part.values() for c in records]
    return sorted(out, key=lambda c: (c.leaf, c.box))
