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
)
def test_chunks_tile_the_shard_exactly(shape, itemsize, chunk_bytes):
    box = _reshard.full_box(shape)
    chunks = _reshard.chunk_boxes(box, _reshard.chunk_shape(shape, itemsize, chunk_bytes))
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


@pytest.mark.parametrize(
    "save_grid,target_grid,bound",
    [
        ((2, 4), (1, 8), 1.0),
        ((2, 4), (4, 2), 1.0),
        ((2, 4), (8, 1), 1.0),
        ((4, 2), (2, 4), 1.0),
        ((1, 1), (8, 1), 1.0),
        ((1, 1), (2, 4), 1.0),
        ((2, 4), (1, 1), 1.0),
        # Known cost: a transpose that cuts a dimension 8x finer than saved
        # reads each chunk twice with the default chunk size.
        ((8, 1), (1, 8), 2.0),
    ],
)
def test_read_amplification_of_common_reshards(save_grid, target_grid, bound):
    """Bytes read over bytes needed when restoring onto another grid, by the planners alone."""
    shape, itemsize = (2048, 2048), 4
    chunk_bytes = int(_knobs.get("chunk_bytes"))

    def grid_boxes(grid):
        rows, cols = shape[0] // grid[0], shape[1] // grid[1]
        return [
            ((r * rows, (r + 1) * rows), (c * cols, (c + 1) * cols))
            for r in range(grid[0])
            for c in range(grid[1])
        ]

    records = []
    for shard in grid_boxes(save_grid):
        for box in _reshard.chunk_boxes(
            shard, _reshard.chunk_shape(_reshard.box_shape(shard), itemsize, chunk_bytes)
        ):
            records.append(
                ChunkRecord(0, "f", len(records), _reshard.box_size(box) * itemsize, 0, box)
            )
    read = needed = 0
    for target in grid_boxes(target_grid):
        needed += _reshard.box_size(target) * itemsize
        read += sum(c.nbytes for c in _plan.chunks_for(target, records))
    assert read / needed <= bound, read / needed


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
