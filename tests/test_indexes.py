"""Format 3: shard grids in the commit record, one chunk index per writing process.

A restoring process reads the indexes of the processes whose shards it
needs, no others (counted, with real processes); coverage is proven from
the plan (grids every process computes alike), and processes that planned
differently commit nothing.
"""

from __future__ import annotations

import json

import crc32c
import numpy as np
import pytest

from distckpt import _index
from distckpt._plan import ChunkRecord
from tests.mp import cases_in_directories

HERE = "tests.test_indexes"


# --------------------------------------------------------------------------- pure pieces


def test_a_grid_records_each_cell_s_writer_and_finds_them_by_box():
    shards = [
        (((0, 4), (0, 3)), 0),
        (((0, 4), (3, 6)), 1),
        (((4, 8), (0, 3)), 2),
        (((4, 8), (3, 6)), 3),
    ]
    grid = _index.build_grid((8, 6), shards)
    assert grid.edges == ((0, 4, 8), (0, 3, 6))
    assert grid.owners.tolist() == [[0, 1], [2, 3]]
    assert grid.owners_in(((0, 8), (0, 6))) == [0, 1, 2, 3]
    assert grid.owners_in(((3, 5), (0, 1))) == [0, 2]
    assert grid.owners_in(((4, 5), (3, 4))) == [3]
    assert grid.owners_in(((4, 4), (0, 6))) == []  # an empty box needs nobody
    assert grid.cells_of(1) == [((0, 4), (3, 6))]
    assert grid.edges_json() == [4, 3]  # regular: one block size per dimension
    table = _index.OwnerTable.from_json(grid.owners.reshape(-1).tolist())
    again = _index.Grid.from_json((8, 6), grid.edges_json(), table)
    assert again.edges == grid.edges and again.owners.tolist() == grid.owners.tolist()


def test_uneven_shards_keep_their_edges():
    grid = _index.build_grid((5,), [(((0, 3),), 0), (((3, 5),), 1)])
    assert grid.edges_json() == [3]  # 0, 3, 5: every shard but the last has 3 rows
    odd = _index.build_grid((5,), [(((0, 1),), 0), (((1, 5),), 1)])
    assert odd.edges_json() == [[0, 1, 5]]
    table = _index.OwnerTable.from_json([0, 1])
    assert _index.Grid.from_json((5,), [[0, 1, 5]], table).owners_in(((2, 3),)) == [1]


@pytest.mark.parametrize(
    "shards, match",
    [
        ([(((0, 4),), 0), (((2, 8),), 1)], "overlaps"),
        ([(((0, 4),), 0), (((5, 8),), 1)], "no saved shard holds"),
    ],
)
def test_a_grid_refuses_shards_that_do_not_tile_the_leaf(shards, match):
    with pytest.raises(ValueError, match=match):
        _index.build_grid((8,), shards)


def test_each_process_checks_its_own_writes_against_the_plan():
    grid = _index.build_grid((8,), [(((0, 4),), 0), (((4, 8),), 1)])
    assert _index.check_own_writes([grid, None], [(0, ((4, 8),), 4)], 1) == []
    assert _index.check_own_writes([grid], [(0, ((0, 4),), 4)], 1)  # another's cell
    assert _index.check_own_writes([grid], [], 1)  # its cell left out
    assert _index.check_own_writes([grid, None], [(1, ((0, 2),), 4)], 1)  # an unplanned leaf


def _index_of_process_1(monkeypatch, section_bytes: int):
    """A small index of process 1: a scalar and a 4x4 leaf in 4 cells (2 of them its)."""
    monkeypatch.setattr(_index, "SECTION_BYTES", section_bytes)
    grids = [
        _index.build_grid((), [((), 1)]),
        None,
        _index.build_grid(
            (4, 4),
            [
                (((0, 2), (0, 2)), 1),
                (((0, 2), (2, 4)), 0),
                (((2, 4), (0, 2)), 1),
                (((2, 4), (2, 4)), 0),
            ],
        ),
    ]
    records = [
        ChunkRecord(2, "p00001.s000.bin", 0, 16, 7, ((0, 1), (0, 2))),
        ChunkRecord(2, "p00001.s000.bin", 16, 16, 6, ((1, 2), (0, 2))),
        ChunkRecord(0, "p00001.s000.bin", 32, 4, 9, ()),
        ChunkRecord(2, "p00001.s001.bin", 0, 32, 8, ((2, 4), (0, 2))),
    ]
    raw = _index.encode_index(1, records, grids)
    ref = _index.make_ref(1, "p00001.idx", raw)
    facts = _index.leaf_facts([((), 4, False), (None, 1, False), ((4, 4), 8, False)])
    files = {"p00001.s000.bin": 36, "p00001.s001.bin": 32}
    return records, grids, raw, ref, facts, files


