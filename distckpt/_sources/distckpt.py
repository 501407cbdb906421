"""A committed distckpt checkpoint as a source; every chunk read is checked against its crc32c."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from distckpt import _commit, _knobs, _plan, _read, _reshard
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
        self._checked: set[int] = set()

    def slabs(self, index: int, budget: int = DEFAULT_SLAB_BYTES) -> list[Rows]:
        spec = self.leaves[index]
        edges = {e for c in self.manifest.chunks[index] if c.box for e in c.box[0]}
        return row_slabs(spec.array_shape, spec.itemsize, budget, sorted(edges))

    def read_box(self, index: int, box: _reshard.Box) -> np.ndarray:
        spec = self.leaves[index]
        if not spec.stored:
            raise ValueError(f"{spec.display} is a {spec.kind} leaf; it has no stored data")
        chunks = self.manifest.chunks[index]
        if index not in self._checked:
            _read.check_chunk_table(spec, chunks, self.display)
            self._checked.add(index)
        dtype = _plan.np_dtype(spec.dtype)
        out = np.empty(_reshard.box_shape(box), dtype)
        if out.size == 0:
            return out
        if self._reader is None:
            self._reader = self.storage.reader(self.manifest.attempt)
            self._pool = ThreadPoolExecutor(_knobs.get("io_threads"))
        assert self._pool is not None  # created with the reader

        def consume(c: Any, view: np.ndarray) -> None:
            src = view.view(dtype).reshape(_reshard.box_shape(c.box))
            into, out_of = _reshard.copy_slices(c.box, box)
            out[into] = src[out_of]

        needed = _plan.chunks_for(box, chunks)
        ranges = _plan.plan_reads(needed, max_range_bytes=_read.RANGE_BYTES)
        problems = _read.read_ranges(self._reader, ranges, self.manifest, self._pool, consume)
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
