"""The scale simulation (scripts/scale_sim.py) at a small size: its stand-ins and invariants.

Timings are never asserted: the full simulation (``make scale-sim``) reports
them. What is checked here is that the stand-ins behave like what they
replace (device boxes like ``NamedSharding``, the coordination stand-in
like JAX's client on the paths ``Collective`` takes), that index and head
sizes follow the formula, and that the 16-process run (also with a section
per (cell, leaf)) finds every box covered, reads the index heads and
sections the grids and heads predict, and keeps the root record and the
coordination calls within their bounds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from distckpt import _layout

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "scale_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("scale_sim_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(sim):
    return sim.run(sim.SMALL, coord=(4, 8, 16), log=lambda _: None)


@pytest.fixture(scope="module")
def sectioned(sim):
    """The small run with a section per (cell, leaf) and one read per run of adjacent
    sections: many sections, read in many runs (process 0's replicated leaves lie
    between the records of its first cells)."""
    from distckpt import _chunks, _index

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_index, "SECTION_BYTES", 1)
        mp.setattr(_chunks, "GAP_BYTES", 0)
        return sim.run(sim.SMALL, coord=(), log=lambda _: None)


MESHES = [((8,), ("x",)), ((4, 2), ("x", "y")), ((2, 4), ("x", "y")), ((2, 2, 2), ("a", "b", "c"))]


def _specs(names):
    first, last = names[0], names[-1]
    out = [(), (first,), (None, first)]
    if len(names) > 1:
        out += [(first, last), (last, first), ((first, last),), (None, (last, first))]
    if len(names) == 3:
        out += [(("a", "c"), "b"), ("c", ("b", "a"))]
    return out


@pytest.mark.parametrize("mesh_shape,names", MESHES)
@pytest.mark.parametrize("shape", [(16, 8), (10, 6), (7, 3), (3, 5)])
def test_device_boxes_are_those_of_named_sharding(sim, mesh_shape, names, shape):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from distckpt import _reshard

    devices = np.array(jax.devices()[: math.prod(mesh_shape)]).reshape(mesh_shape)
    mesh = Mesh(devices, names)
    for spec in _specs(names):
        sharding = NamedSharding(mesh, PartitionSpec(*spec))
        try:
            theirs = sharding.devices_indices_map(shape)
        except ValueError:  # JAX's IndivisibleError: shards of unequal sizes
            with pytest.raises(ValueError, match="does not divide"):
                sim.device_boxes(tuple(zip(names, mesh_shape, strict=True)), spec, shape)
            continue
        ours = sim.device_boxes(tuple(zip(names, mesh_shape, strict=True)), spec, shape)
        for device, box in zip(devices.flat, ours, strict=True):
            assert _reshard.box_from_index(theirs[device], shape) == box, (spec, device)


@pytest.mark.parametrize("mesh_shape,names", MESHES[1:])
def test_first_writers_give_the_grid_a_save_builds_from_real_devices(sim, mesh_shape, names):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from distckpt import _index, _reshard

    shape = (16, 8)
    devices = np.array(jax.devices()[: math.prod(mesh_shape)]).reshape(mesh_shape)
    mesh = Mesh(devices, names)
    per_process = 2  # pretend: devices 2p and 2p + 1 belong to process p
    for spec in _specs(names):
        # _stage._sharding_grid's rule, with the pretended processes.
        real: dict = {}
        for device, index in (
            NamedSharding(mesh, PartitionSpec(*spec)).devices_indices_map(shape).items()
        ):
            real.setdefault(_reshard.box_from_index(index, shape), device.id // per_process)
        ours = sim.first_writers(
            sim.device_boxes(tuple(zip(names, mesh_shape, strict=True)), spec, shape), per_process
        )
        expected = _index.build_grid(shape, real.items())
        got = _index.build_grid(shape, ours.items())
        assert got.edges == expected.edges and (got.owners == expected.owners).all(), spec


def _index_records(process, leaves):
    """Chunk records of ``process`` and the grids of their leaves: ``leaves`` gives, per
    leaf, its shape, its cells' boxes (all written by ``process``) and chunks per cell
    (cut along the first dimension)."""
    from distckpt import _index
    from distckpt._plan import ChunkRecord

    grids, records = [], []
    for leaf, (shape, cells, per_cell) in enumerate(leaves):
        grids.append(_index.build_grid(shape, [(box, process) for box in cells]))
        for cell, box in enumerate(cells):
            for k in range(per_cell if box else 1):
                part = box
                if box:
                    (lo, hi), *rest = box
                    step = (hi - lo) // per_cell
                    part = ((lo + k * step, lo + (k + 1) * step), *rest)
                name = f"p{process:05d}.s00{(leaf + cell) % 2}.bin"
                records.append(ChunkRecord(leaf, name, 64 * len(records), 8, leaf + k, part))
    return records, grids


INDEX_CASES = {
    "narrow": [
        ((), [()], 1),
        ((4, 3), [((0, 2), (0, 3)), ((2, 4), (0, 3))], 2),
        ((2, 4, 3), [((0, 2), (0, 4), (0, 3))], 2),
        ((8, 6), [((0, 4), (0, 3)), ((0, 4), (3, 6)), ((4, 8), (0, 3)), ((4, 8), (3, 6))], 4),
    ],
    "wide": [((1 << 32,), [((0, 1 << 31),), ((1 << 31, 1 << 32),)], 4)],
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
@pytest.mark.parametrize("section_bytes", [4096, 100, 1])
def test_the_index_size_formula_matches_the_encoder(sim, monkeypatch, case, section_bytes):
    # One section (the default here), sections of a few (cell, leaf) groups, a
    # section per group: the encoder decides the count, the formula takes it.
    from distckpt import _index

    monkeypatch.setattr(_index, "SECTION_BYTES", section_bytes)
    wide = case == "wide"
    counts = set()
    for process in (3, 12345678):  # the process number is in the header, and its length
        records, grids = _index_records(process, INDEX_CASES[case])
        files = sorted({c.file for c in records})
        bounds = sum(2 * len(c.box) for c in records)
        raw = _index.encode_index(process, records, grids)
        ref = _index.make_ref(process, _layout.index_file(process), raw)
        head = _index.decode_head(raw[: ref.head_bytes], ref, {f: 1 << 40 for f in files})
        count = len(head.sections)
        counts.add(count)
        groups = {(c.leaf, grids[c.leaf].cells_in(c.box)[0][1]) for c in records}
        assert count == {4096: 1, 1: len(groups)}.get(section_bytes, count)
        assert sim.head_size(process, files, len(records), wide, count) == ref.head_bytes
        assert sim.index_size(process, files, len(records), bounds, wide, count) == len(raw)
    assert len(counts) == 1  # the same records per (cell, leaf): the same sections
    if section_bytes == 100 and not wide:
        assert 1 < counts.pop() < len(groups)


def test_every_writer_is_planned_for_real_and_matches_its_group(small):
    # Every small-run writer's index is read by the transposed layout, so all
    # are planned and encoded for real; SaveSim raised if any differed from
    # what its group's representative predicted (files, sizes, head, section table).
    assert small["real_plans"] == 16
    assert small["groups"] >= 2  # the primary also writes the replicated leaves
    assert small["writing_processes"] == 16
    assert small["index_bytes_per_process"]["max"] == small["index_bytes_per_process"]["p0"]
    heads = small["index_head_bytes_per_process"]
    assert 16 + 20 <= heads["min"] <= heads["max"] < small["index_bytes_per_process"]["min"]


def _check_restores(res):
    assert [r["layout"] for r in res["restore"]] == ["fsdp8-tp8", "fsdp4-tp16", "fsdp8-tp8-T"]
    for row in res["restore"]:
        assert row["real"]
        assert [m["process"] for m in row["measured"]] == list(range(8))
        for m in row["measured"]:
            # run() raised unless the sample read the heads, section bytes and
            # number of reads predicted, of the writers predicted, and
            # RestoreSim.read if a box was not covered exactly.
            assert m["metadata_bytes"] <= row["predicted_max"]["metadata_bytes"]
            assert m["index_bytes"] == m["head_bytes"] + m["section_bytes"]
            assert m["indexes_read"] == len(m["writers_read"])
            assert m["reads"] > m["indexes_read"]  # a head, then at least one run of sections
            assert 0 < m["index_bytes_of_found_records"] <= m["section_bytes"]
            assert m["chunk_bytes_to_read"] >= m["data_bytes_needed"] > 0
            assert 0 in m["writers_read"]  # the replicated leaves were written by process 0
        worst = row["predicted_max"]
        assert worst["reads"] <= row["reads_max"]
        assert worst["records_read"] * 32 <= worst["section_bytes"]
    same, wider, transposed = (row["writers_max"] for row in res["restore"])
    assert same == 3 and wider == 5 and transposed == 16  # 2 or 4 FSDP neighbours + process 0


def test_every_restoring_process_reads_what_the_grids_predict_and_finds_its_boxes(small):
    _check_restores(small)
    for row in small["restore"]:
        for m in row["measured"]:  # 4 KiB sections 64 KiB apart at most: one run per index
            assert m["reads"] == 2 * m["indexes_read"]


def test_sections_are_read_as_the_heads_predict_when_there_are_many(sectioned, small):
    # A section per (cell, leaf), runs broken by any gap: the prediction
    # from the grids and the (derived) heads must still match every read.
    _check_restores(sectioned)
    per_index = sectioned["index_sections_per_process"]
    assert per_index["min"] > 10 * small["index_sections_per_process"]["max"]
    for row, before in zip(sectioned["restore"], small["restore"], strict=True):
        assert max(m["reads"] for m in row["measured"]) > 2 * row["writers_max"]
        # Reading less of each index: the sections of the cells needed, no more.
        fewer = row["predicted_max"]["section_bytes"] - before["predicted_max"]["section_bytes"]
        if row["layout"] == "fsdp4-tp16":  # half of each neighbour's cells
            assert fewer < 0


def test_the_root_record_grows_with_leaves_files_and_processes_only(small, sim):
    devices = small["processes"] * small["devices_per_process"]
    bound = (
        2048
        + 400 * small["leaves"]
        + 80 * small["files"]
        + 120 * small["processes"]  # its index entry and its bytes in the save statistics
        + 8 * small["owner_tables"] * devices  # at most a cell per device per owner table
    )
    assert small["root_bytes"] <= bound
    assert sum(small["root_sections"].values()) >= small["root_bytes"] - 64
    assert small["root_sections"]["indexes"] < small["root_sections"]["leaves"]


def test_coordination_calls_per_process_do_not_grow_with_the_process_count(small):
    runs = small["coordination"]
    assert [c["processes"] for c in runs] == [4, 8, 16]
    assert list(runs[0]["phases"]) == ["prepare", "write", "commit", "restore"]
    for phase in runs[0]["phases"]:
        per_process = {c["phases"][phase]["max_ops_other"] for c in runs}
        assert len(per_process) == 1, (phase, per_process)  # O(1) per process at any N
        for c in runs:
            n, row = c["processes"], c["phases"][phase]
            assert row["max_ops_other"] <= 4
            assert row["ops"] <= 4 * n  # issue 15: 4N per phase, the primary's calls included
            assert row["primary_ops"] <= row["max_ops_other"] + 2
            # Each process's listing returns O(1) entries (a counter, the primary's
            # payload); only the primary lists the reports (two entries each).
            assert row["listed_entries"] <= 3 * n
    for c in runs:
        n = c["processes"]
        ops = {phase: row["ops"] for phase, row in c["phases"].items()}
        assert ops == {"prepare": 3 * n + 1, "write": 4 * n, "commit": 3 * n + 2, "restore": 4 * n}
    # The same root record, but for the digits of its timings (save_stats).
    assert abs(runs[-1]["primary_commit"]["root_bytes"] - small["root_bytes"]) <= 64


def test_the_commit_phase_shares_a_summary_that_does_not_grow_with_the_process_count(small):
    # In the commit phase every process reads the primary's SaveStats once:
    # a summary (total, largest process, files, timings) of the same size at
    # 4 and 16 processes but for the digits of its numbers, not a list of N
    # byte counts (N x N numbers in all). The 16-process run shares what the
    # real commit built, the others a summary of the reports' sizes.
    runs = small["coordination"]
    each = [c["phases"]["commit"]["received_bytes"] / c["processes"] for c in runs]
    assert max(each) - min(each) <= 16, each


def test_the_result_is_json_and_names_every_target(small):
    json.dumps(small)
    names = [t["target"] for t in small["targets"]]
    assert names[:2] == ["root record", "primary commit CPU"]
    assert sum("metadata read" in n for n in names) == 3
    assert sum("coordination operations" in n for n in names) == 4


def test_a_failure_on_one_simulated_process_is_raised_on_every_one(sim):
    from distckpt import _multihost
    from distckpt.errors import ProcessFailure

    seen: dict[int, str] = {}

    def body(pid, client):
        coll = _multihost.Collective("save", "sim://x", 30.0)

        def write():
            if pid == 1:
                raise OSError("disk on fire")

        try:
            coll.run("write", sim._phased(client, "write", write))
        except ProcessFailure as e:
            seen[pid] = str(e)

    sim.run_processes(3, body, timeout_s=30.0)
    assert sorted(seen) == [0, 1, 2]
    assert all("process(es) [1]" in m and "disk on fire" in m for m in seen.values())


def test_a_process_that_never_arrives_is_named_by_the_barrier_timeout(sim):
    from distckpt import _multihost
    from distckpt.errors import BarrierTimeoutError

    seen: dict[int, list[int]] = {}

    def body(pid, client):
        if pid == 2:
            return  # never reaches the phase
        coll = _multihost.Collective("save", "sim://x", 0.5)
        try:
            coll.run("prepare", sim._phased(client, "prepare", lambda: {}))
        except BarrierTimeoutError as e:
            seen[pid] = e.missing

    sim.run_processes(3, body, timeout_s=5.0)
    assert seen == {0: [2], 1: [2]}