def test_an_index_round_trips_and_is_checked(monkeypatch):
    records, grids, raw, ref, facts, files = _index_of_process_1(monkeypatch, 4096)
    assert ref.chunks == 4 and ref.nbytes == len(raw)
    assert _index.decode_index(raw, ref, facts, grids, files) == sorted(
        records, key=lambda c: (c.leaf, c.box)
    )
    with pytest.raises(ValueError, match="past the end"):
        _index.decode_index(raw, ref, facts, grids, {**files, "p00001.s001.bin": 31})
    with pytest.raises(ValueError, match="fails its crc32c"):
        _index.decode_index(raw[:-1] + b"\x01", ref, facts, grids, files)
    no_data = _index.leaf_facts([((), 4, False), (None, 1, False), (None, 1, False)])
    with pytest.raises(ValueError, match="leaves that store no data"):
        _index.decode_index(raw, ref, no_data, grids, files)
    wider = _index.leaf_facts([((), 4, False), (None, 1, False), ((4, 4), 4, False)])
    with pytest.raises(ValueError, match="records 16 bytes, its box holds 8"):
        _index.decode_index(raw, ref, wider, grids, files)
    with pytest.raises(ValueError, match="outside the cells of process 0"):
        _index.encode_index(0, records, grids)


def test_a_reader_reads_only_the_sections_of_the_cells_it_needs(monkeypatch):
    # One section per (cell, leaf): rank 0 holds the scalar and the top-left cell,
    # rank 1 the bottom-left cell.
    records, grids, raw, ref, facts, files = _index_of_process_1(monkeypatch, 1)
    head = _index.decode_head(raw[: ref.head_bytes], ref, files)
    assert [(int(s["cell"]), int(s["leaf"])) for s in head.sections] == [(0, 0), (0, 2), (1, 2)]
    grid = grids[2]
    assert grid.cells_in(((2, 4), (0, 4))) == [(0, 1), (1, 1)]  # (owner, rank)
    assert grid.cells_in(((0, 3), (1, 2))) == [(1, 0), (1, 1)]
    assert head.sections_for([(1, 2)]) == [2]

    def section(n: int, data: bytes = raw) -> dict:
        start = int(head.starts[n])
        part = data[start : start + int(head.sections["nbytes"][n])]
        return _index.decode_section(part, head, n, facts, grids)

    assert section(2) == {(1, 2): [records[3]]}
    assert section(1) == {(0, 2): records[:2]}
    # Damage in one section is found when that section is read, whatever else is.
    flipped = raw[:-1] + bytes([raw[-1] ^ 1])
    assert section(0, flipped) == {(0, 0): [records[2]]}
    with pytest.raises(ValueError, match="section 2 fails its crc32c"):
        section(2, flipped)
    with pytest.raises(ValueError, match="fails its crc32c"):
        _index.decode_head(b"\x00" + raw[1 : ref.head_bytes], ref, files)


def test_an_index_refuses_a_record_filed_under_another_cell(monkeypatch):
    records, grids, raw, ref, facts, files = _index_of_process_1(monkeypatch, 4096)
    head = _index.decode_head(raw[: ref.head_bytes], ref, files)
    # Rewrite the bottom-left chunk's cell rank from 1 to 0 and reseal the section.
    body = bytearray(raw[ref.head_bytes :])
    table = np.frombuffer(body, _index.RECORD, ref.chunks).copy()
    table["cell"][:] = 0
    body[: table.nbytes] = table.tobytes()
    sections = head.sections.copy()
    sections["crc32c"][0] = crc32c.crc32c(bytes(body))
    bad_head = _index.IndexHead(
        ref, head.files, head.file_bytes, head.bound_type, sections, head.starts, head.keys
    )
    with pytest.raises(ValueError, match="outside its cell 0 of process 1"):
        _index.decode_section(bytes(body), bad_head, 0, facts, grids)


# --------------------------------------------------------------------------- real processes

# The three 2 x 2 cases below run one after the other in one job
# (tests/mp.py:each_case), each in its own directory; their tests read their
# own results (tests/conftest.py runs this module on one xdist worker, so the
# job runs once).
ONE_JOB_CASES = (
    "_w_restore_reads_only_the_indexes_it_needs",
    "_w_processes_with_different_shardings",
    "_w_restore_reads_only_the_sections_it_needs",
)


@pytest.fixture(scope="module")
def one_job(tmp_path_factory):
    """``case(worker)``: that case's directory and its results."""
    root = tmp_path_factory.mktemp("indexes")
    return cases_in_directories(HERE, ONE_JOB_CASES, root, devices_per_process=2, timeout=150)


