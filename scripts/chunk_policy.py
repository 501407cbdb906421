#!/usr/bin/env python3
"""What the chunk-size policy costs and saves, computed from shapes alone (no I/O, no JAX).

    PYTHONPATH=. python scripts/chunk_policy.py            # both tables, as Markdown
    PYTHONPATH=. python scripts/chunk_policy.py --max-chunks 32

Prints two tables for docs/format.md ("Chunk size"):

1. chunk records of a 70B-parameter model's training state (float32 parameters
   and the two AdamW moments: 0.83 TB), every leaf sharded N ways, before (every
   chunk at most ``DISTCKPT_CHUNK_BYTES``) and after (at most
   ``--max-chunks`` per shard, chunks up to ``_reshard.MAX_CHUNK_BYTES``);
2. read amplification of the reshards scripts/bench.py runs (and of doubling,
   halving and transposing a mesh axis) for shards from 1 MiB to 4 GiB: bytes
   of the chunks a reader must read over the bytes it needs.

Amplification is counted per target shard, as if every device of the target
were its own process (the worst case: a process reads a chunk once for all of
its devices), except in the rows marked "per process", which group devices as
the benchmark's processes hold them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distckpt import _reshard  # noqa: E402  (after the path fix, for a plain `python scripts/...`)
from distckpt._reshard import Box  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK_BYTES = 256 * KiB  # the DISTCKPT_CHUNK_BYTES default


def size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def chunk_of(shape: Sequence[int], itemsize: int, max_chunks: int | None) -> tuple[int, ...]:
    return _reshard.chunk_shape(shape, itemsize, CHUNK_BYTES, max_chunks=max_chunks)


def count(shape: Sequence[int], chunk: Sequence[int]) -> int:
    return math.prod(-(-n // c) for n, c in zip(shape, chunk, strict=True)) if shape else 1


# --------------------------------------------------------------------------- records


def llama70b_leaves() -> list[tuple[int, ...]]:
    """The parameter shapes of a 70B model (Llama-2-70B's: d 8192, MLP 28672,
    80 layers, 8 key/value heads of 128, vocabulary 32000): 69.0e9 parameters."""
    d, f, kv, vocab, layers = 8192, 28672, 1024, 32000, 80
    block = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d), (d,), (d,)]
    return [(vocab, d), (d, vocab), (d,)] + block * layers


def shard_shape(shape: tuple[int, ...], ways: int) -> tuple[int, ...]:
    """The shard of ``shape`` cut ``ways`` ways, largest dimensions first, by powers of two
    that divide them (how an FSDP x tensor-parallel mesh cuts a leaf)."""
    out, left = list(shape), ways
    for d in sorted(range(len(out)), key=lambda i: -out[i]):
        while left > 1 and out[d] % 2 == 0:
            out[d] //= 2
            left //= 2
    return tuple(out)


def records_table(max_chunks: int) -> list[str]:
    params = llama70b_leaves()
    leaves = params * 3  # parameters, AdamW mu and nu, all float32
    total = sum(math.prod(s) for s in leaves) * 4
    lines = [
        f"70B model, float32 parameters + AdamW mu and nu: {len(leaves)} leaves, "
        f"{total / 1e12:.2f} TB; chunk_bytes {size(CHUNK_BYTES)}, "
        f"max_chunks_per_shard {max_chunks}, chunks up to {size(_reshard.MAX_CHUNK_BYTES)}",
        "",
        "| shards per leaf | shards | largest shard | records before | records after "
        "| most records per shard, before → after | manifest chunk records, after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ways in (8192, 512, 64, 8):
        shards = before = after = most_before = most_after = 0
        largest = 0
        for shape in leaves:
            shard = shard_shape(shape, ways)
            n = math.prod(shape) // math.prod(shard)
            b = count(shard, chunk_of(shard, 4, None))
            a = count(shard, chunk_of(shard, 4, max_chunks))
            shards += n
            before += n * b
            after += n * a
            most_before, most_after = max(most_before, b), max(most_after, a)
            largest = max(largest, math.prod(shard) * 4)
        # A record in manifest.json is about 60 bytes of JSON.
        lines.append(
            f"| {ways} | {shards:,} | {size(largest)} | {before:,} | {after:,} "
            f"| {most_before:,} → {most_after:,} | ~{size(after * 60)} |"
        )
    return lines


# --------------------------------------------------------------------------- amplification


def grid_boxes(shape: tuple[int, ...], grid: tuple[int, ...]) -> list[Box]:
    """The shards of ``shape`` on a mesh of ``grid`` (dimension d split grid[d] ways)."""
    boxes: list[Box] = [()]
    for n, g in zip(shape, grid, strict=True):
        step = -(-n // g)
        boxes = [b + ((i * step, min(n, (i + 1) * step)),) for b in boxes for i in range(g)]
    return boxes


def touched(shard: Box, chunk: Sequence[int], want: Box) -> int:
    """Elements of the chunks of ``shard`` (grid ``chunk`` from its start) that overlap
    ``want``. The chunks overlapping a box form a product of per-dimension runs, so the
    count is the product of each dimension's run length."""
    out = 1
    for (s0, s1), c, (w0, w1) in zip(shard, chunk, want, strict=True):
        lo, hi = max(s0, w0), min(s1, w1)
        if lo >= hi:
            return 0
        first = s0 + (lo - s0) // c * c
        last = min(s1, s0 + ((hi - 1 - s0) // c + 1) * c)
        out *= last - first
    return out


def amplification(
    shape: tuple[int, ...],
    save: tuple[int, ...],
    readers: list[Box],
    max_chunks: int | None,
    itemsize: int = 4,
) -> float:
    """Bytes of chunks read / bytes needed, when each box of ``readers`` is one reader."""
    shards = grid_boxes(shape, save)
    chunk = chunk_of(_reshard.box_shape(shards[0]), itemsize, max_chunks)
    read = sum(touched(s, chunk, r) for r in readers for s in shards)
    return read / sum(_reshard.box_size(r) for r in readers)


def row_bands(shape: tuple[int, ...], rows: int) -> list[Box]:
    """The bench's 4x2 restore per process: process p holds mesh row p, a band of rows."""
    return grid_boxes(shape, (rows, 1))


# (label, save grid, target grid, per process?): the benchmark's three restores, then a
# mesh axis doubled or halved, then transposed.
CASES: list[tuple[str, tuple[int, int], tuple[int, int] | str]] = [
    ("bench 2x4 → 2x4", (2, 4), (2, 4)),
    ("bench 2x4 → 1x8 cols, per process", (2, 4), "one process"),
    ("bench 2x4 → 1x8 cols, per device", (2, 4), (1, 8)),
    ("bench 2x4 → 4x2, per process", (2, 4), "row bands"),
    ("bench 2x4 → 4x2, per device", (2, 4), (4, 2)),
    ("2x4 → 4x4", (2, 4), (4, 4)),
    ("2x4 → 2x8", (2, 4), (2, 8)),
    ("2x4 → 1x4", (2, 4), (1, 4)),
    ("2x4 → 2x2", (2, 4), (2, 2)),
    ("2x4 → 4x8", (2, 4), (4, 8)),
    ("8x1 → 1x8", (8, 1), (1, 8)),
    ("1x8 → 8x1", (1, 8), (8, 1)),
    # Beyond the benchmark: 16 devices transposed, and a cut 8x finer than saved.
    ("16x1 → 1x16", (16, 1), (1, 16)),
    ("2x4 → 1x32", (2, 4), (1, 32)),
    # Not a power of two: target boundaries that fall inside chunks.
    ("2x4 → 3x1", (2, 4), (3, 1)),
    ("2x4 → 6x4", (2, 4), (6, 4)),
]


def readers_for(shape: tuple[int, int], target: tuple[int, int] | str) -> list[Box]:
    if target == "one process":
        return [_reshard.full_box(shape)]
    if target == "row bands":
        return row_bands(shape, 4)
    assert not isinstance(target, str)
    return grid_boxes(shape, target)


def leaf_side(shard_bytes: int) -> int:
    """The side of the bench's square float32 leaf whose 2x4 shards are about
    ``shard_bytes``: 8 shards, rounded to a multiple of 256 as model dimensions are."""
    return max(256, round(math.sqrt(8 * shard_bytes / 4) / 256) * 256)


def amplification_table(max_chunks: int) -> list[str]:
    targets = [MiB << (2 * k) for k in range(7)]  # 1 MiB, 4 MiB, ..., 4 GiB
    sides = [leaf_side(t) for t in targets]
    head = " | ".join(size(s * s * 4 / 8) for s in sides)
    lines = [
        "Read amplification (bytes of chunks read / bytes needed), square float32 leaves "
        "whose 2x4 shards have the size in the header; before → after:",
        "",
        f"| reshard | {head} |",
        "| --- |" + " ---: |" * len(sides),
    ]
    worst: dict[str, list[float]] = {"before": [], "after": []}
    for label, save, target in CASES:
        cells = []
        for side in sides:
            shape = (side, side)
            readers = readers_for(shape, target)
            b = amplification(shape, save, readers, None)
            a = amplification(shape, save, readers, max_chunks)
            if not any(k in label for k in ("3x1", "6x4")):
                worst["before"].append(b)
                worst["after"].append(a)
            cells.append(f"{b:.2f} → {a:.2f}" if abs(a - b) > 0.005 else f"{a:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| shard size | " + head + " |",
        "| --- |" + " ---: |" * len(sides),
    ]
    for what, policy in (("records per shard, before", None), ("after", max_chunks)):
        cells = []
        for side in sides:
            shard = (side // 2, side // 4)
            chunk = chunk_of(shard, 4, policy)
            cells.append(f"{count(shard, chunk)} × {size(math.prod(chunk) * 4)}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"median amplification over the power-of-two rows: before {statistics.median(worst['before']):.2f}, "
        f"after {statistics.median(worst['after']):.2f}; worst: before "
        f"{max(worst['before']):.2f}, after {max(worst['after']):.2f}"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-chunks", type=int, default=64, help="chunks per shard (64)")
    args = parser.parse_args(argv)
    print("\n".join(records_table(args.max_chunks)))
    print()
    print("\n".join(amplification_table(args.max_chunks)))


if __name__ == "__main__":
    main()
