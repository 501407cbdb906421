"""A committed distckpt checkpoint as a source; every chunk read is checked against its crc32c."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from distckpt import _chunks, _commit, _knobs, _plan, _read, _reshard
from distckpt._location import Location
from distckpt._sources.base import DEFAULT_SLAB_BYTES, Rows, Source, row_slabs
from distckpt._storage import Reader, open_storage


class DistckptSource(Source):
    """A committed distckpt checkpoint; every chunk read is checked against its crc32c."""

    format = "distckpt"

    def __init__(self, directory: Location):
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
        self._reader: Reader | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._table: _chunks.ChunkTable | None = None

    def _open(self) -> tuple[Reader, ThreadPoolExecutor, _chunks.ChunkTable]:
        if self._reader is None:
            self._reader = self.storage.reader(self.manifest.attempt)
            self._pool = ThreadPoolExecutor(_knobs.get("io_threads"))
            self._table = _chunks.ChunkTable(self.manifest, self._reader, self.display)
        assert self._pool is not None and self._table is not None  # opened together
        return self._reader, self._pool, self._table

    def slabs(self, index: int, budget: int = DEFAULT_SLAB_BYTES) -> list[Rows]:
        spec = self.leaves[index]
        edges = self._open()[2].edges(index) if spec.stored else []
        return row_slabs(spec.array_shape, spec.itemsize, budget, edges)

    def read_box(self, index: int, box: _reshard.Box) -> np.ndarray:
        spec = self.leaves[index]
        if not spec.stored:
            raise ValueError(f"{spec.display} is a {spec.kind} leaf; it has no stored data")
        dtype = _plan.np_dtype(spec.dtype)
        out = np.empty(_reshard.box_shape(box), dtype)
        if out.size == 0:
            return out
        reader, pool, table = self._open()

        def consume(c: Any, view: np.ndarray) -> None:
            src = view.view(dtype).reshape(_reshard.box_shape(c.box))
            into, out_of = _reshard.copy_slices(c.box, box)
            out[into] = src[out_of]

        ranges = _plan.plan_reads(table.overlapping(index, box), max_range_bytes=_read.RANGE_BYTES)
        problems = _read.read_ranges(reader, ranges, self.manifest, pool, consume)
        if problems:
            raise _read.corrupt(self.display, problems, "refusing to use wrong data")
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._table = None
