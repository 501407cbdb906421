"""Index-box maths: shards, chunks, intersections, coverage. Pure functions.

A box is a tuple of half-open ``(start, stop)`` ranges, one per dimension.
The empty tuple is the box of a 0-d array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

Box = tuple[tuple[int, int], ...]


def box_from_index(index: Sequence[slice], shape: Sequence[int]) -> Box:
    """The box a shard's ``index`` (a tuple of slices, as JAX gives it) selects."""
    box = []
    for sl, n in zip(index, shape, strict=True):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {sl} is not supported")
        box.append((start, stop))
    return tuple(box)


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, n) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_size(box: Box) -> int:
    return math.prod(box_shape(box))


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b``, or None when they share no element."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def relative(inner: Box, outer: Box) -> tuple[slice, ...]:
    """Slices that select ``inner`` from an array holding ``outer``."""
    return tuple(slice(i0 - o0, i1 - o0) for (i0, i1), (o0, _) in zip(inner, outer, strict=True))


@functools.lru_cache(maxsize=1 << 16)
def copy_slices(src: Box, dst: Box) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """``(into dst, out of src)``: slices that copy the elements two boxes share.

    Cached: a state's leaves repeat the same chunk and shard boxes.
    """
    inter = intersect(src, dst)
    if inter is None:
        raise ValueError(f"boxes {src} and {dst} share no element")
    return relative(inter, dst), relative(inter, src)


# The largest chunk the shard-size rule grows a chunk to (docs/format.md,
# "Chunk size"). It equals the read range of ``_read.RANGE_BYTES``, so a grown
# chunk is still one read into one reading thread's scratch buffer and one
# crc32c call, and restore's memory per reading thread does not grow with it.
MAX_CHUNK_BYTES = 16 << 20


def chunk_shape(
    shape: Sequence[int], itemsize: int, chunk_bytes: int, *, max_chunks: int | None = None
) -> tuple[int, ...]:
    """Chooses the checksummed chunk shape for a saved shard of ``shape``.

    Restoring onto another sharding reads whole chunks, so a chunk that
    straddles a target shard boundary is read twice. Two rules keep that
    cheap: every dimension is halved once while chunks stay at least an
    eighth of ``chunk_bytes`` (the usual reshard doubles or halves a mesh
    axis), then the longest dimension is halved until a chunk fits in
    ``chunk_bytes``. Ties split the leading dimension, which keeps chunks
    contiguous in memory.

    With ``max_chunks``, no halving may take the shard past ``max_chunks``
    chunks unless the chunk is still larger than ``MAX_CHUNK_BYTES`` (or
    ``chunk_bytes``, if that is larger): a large shard gets large chunks, so
    the number of chunk records follows the number of shards rather than the
    bytes. Without it (None) every chunk fits in ``chunk_bytes``, however many
    that takes. Pure: the same arguments give the same shape everywhere.

    Example::

      chunk_shape((4096, 4096), 2, 256 << 10)                 # (256, 512): 128 chunks of 256 KiB
      chunk_shape((4096, 4096), 2, 256 << 10, max_chunks=64)  # (512, 512): 64 chunks of 512 KiB
    """
    c = list(shape)
    if not c or 0 in c:
        return tuple(c)
    floor = max(1, chunk_bytes // 8)
    cap = max(chunk_bytes, MAX_CHUNK_BYTES)

    def nbytes() -> int:
        return math.prod(c) * itemsize

    def allowed(d: int) -> bool:
        """Whether halving dimension ``d`` keeps the shard within ``max_chunks`` chunks."""
        if max_chunks is None or nbytes() > cap:
            return True
        half = -(-c[d] // 2)
        count = math.prod(
            -(-n // (half if i == d else k)) for i, (n, k) in enumerate(zip(shape, c, strict=True))
        )
        return count <= max_chunks

    if nbytes() > floor:
        for d in range(len(c)):
            if c[d] >= 2 and nbytes() // 2 >= floor and allowed(d):
                c[d] = -(-c[d] // 2)
    while nbytes() > chunk_bytes:
        d = max(range(len(c)), key=lambda i: (c[i], -i))
        if c[d] == 1 or not allowed(d):
            break
        c[d] = -(-c[d] // 2)
    return tuple(c)


def chunk_boxes(shard: Box, chunk: Sequence[int]) -> list[Box]:
    """The chunks of ``shard`` in C order of the chunk grid (the order on disk)."""
    if not shard:
        return [()]
    if box_size(shard) == 0:
        return []
    axes = []
    for (start, stop), step in zip(shard, chunk, strict=True):
        axes.append([(s, min(s + step, stop)) for s in range(start, stop, step)])
    return [tuple(combo) for combo in _product(axes)]


def _product(axes: list[list[tuple[int, int]]]) -> list[tuple[tuple[int, int], ...]]:
    out: list[tuple[tuple[int, int], ...]] = [()]
    for axis in axes:
        out = [prev + (r,) for prev in out for r in axis]
    return out


def coverage_problems(shape: Sequence[int], boxes: Sequence[Box]) -> list[str]:
    """Checks that ``boxes`` cover every element of ``shape`` exactly once.

    Works on the grid of distinct box boundaries (one cell per region no box
    edge crosses), so the cost follows the number of boxes, not of elements.
    Returns human-readable problems (empty when the tiling is exact).
    """
    if len(boxes) == 1 and boxes[0] == full_box(shape):
        return []  # the common case of a small leaf written whole
    return list(_coverage(tuple(shape), tuple(boxes)))


@functools.lru_cache(maxsize=1024)
def _coverage(shape: tuple[int, ...], boxes: tuple[Box, ...]) -> tuple[str, ...]:
    """``coverage_problems``, cached: the leaves of a state repeat a few chunk layouts."""
    whole = full_box(shape)
    problems = [
        f"box {list(b)} lies outside the array of shape {tuple(shape)}"
        for b in boxes
        if len(b) != len(shape) or (box_size(b) > 0 and intersect(b, whole) != b)
    ]
    if problems:
        return tuple(problems)
    if not shape:
        if len(boxes) != 1:
            problems.append(f"a 0-d value was written {len(boxes)} times, expected once")
        return tuple(problems)
    if box_size(whole) == 0:
        return tuple(problems)
    nonempty = [b for b in boxes if box_size(b) > 0]
    edges = [
        sorted({0, n} | {b[d][0] for b in nonempty} | {b[d][1] for b in nonempty})
        for d, n in enumerate(shape)
    ]
    counts = np.zeros([len(e) - 1 for e in edges], dtype=np.int32)
    position = [{v: i for i, v in enumerate(e)} for e in edges]
    for b in nonempty:
        counts[tuple(slice(position[d][lo], position[d][hi]) for d, (lo, hi) in enumerate(b))] += 1
    for label, mask in (
        ("written by no process", counts == 0),
        ("written more than once", counts > 1),
    ):
        if mask.any():
            cells = np.argwhere(mask)
            first = tuple((int(edges[d][i]), int(edges[d][i + 1])) for d, i in enumerate(cells[0]))
            problems.append(f"{len(cells)} region(s) {label}, e.g. {list(first)}")
    return tuple(problems)
