"""A committed checkpoint's chunk records, found by leaf and box, read only where needed.

Format 3 keeps them in one index per writing process (``_index``); a
reader loads the indexes of the processes whose shards overlap what it
needs, checked against the crc32c the commit record holds. Formats 1 and 2
keep them in the manifest. ``ChunkTable`` hides the difference from restore,
verify, copy and the sources.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from distckpt import _index, _layout, _plan, _reshard
from distckpt._index import IndexHead, IndexRef
from distckpt._manifest import Manifest
from distckpt._plan import ChunkRecord
from distckpt._read import ChunkIndex, chunk_index
from distckpt._reshard import Box
from distckpt._storage import Reader, Storage
from distckpt.errors import CorruptCheckpointError

_lock = threading.Lock()
_metadata_bytes = 0


def count_metadata(nbytes: int) -> None:
    """Adds to this process's count of commit-record and index bytes read."""
    global _metadata_bytes
    with _lock:
        _metadata_bytes += nbytes


def metadata_bytes_read() -> int:
    """Bytes of commit records and chunk indexes this process has read so far."""
    return _metadata_bytes


def write_index(
    storage: Storage,
    attempt: str,
    process: int,
    records: list[ChunkRecord],
    grids: Sequence[_index.Grid | None],
) -> IndexRef | None:
    """Writes ``process``'s chunk index into ``attempt`` (None if it wrote no chunk)."""
    if not records:
        return None
    raw = _index.encode_index(process, records, grids)
    name = _layout.index_file(process)
    write_whole(storage, attempt, name, raw)
    return _index.make_ref(process, name, raw)


def write_whole(storage: Storage, attempt: str, name: str, data: Any) -> None:
    """Writes file ``name`` of ``attempt`` in one piece, durable on return."""
    writer = storage.writer(attempt, name)
    try:
        writer.write(memoryview(data))
        writer.close()
    except BaseException:
        writer.abort()
        raise


