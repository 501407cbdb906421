"""The interface of a readable checkpoint of any format: leaves, read by box or by slab.

A *slab* is a range of rows (the first dimension) of one leaf; reading slab
by slab keeps host memory near the slab budget whatever the size of a leaf.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distckpt import _reshard
from distckpt._plan import LeafSpec

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


class Source(abc.ABC):
    """A readable checkpoint. ``leaves`` are in save (flattening) order."""

    format: str
    display: str
    leaves: list[LeafSpec]
    user_metadata: Any = None
    info: dict  # format-specific facts for ``inspect`` (versions, processes, ...)
    # What every process of a restore must find alike (a digest of the headers
    # or metadata it read): they read one checkpoint, not one each.
    identity: str = ""
    # Whether restore reads the boxes a process needs of one leaf as their
    # bounding block when they fill at least half of it (``_source_restore``):
    # right for byte-range reads, where boxes apart would each read whole pages.
    merge_boxes: bool = True

    @abc.abstractmethod
    def read_box(self, index: int, box: _reshard.Box) -> np.ndarray:
        """The stored data of leaf ``index`` (key data for PRNG keys) inside ``box``."""

    def tensor_of(self, index: int) -> tuple[str, str] | None:
        """(stored name, file) of leaf ``index`` in formats that name tensors; else None."""
        return None

    def read(self, index: int, rows: Rows = None) -> np.ndarray:
        """The stored data of leaf ``index`` (key data for PRNG keys), rows ``rows``."""
        return self.read_box(index, rows_box(self.leaves[index].array_shape, rows))

    def slabs(self, index: int, budget: int = DEFAULT_SLAB_BYTES) -> list[Rows]:
        spec = self.leaves[index]
        return row_slabs(spec.array_shape, spec.itemsize, budget)

    def iter_slabs(
        self, index: int, budget: int = DEFAULT_SLAB_BYTES
    ) -> Iterator[tuple[Rows, np.ndarray]]:
        for rows in self.slabs(index, budget):
            yield rows, self.read(index, rows)

    def read_all(self, index: int) -> np.ndarray:
        spec = self.leaves[index]
        return self.read(index, None if not spec.shape else (0, spec.shape[0]))

    def close(self) -> None:  # noqa: B027 - most sources hold nothing open
        """Releases what the source holds open."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
