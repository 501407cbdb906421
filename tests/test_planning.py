"""Pure planners and box maths: no devices, no I/O."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt import _knobs, _plan, _reshard, _tree
from distckpt._plan import ChunkRecord


def test_chunk_shape_splits_every_dim_once_then_the_longest():
    # A 2 MiB float32 shard becomes 512 KiB chunks: both dims halved, so a
    # target that halves either mesh axis reads no byte it does not need.
    assert _reshard.chunk_shape((1024, 512), 4, 1 << 20) == (512, 256)
    assert _reshard.chunk_shape((1 << 20,), 4, 1 << 20) == (1 << 18,)
    assert _reshard.chunk_shape((16,), 4, 1 << 20) == (16,)  # small: one chunk
    assert _reshard.chunk_shape((), 4, 1 << 20) == ()
    assert _reshard.chunk_shape((0, 5), 4, 1 << 20) == (0, 5)
    big = _reshard.chunk_shape((8192, 8192), 2, 1 << 20)
    assert math.prod(big) * 2 <= 1 << 20


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 24), min_size=0, max_size=3),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    chunk_bytes=st.integers(16, 4096),
    max_chunks=st.sampled_from([None, 1, 3, 64]),
)
def test_chunks_tile_the_shard_exactly(shape, itemsize, chunk_bytes, max_chunks):
    box = _reshard.full_box(shape)
    chunk = _reshard.chunk_shape(shape, itemsize, chunk_bytes, max_chunks=max_chunks)
    chunks = _reshard.chunk_boxes(box, chunk)
    assert _reshard.coverage_problems(shape, chunks) == []
    if math.prod(shape) > 0:
        assert all(_reshard.box_size(c) > 0 for c in chunks)


def test_coverage_problems_name_overlaps_and_holes():
    assert "more than once" in _reshard.coverage_problems((4,), [((0, 3),), ((2, 4),)])[0]
    assert "written by no process" in _reshard.coverage_problems((4,), [((0, 2),)])[0]
    assert "outside" in _reshard.coverage_problems((4,), [((2, 6),)])[0]
    assert _reshard.coverage_problems((), [()]) == []
    assert "2 times" in _reshard.coverage_problems((), [(), ()])[0]


def test_plan_writes_packs_small_leaves_and_splits_segments():
    shards = [(i, ((0, 256),), 4) for i in range(100)]  # 100 leaves of 1 KiB
    files = _plan.plan_writes(shards, process=3, chunk_bytes=1 << 20, segment_bytes=1 << 20)
    assert [f.name for f in files] == ["p00003.s000.bin"]
    files = _plan.plan_writes(shards, process=0, chunk_bytes=1 << 20, segment_bytes=10 * 1024)
    assert len(files) == 10 and all(f.nbytes == 10 * 1024 for f in files)


def test_plan_reads_merges_neighbours_and_reads_each_chunk_once():
    def rec(file, offset, n=10):
        return ChunkRecord(0, file, offset, n, 0, ((offset, offset + n),))

    chunks = [rec("a", 0), rec("a", 10), rec("a", 10), rec("a", 30), rec("b", 0)]
    ranges = _plan.plan_reads(chunks)
    assert [(r.file, r.offset, r.nbytes, len(r.chunks)) for r in ranges] == [
        ("a", 0, 20, 2),
        ("a", 30, 10, 1),
        ("b", 0, 10, 1),
    ]
    assert len(_plan.plan_reads(chunks, max_range_bytes=10)) == 4


def _count(shape, chunk):
    return math.prod(-(-n // c) for n, c in zip(shape, chunk, strict=True))


@pytest.mark.parametrize(
    "shape,itemsize,chunks,chunk_mib",
    [
        ((16384, 16384), 4, 64, 16),  # 1 GiB: 64 chunks of 16 MiB (256 KiB chunks: 4096)
        ((32768, 32768), 4, 256, 16),  # 4 GiB: chunks stop growing at 16 MiB
        ((8192, 28672), 2, 64, 7),  # an MLP weight in bfloat16, 448 MiB
        ((1 << 28,), 4, 64, 16),  # a 1 GiB vector
        ((80, 1024, 4096), 2, 64, 10),  # stacked layers, 640 MiB
        ((4096, 4096), 2, 64, 0.5),  # 32 MiB: 64 chunks of 512 KiB (256 KiB chunks: 128)
    ],
)
def test_large_shards_get_large_chunks_and_a_bounded_number_of_them(
    shape, itemsize, chunks, chunk_mib
):
    chunk = _reshard.chunk_shape(shape, itemsize, 256 << 10, max_chunks=64)
    assert _count(shape, chunk) == chunks
    assert math.prod(chunk) * itemsize == pytest.approx(chunk_mib * (1 << 20), rel=0.01)
    assert math.prod(chunk) * itemsize <= _reshard.MAX_CHUNK_BYTES


@pytest.mark.parametrize(
    "shape,itemsize",
    [((100,), 4), ((65536,), 4), ((256, 256), 4), ((1024, 512), 4), ((2048, 2048), 4)],
)
def test_shards_up_to_64_chunks_are_cut_as_before(shape, itemsize):
    # Up to max_chunks x chunk_bytes (16 MiB) the bound never binds.
    unbounded = _reshard.chunk_shape(shape, itemsize, 256 << 10)
    assert _reshard.chunk_shape(shape, itemsize, 256 << 10, max_chunks=64) == unbounded


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(1, 1 << 17), min_size=1, max_size=4),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    chunk_bytes=st.integers(16, 1 << 20),
    max_chunks=st.integers(1, 128),
)
def test_the_chunk_bound_holds_and_changes_nothing_below_it(
    shape, itemsize, chunk_bytes, max_chunks
):
    unbounded = _reshard.chunk_shape(shape, itemsize, chunk_bytes)
    chunk = _reshard.chunk_shape(shape, itemsize, chunk_bytes, max_chunks=max_chunks)
    if _count(shape, unbounded) <= max_chunks:
        assert chunk == unbounded
    # More chunks only when they would otherwise exceed the largest chunk.
    cap = max(chunk_bytes, _reshard.MAX_CHUNK_BYTES)
    assert _count(shape, chunk) <= max_chunks or 2 * math.prod(chunk) * itemsize > cap


def _grid_boxes(shape, grid):
    rows, cols = shape[0] // grid[0], shape[1] // grid[1]
    return [
        ((r * rows, (r + 1) * rows), (c * cols, (c + 1) * cols))
        for r in range(grid[0])
        for c in range(grid[1])
    ]


def _read_amplification(side, save_grid, target_grid):
    """Bytes read over bytes needed when every target shard is read by its own process,
    for a square float32 leaf saved on ``save_grid``, by the planners alone."""
    shape, itemsize = (side, side), 4
    files = _plan.plan_writes(
        [(0, box, itemsize) for box in _grid_boxes(shape, save_grid)],
        process=0,
        chunk_bytes=_knobs.get("chunk_bytes"),
        segment_bytes=1 << 62,
        max_chunks=_knobs.get("max_chunks_per_shard"),
    )
    written = [c for f in files for c in f.chunks]
    records = [ChunkRecord(0, "f", i, c.nbytes, 0, c.box) for i, c in enumerate(written)]
    read = needed = 0
    for target in _grid_boxes(shape, target_grid):
        needed += _reshard.box_size(target) * itemsize
        read += sum(c.nbytes for c in _plan.chunks_for(target, records))
    return read / needed


# Square leaves whose 2x4 shards are about 1 MiB, 4 MiB, ..., 4 GiB (sides multiples of
# 256, as model dimensions are); scripts/chunk_policy.py prints the same table.
SIDES = [1536, 2816, 5888, 11264, 23040, 46336, 92672]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(
    "save_grid,target_grid",
    [
        ((2, 4), (2, 4)),  # the benchmark's three restores
        ((2, 4), (1, 8)),
        ((2, 4), (4, 2)),
        ((2, 4), (4, 4)),  # a mesh axis doubled or halved
        ((2, 4), (2, 8)),
        ((2, 4), (1, 4)),
        ((2, 4), (2, 2)),
        ((2, 4), (4, 8)),
        ((4, 2), (2, 4)),  # transposed
        ((2, 4), (8, 1)),
        ((1, 1), (8, 1)),
        ((2, 4), (1, 1)),
    ],
)
def test_reshards_read_each_byte_once_at_every_shard_size(side, save_grid, target_grid):
    assert _read_amplification(side, save_grid, target_grid) <= 1.0


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("save_grid,target_grid", [((8, 1), (1, 8)), ((1, 8), (8, 1))])
def test_a_transpose_that_cuts_eight_times_finer_costs_at_most_twice(side, save_grid, target_grid):
    # Known cost: small shards (below chunk_bytes x 8) have too few chunks for a
    # target that cuts a dimension 8x finer than saved; larger shards have enough.
    amplification = _read_amplification(side, save_grid, target_grid)
    assert amplification <= (2.0 if side <= 2048 else 1.0), amplification


def test_paths_display_and_rebuild():
    items, _ = _tree.flatten({"a": [1, {"b": None}], "c": {3: (2,)}})
    paths = [p for p, _ in items]
    assert [_tree.display(p) for p in paths] == ["['a'][0]", "['a'][1]['b']", "['c'][3][0]"]
    rebuilt = _tree.unflatten_plain(items)
    assert rebuilt == {"c": {3: [2]}, "a": [1, {"b": None}]}


def test_late_tasks_are_read_from_the_coordination_service_message():
    from distckpt._multihost import _late_tasks

    jax_010 = (
        "DEADLINE_EXCEEDED: Barrier timed out. Id: distckpt/0/prepare::0. ...\n"
        "# of tasks that reached the barrier: 1/3.\nThe first task at the barrier: 0. "
        "Some timed out task names:\n2\n1\n\n\nRPC: /xla.coordination.CoordinationService/Barrier"
    )
    assert _late_tasks(jax_010) == [1, 2]
    older = "Some timed out task names:\n/job:jax_worker/replica:0/task:1\n\nRPC"
    assert _late_tasks(older) == [1]
    assert _late_tasks("UNAVAILABLE: connection reset") == []


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    chunk_bytes=st.integers(16, 2048),
    piece_bytes=st.one_of(st.none(), st.integers(1, 8192)),
)
def test_pieces_are_boxes_of_consecutive_whole_chunks(rows, cols, chunk_bytes, piece_bytes):
    shard = ((8, 8 + rows), (3, 3 + cols))
    (file,) = _plan.plan_writes(
        [(0, shard, 4)],
        process=0,
        chunk_bytes=chunk_bytes,
        segment_bytes=1 << 30,
        piece_bytes=piece_bytes,
    )
    seen: list = []
    for c in file.chunks:
        assert _reshard.intersect(c.box, c.piece) == c.box  # a chunk lies in its piece
        assert _reshard.intersect(c.piece, shard) == c.piece
        if not seen or seen[-1] != c.piece:
            assert c.piece not in seen  # a piece's chunks are consecutive
            seen.append(c.piece)
        size = _reshard.box_size(c.piece) * 4
        assert piece_bytes is None or size <= piece_bytes or c.piece == c.box
    # The pieces tile the shard: every element is fetched exactly once.
    relative = [
        tuple((a - s0, b - s0) for (a, b), (s0, _) in zip(p, shard, strict=True)) for p in seen
    ]
    assert _reshard.coverage_problems((rows, cols), relative) == []


def test_save_memory_splits_the_budget_between_writers():
    MiB = 1 << 20
    cpu = _plan.save_memory(
        128 * MiB,
        threads=4,
        largest_chunk=8 * MiB,
        segment_bytes=256 * MiB,
        fetch_copies=False,
        holds_files=False,
    )
    assert cpu == _plan.SaveMemory(writers=4, piece_bytes=None, segment_bytes=256 * MiB)
    device = _plan.save_memory(
        128 * MiB,
        threads=4,
        largest_chunk=8 * MiB,
        segment_bytes=256 * MiB,
        fetch_copies=True,
        holds_files=False,
    )
    assert device == _plan.SaveMemory(writers=4, piece_bytes=8 * MiB, segment_bytes=256 * MiB)
    assert device.writers * (2 * device.piece_bytes + 2 * 8 * MiB) <= 128 * MiB
    # Large chunks leave room for fewer writers; an object store keeps files small.
    s3 = _plan.save_memory(
        128 * MiB,
        threads=4,
        largest_chunk=16 * MiB,
        segment_bytes=256 * MiB,
        fetch_copies=True,
        holds_files=True,
    )
    assert s3 == _plan.SaveMemory(writers=1, piece_bytes=24 * MiB, segment_bytes=24 * MiB)
    assert 2 * s3.piece_bytes + 2 * s3.segment_bytes + 2 * 16 * MiB <= 128 * MiB
    # Below what one writer needs: one writer, one chunk at a time.
    tiny = _plan.save_memory(
        1,
        threads=4,
        largest_chunk=8 * MiB,
        segment_bytes=256 * MiB,
        fetch_copies=True,
        holds_files=True,
    )
    assert tiny == _plan.SaveMemory(writers=1, piece_bytes=8 * MiB, segment_bytes=8 * MiB)


def test_restore_batches_get_what_the_reading_threads_leave():
    MiB = 1 << 20
    assert _plan.restore_batch_bytes(1 << 30, threads=4, range_bytes=16 * MiB) == 960 * MiB
    assert _plan.restore_batch_bytes(128 * MiB, threads=4, range_bytes=16 * MiB) == 64 * MiB
    assert _plan.restore_batch_bytes(64 * MiB, threads=4, range_bytes=16 * MiB) == 32 * MiB