def _w_restore_reads_only_the_indexes_it_needs(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt
    from distckpt import _chunks

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    rows = NamedSharding(mesh, P("x"))
    cols = NamedSharding(mesh, P(None, "x"))
    full = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    w = jax.make_array_from_callback((16, 8), rows, lambda i: full[i])
    distckpt.save(f"{tmp}/c", {"w": w, "step": 1})
    read = {}
    got = {}
    for name, sharding in (("rows", rows), ("cols", cols), ("whole", NamedSharding(mesh, P()))):
        before = _chunks.metadata_bytes_read()
        out = distckpt.restore(
            f"{tmp}/c",
            {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding)},
            partial=True,
        )
        read[name] = _chunks.metadata_bytes_read() - before
        got[name] = all(
            np.array_equal(np.asarray(s.data), np.asarray(full)[s.index])
            for s in out["w"].addressable_shards
        )
    return {"read": read, "exact": got, "pid": jax.process_index()}


def test_a_process_reads_the_indexes_of_the_shards_it_needs_only(one_job):
    tmp_path, values = one_job("_w_restore_reads_only_the_indexes_it_needs")
    doc = json.loads((tmp_path / "c" / "manifest.json").read_bytes())
    root = (tmp_path / "c" / "manifest.json").stat().st_size
    index = {ref["process"]: ref["bytes"] for ref in doc["indexes"]}
    assert sorted(index) == [0, 1] and "chunks" not in json.dumps(doc["leaves"])
    for value in values:
        assert value["exact"] == {"rows": True, "cols": True, "whole": True}
        read = value["read"]
        assert read["rows"] == root + index[value["pid"]]  # its own rows: its own index
        assert read["cols"] == root + sum(index.values())  # columns cross both writers
        assert read["whole"] == root + sum(index.values())


def _w_processes_with_different_shardings(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt
    from distckpt.errors import DistckptError

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    # Same shape and dtype everywhere, but the processes disagree on the layout.
    spec = P("x") if jax.process_index() == 0 else P(None, "x")
    sharding = NamedSharding(mesh, spec)
    w = jax.make_array_from_callback((8, 8), sharding, lambda i: jnp.zeros((8, 8))[i])
    try:
        distckpt.save(f"{tmp}/c", {"w": w}, timeout_s=30)
    except DistckptError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def test_processes_that_plan_different_layouts_commit_nothing(one_job):
    import distckpt

    tmp_path, values = one_job("_w_processes_with_different_shardings")
    for value in values:
        assert value["error"] and "planned different layouts" in value["error"], value
    assert not distckpt.is_committed(tmp_path / "c")


def _w_restore_reads_only_the_sections_it_needs(tmp: str) -> dict:
    from distckpt import _chunks, _index

    # Put back afterwards: the job may run other cases after this one.
    put_back = _index.SECTION_BYTES, _chunks.GAP_BYTES
    _index.SECTION_BYTES = 1  # a section per cell and leaf
    _chunks.GAP_BYTES = 0  # one read per section: the count shows which were read
    try:
        return _restore_reads_only_the_sections_it_needs(tmp)
    finally:
        _index.SECTION_BYTES, _chunks.GAP_BYTES = put_back


def _restore_reads_only_the_sections_it_needs(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt
    from distckpt import _chunks

    devices = jax.devices()  # process 0 holds devices 0 and 1, process 1 devices 2 and 3
    full = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
    rows = NamedSharding(Mesh(np.asarray(devices), ("x",)), P("x"))
    w = jax.make_array_from_callback((16, 8), rows, lambda i: full[i])
    distckpt.save(f"{tmp}/c", {"w": w, "v": w + 1, "step": 1})
    # Rows 0-4 and 8-12 on process 0: the first cell of each writer, not the second.
    crossed = NamedSharding(Mesh(np.asarray(devices)[[0, 2, 1, 3]], ("x",)), P("x"))
    before = _chunks.metadata_bytes_read()
    out = distckpt.restore(
        f"{tmp}/c",
        {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=crossed)},
        partial=True,
    )
    exact = all(
        np.array_equal(np.asarray(s.data), np.asarray(full)[s.index])
        for s in out["w"].addressable_shards
    )
    return {"read": _chunks.metadata_bytes_read() - before, "exact": exact}


def test_a_process_reads_the_index_sections_of_the_cells_it_needs_only(one_job):
    from distckpt import _commit
    from distckpt._storage import open_storage

    tmp_path, values = one_job("_w_restore_reads_only_the_sections_it_needs")
    root = tmp_path / "c"
    m = _commit.load(open_storage(str(root)))
    w = next(i for i, s in enumerate(m.leaves) if s.display.endswith("['w']"))
    sizes = {name: info["bytes"] for name, info in m.files.items()}
    expected = [root.joinpath("manifest.json").stat().st_size] * 2
    for ref in m.indexes or []:
        raw = (root / m.attempt / ref.name).read_bytes()
        head = _index.decode_head(raw[: ref.head_bytes], ref, sizes)
        assert len(head.sections) == 4  # w and v, 2 cells each
        for pid in (0, 1):  # process 0 needs each writer's cell 0 of w, process 1 cell 1
            (section,) = head.sections_for([(pid, w)])
            expected[pid] += ref.head_bytes + int(head.sections["nbytes"][section])
    for value in values:
        assert value["exact"]
    assert [value["read"] for value in values] == expected