class ChunkTable:
    """The chunk records of one committed checkpoint, read through ``reader``.

    Every lookup refuses records that would leave part of the asked box
    unfilled or fill part of it twice (``CorruptCheckpointError``), so no
    caller assembles wrong data from a damaged table.

    In format 3 a lookup reads the head of each index it needs once, then
    only the sections holding the cells of the box asked for; ``prefetch``
    reads those of many lookups ahead, in few large reads.
    """

    def __init__(self, manifest: Manifest, reader: Reader, where: str):
        self.manifest, self.reader, self.where = manifest, reader, where
        self._inline: dict[int, ChunkIndex] = {}  # formats 1-2: per leaf, checked once
        self._heads: dict[int, IndexHead] = {}  # format 3: by process, read once
        self._cells: dict[tuple[int, int, int], list[ChunkRecord]] = {}  # (process, cell, leaf)
        self._sections: set[tuple[int, int]] = set()  # (process, section) read
        self._groups: dict[tuple[int, tuple], tuple[list[ChunkRecord], ChunkIndex]] = {}
        self._covered: dict[tuple, list[str]] = {}  # (chunk layout, box) -> problems
        self._refs = {ref.process: ref for ref in manifest.indexes or []}
        self._facts: _index.LeafFacts | None = None  # what index records are checked by
        self._cells_memo: dict[tuple[int, Box], tuple[tuple[tuple[int, int], ...], bool]] = {}
        self._lock = threading.RLock()

    def prefetch(self, wanted: Iterable[tuple[int, Box]]) -> None:
        """Reads the index sections holding the records of every ``(leaf, box)`` ahead of
        the lookups: per index, one read per run of adjacent sections."""
        if self.manifest.chunks is not None:
            return
        keys: dict[int, set[tuple[int, int]]] = {}
        for leaf, box in wanted:
            for process, cell in self._cells_in(leaf, box)[0]:
                keys.setdefault(process, set()).add((cell, leaf))
        for process in sorted(keys):
            self._read_sections(process, self._head(process).sections_for(keys[process]))

    def overlapping(self, leaf: int, box: Box) -> list[ChunkRecord]:
        """The chunks of ``leaf`` that hold any element of ``box``, which they cover exactly."""
        spec = self.manifest.leaves[leaf]
        if self.manifest.chunks is not None:
            chunks = self.manifest.chunks[leaf]
            if leaf not in self._inline:
                _check(self.where, _plan.chunk_table_problems(spec, chunks))
                self._inline[leaf] = chunk_index(tuple(c.box for c in chunks))
            return [chunks[i] for i in self._inline[leaf].overlapping(box)]
        cells, exact = self._cells_in(leaf, box)
        key: tuple
        if exact:  # the box is one saved cell (a restore onto the saved layout): all of it
            found = list(self._cell_records(*cells[0], leaf))
            key = (tuple(c.box for c in found), box)
        else:
            records, index = self._group(leaf, cells)
            found = [records[i] for i in index.overlapping(box)]
            key = (id(index), box)
        # Whether the records found cover the box exactly depends on their boxes
        # only: leaves saved alike share the answer.
        if key not in self._covered:
            self._covered[key] = self._coverage(box, found)
        if self._covered[key]:
            spec = self.manifest.leaves[leaf]
            where = (
                f" of box {[list(r) for r in box]}"
                if box != _reshard.full_box(spec.array_shape)
                else ""
            )
            _check(self.where, [f"{spec.display}{where}: {p}" for p in self._covered[key]])
        return found

    def _group(
        self, leaf: int, cells: tuple[tuple[int, int], ...]
    ) -> tuple[list[ChunkRecord], ChunkIndex]:
        """The records of ``leaf`` in ``cells`` ((process, cell) pairs), checked once, and
        their ChunkIndex."""
        key = (leaf, cells)
        found = self._groups.get(key)
        if found is None:  # sizes were checked with the section (decode_section)
            records = [c for p, cell in cells for c in self._cell_records(p, cell, leaf)]
            found = self._groups[key] = (records, chunk_index(tuple(c.box for c in records)))
        return found

    def _cell_records(self, process: int, cell: int, leaf: int) -> list[ChunkRecord]:
        with self._lock:
            if (process, cell, leaf) not in self._cells:
                self._read_sections(process, self._head(process).sections_for([(cell, leaf)]))
            # A cell the index has no records of stays empty: the coverage check reports it.
            return self._cells.get((process, cell, leaf), [])

    def leaf(self, leaf: int) -> list[ChunkRecord]:
        """Every chunk of ``leaf`` (they cover it exactly)."""
        return self.overlapping(leaf, _reshard.full_box(self.manifest.leaves[leaf].array_shape))

    def all(self, problems: list[str] | None = None) -> list[list[ChunkRecord]]:
        """Every stored leaf's chunks (``[]`` for the others), for tools that read everything.

        With ``problems``, damage is listed there (the leaves it touches get
        no chunks) instead of raised, so ``verify`` can report all of it.
        """
        if problems is None:
            self.prefetch(
                (i, _reshard.full_box(s.array_shape))
                for i, s in enumerate(self.manifest.leaves)
                if s.stored
            )
        out: list[list[ChunkRecord]] = []
        for i, spec in enumerate(self.manifest.leaves):
            if not spec.stored:
                out.append([])
                continue
            try:
                out.append(self.leaf(i))
            except CorruptCheckpointError as e:
                if problems is None:
                    raise
                problems.extend(p for p in e.problems if p not in problems)
                out.append([])
        return out

    def edges(self, leaf: int) -> list[int]:
        """First-dimension boundaries of the saved chunks of ``leaf`` (for cutting slabs)."""
        return sorted({e for c in self.leaf(leaf) if c.box for e in c.box[0]})

    def _cells_in(self, leaf: int, box: Box) -> tuple[tuple[tuple[int, int], ...], bool]:
        """``Grid.cells_in``, and whether ``box`` is exactly one cell; once per grid and
        box (leaves saved alike share both)."""
        grid = self._grid(leaf)
        key = (id(grid), box)
        found = self._cells_memo.get(key)
        if found is None:
            ranges = grid.cell_ranges(box)
            exact = bool(box) and all(r.stop - r.start == 1 for r in ranges)
            exact = exact and grid.cell_box([r.start for r in ranges]) == box
            found = self._cells_memo[key] = (tuple(grid.cells_in(box)), exact)
        return found

    def _grid(self, leaf: int) -> _index.Grid:
        assert self.manifest.grids is not None  # format 3
        grid = self.manifest.grids[leaf]
        assert grid is not None, "a stored leaf has a grid"
        return grid

    def _head(self, process: int) -> IndexHead:
        with self._lock:
            found = self._heads.get(process)
            if found is None:
                ref = self._refs.get(process)
                if ref is None:
                    raise _corrupt(
                        self.where,
                        f"the commit record gives process {process} shards to write but lists "
                        "no chunk index of it",
                    )
                raw = self.reader.read(ref.name, 0, ref.head_bytes)  # missing or short: corrupt
                count_metadata(ref.head_bytes)
                found = self._heads[process] = self._decoded(
                    ref,
                    lambda: _index.decode_head(
                        raw, ref, {n: info["bytes"] for n, info in self.manifest.files.items()}
                    ),
                )
            return found

    def _read_sections(self, process: int, numbers: list[int]) -> None:
        """Reads and decodes these sections of ``process``'s index, but those read already;
        adjacent ones (or ones less than ``GAP_BYTES`` apart) in one read."""
        with self._lock:
            head = self._head(process)
            numbers = [n for n in numbers if (process, n) not in self._sections]
            if self._facts is None:
                self._facts = leaf_facts(self.manifest)
            facts, grids = self._facts, self.manifest.grids or []
            sizes = head.sections["nbytes"]
            for run in _runs(numbers, head.starts, sizes):
                begin = int(head.starts[run[0]])
                end = int(head.starts[run[-1]]) + int(sizes[run[-1]])
                raw = self.reader.read(head.ref.name, begin, end - begin)
                count_metadata(end - begin)
                for n in run:
                    at = int(head.starts[n]) - begin
                    part = raw[at : at + int(sizes[n])]
                    decoded = self._decoded(
                        head.ref,
                        functools.partial(_index.decode_section, part, head, n, facts, grids),
                    )
                    for (cell, leaf), records in decoded.items():
                        self._cells[(process, cell, leaf)] = records
                    self._sections.add((process, n))

    def _decoded(self, ref: IndexRef, decode: Callable[[], Any]) -> Any:
        try:
            return decode()
        except (ValueError, KeyError, TypeError) as e:
            raise _corrupt(
                self.where, f"chunk index {self.reader.display}/{ref.name} {e}"
            ) from None

    @staticmethod
    def _coverage(box: Box, found: list[ChunkRecord]) -> list[str]:
        """Holes and overlaps of ``found`` inside ``box``."""
        if _reshard.box_size(box) == 0:
            return []
        clipped = []
        for c in found:
            inter = _reshard.intersect(c.box, box) if box else ()
            assert inter is not None  # found by overlap
            clipped.append(
                tuple((lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, box, strict=True))
            )
        return _reshard.coverage_problems(_reshard.box_shape(box), clipped)


def leaf_facts(manifest: Manifest) -> _index.LeafFacts:
    """What a version-3 index's records are checked against, from the commit record."""
    return _index.leaf_facts(
        [
            (s.shape, s.itemsize, s.compression is not None) if s.stored else (None, 1, False)
            for s in manifest.leaves
        ]
    )


GAP_BYTES = 64 << 10  # sections closer than this are read in one read, the gap with them


def _runs(numbers: list[int], starts: Any, sizes: Any) -> list[list[int]]:
    """``numbers`` (sorted section numbers) grouped into runs read in one read each."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs:
            prev = runs[-1][-1]
            if int(starts[n]) - (int(starts[prev]) + int(sizes[prev])) <= GAP_BYTES:
                runs[-1].append(n)
                continue
        runs.append([n])
    return runs


def _check(where: str, lines: list[str]) -> None:
    if lines:
        raise CorruptCheckpointError(
            f"the chunk records of {where} are damaged:\n  " + "\n  ".join(lines[:20]), lines
        )


def _corrupt(where: str, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"checkpoint at {where} is corrupt: {problem}. The checkpoint's metadata is damaged; "
        "restore an older step or a backup.",
        [problem],
    )
