"""A checkpoint as a list of leaves read a slab at a time: what diff, export and convert read.

Two implementations share one small interface: ``DistckptSource`` (a
committed distckpt checkpoint, every chunk's crc32c checked) and, in
``_orbax.py``, ``OrbaxSource``. A *slab* is a range of rows (the first
dimension) of one leaf; reading slab by slab keeps host memory near the
slab budget whatever the size of a leaf.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from distckpt import _commit, _knobs, _plan, _reshard, _restore
from distckpt._plan import LeafSpec
from distckpt._storage import open_storage
from distckpt.errors import CorruptCheckpointError

Rows = tuple[int, int] | None  # a half-open range of rows; None: the whole (0-d) leaf

DEFAULT_SLAB_BYTES = 64 << 20


def row_slabs(
    shape: Sequence[int], itemsize: int, budget: int, edges: Sequence[int] = ()
) -> list[Rows]:
    """Cuts a leaf into row ranges of about ``budget`` bytes.

    Cuts fall on ``edges`` (the first-dimension boundaries of stored chunks)
    where possible, so that no chunk is read twice; a stretch between two
    edges that is larger than ``budget`` is cut evenly. Pure.
    """
    if not shape:
        return [None]
    rows = shape[0]
    if rows == 0:
        return [(0, 0)]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    per_slab = max(1, budget // row_bytes)
    cuts = sorted({0, rows, *(e for e in edges if 0 < e < rows)})
    out: list[Rows] = []
    start = 0
    for prev, edge in zip(cuts, cuts[1:], strict=False):
        if edge - start > per_slab and prev > start:
            out.append((start, prev))  # close the slab at the last edge that fit
            start = prev
        while edge - start > per_slab:  # one stretch between edges is too big: cut evenly
            out.append((start, start + per_slab))
            start += per_slab
    if start < rows:
        out.append((start, rows))
    return out


def rows_box(shape: Sequence[int], rows: Rows) -> _reshard.Box:
    box = _reshard.full_box(shape)
    if rows is None:
        return box
    return ((rows[0], rows[1]), *box[1:])


class Source:
    """A readable checkpoint. ``leaves`` are in save (flattening) order."""

    format: str
    display: str
    leaves: list[LeafSpec]
    user_metadata: Any = None
    info: dict  # format-specific facts for ``inspect`` (versions, processes, ...)

    def read(self, index: int, rows: Rows = None) -> np.ndarray:
        """The stored data of leaf ``index`` (key data for PRNG keys), rows ``rows``."""
        raise NotImplementedError

    def slabs(self, index: int, budget: int = DEFAULT_SLAB_BYTES) -> list[Rows]:
        spec = self.leaves[index]
        return row_slabs(spec.shape, spec.itemsize, budget)

    def iter_slabs(
        self, index: int, budget: int = DEFAULT_SLAB_BYTES
    ) -> Iterator[tuple[Rows, np.ndarray]]:
        for rows in self.slabs(index, budget):
            yield rows, self.read(index, rows)

    def read_all(self, index: int) -> np.ndarray:
        spec = self.leaves[index]
        return self.read(index, None if not spec.shape else (0, spec.shape[0]))

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DistckptSource(Source):
    """A committed distckpt checkpoint; every chunk read is checked against its crc32c."""

    format = "distckpt"

    def __init__(self, directory: Any):
        self.storage = open_storage(directory)
        self.manifest = _commit.load(self.storage)
        self.display = self.storage.display
        self.leaves = self.manifest.leaves
        self.user_metadata = self.manifest.user_metadata
        m = self.manifest
        self.info = {
            "format_version": m.format_version,
            "versions": m.versions,
            "created": m.created,
            "process_count": m.process_count,
            "device_count": m.device_count,
            "save_stats": m.save_stats,
            "manager": m.manager,
            "files": len(m.files),
            "total_bytes": sum(f["bytes"] for f in m.files.values()),
        }
        self._reader = None
        self._pool: ThreadPoolExecutor | None = None
        self._checked: set[int] = set()

    def slabs(self, index: int, budget: int = DEFAULT_SLAB_BYTES) -> list[Rows]:
        spec = self.leaves[index]
        edges = {e for c in self.manifest.chunks[index] if c.box for e in c.box[0]}
        return row_slabs(spec.shape, spec.itemsize, budget, sorted(edges))

    def read(self, index: int, rows: Rows = None) -> np.ndarray:
        spec = self.leaves[index]
        if not spec.stored:
            raise ValueError(f"{spec.display} is a {spec.kind} leaf; it has no stored data")
        chunks = self.manifest.chunks[index]
        if index not in self._checked:
            _restore._check_chunk_table(spec, chunks, self.display)
            self._checked.add(index)
        box = rows_box(spec.shape, rows)
        dtype = _plan.np_dtype(spec.dtype)
        out = np.empty(_reshard.box_shape(box), dtype)
        if out.size == 0:
            return out
        if self._reader is None:
            self._reader = self.storage.reader(self.manifest.attempt)
            self._pool = ThreadPoolExecutor(_knobs.get("io_threads"))

        def consume(c: Any, view: np.ndarray) -> None:
            src = view.view(dtype).reshape(_reshard.box_shape(c.box))
            into, out_of = _reshard.copy_slices(c.box, box)
            out[into] = src[out_of]

        needed = _plan.chunks_for(box, chunks)
        ranges = _plan.plan_reads(needed, max_range_bytes=16 << 20)
        problems = _restore.read_ranges(self._reader, ranges, self.manifest, self._pool, consume)
        if problems:
            raise CorruptCheckpointError(
                f"checkpoint at {self.display} is corrupt; refusing to use wrong data "
                f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:20]),
                problems,
            )
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def open_source(path: Any) -> Source:
    """A distckpt checkpoint, or an Orbax one (detected by its ``_METADATA`` file)."""
    from distckpt import _orbax

    if isinstance(path, (str, os.PathLike)):
        root = _orbax.find_root(os.fspath(path))
        if root is not None:
            return _orbax.OrbaxSource(root)
    return DistckptSource(path)
