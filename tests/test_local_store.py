"""The local tier's store: one process's blocks of a step, whole or not at all, checked."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from distckpt import _local, _tree
from distckpt._plan import LeafSpec
from distckpt.errors import CorruptCheckpointError


def _spec(name: str, shape, dtype: str, kind: str = _tree.ARRAY) -> LeafSpec:
    path = (("key", name),)
    return LeafSpec(path, _tree.display(path), kind, tuple(shape), dtype, {"type": "host"})


LEAVES = [
    _spec("w", (4, 6), "float32"),
    _spec("b", (6,), "bfloat16"),
    _spec("n", (), "int64", _tree.NUMPY),
]
W = np.arange(24, dtype=np.float32).reshape(4, 6)
B = np.arange(6).astype(ml_dtypes.bfloat16)


def _write(root, step=7, **over):
    args = dict(
        process=1,
        process_count=2,
        leaves=LEAVES,
        structure=None,
        layouts=[{"mesh": "m"}, None, None],
        blocks=[(0, 1, ((2, 4), (0, 6)), W[2:]), (0, 0, ((0, 2), (0, 6)), W[:2])],
        values={1: B, 2: np.asarray(5, np.int64)},
        extra={"user_metadata": {"loss": 0.5}},
    )
    args.update(over)
    return _local.write(root, step, **args)


def test_a_step_round_trips_bit_exact(tmp_path):
    _write(tmp_path)
    step = _local.load(tmp_path, 7)
    assert (step.process, step.process_count, step.extra) == (
        1,
        2,
        {"user_metadata": {"loss": 0.5}},
    )
    assert [(b.leaf, b.owner, b.box) for b in step.blocks[:2]] == [
        (0, 1, ((2, 4), (0, 6))),
        (0, 0, ((0, 2), (0, 6))),
    ]
    assert np.array_equal(step.read(step.blocks[0]), W[2:])
    assert np.array_equal(step.read(step.blocks[1]), W[:2])
    b = step.read(step.blocks[step.values[1]])
    assert b.dtype == ml_dtypes.bfloat16 and np.array_equal(b.view(np.uint16), B.view(np.uint16))
    assert step.read(step.blocks[step.values[2]]).tolist() == 5
    assert step.digest == _local.load(_write(tmp_path, step=8).parent, 8).digest


def test_a_pipeline_states_arrays_make_a_version_2_step(tmp_path):
    """The last ``state_arrays`` leaves are a pipeline state's arrays (version 2); a step
    without them is written as version 1, which a distckpt before them reads."""
    plain = json.loads((_write(tmp_path, step=1) / _local.DESCRIPTION).read_bytes())
    assert plain["version"] == 1 and "state_arrays" not in plain
    doc = json.loads((_write(tmp_path, step=2, state_arrays=1) / _local.DESCRIPTION).read_bytes())
    assert doc["version"] == 2 and doc["state_arrays"] == 1
    step = _local.load(tmp_path, 2)
    assert step.state_arrays == 1 and [s.display for s in step.tree_leaves] == ["['w']", "['b']"]
    assert _local.load(tmp_path, 1).tree_leaves == LEAVES
    assert step.digest != _local.load(tmp_path, 1).digest


def _claim_state_arrays(doc: dict, count: int) -> None:
    tree = {k: doc[k] for k in ("leaves", "structure", "layouts")}
    doc["state_arrays"] = tree["state_arrays"] = count
    doc["version"] = 2
    doc["digest"] = _local._digest(tree)


def test_steps_are_listed_and_pruned_and_leftovers_go(tmp_path):
    for s in (3, 1, 2):
        _write(tmp_path, step=s)
    (tmp_path / ".step_4.tmp-abc").mkdir()  # an interrupted write
    assert _local.steps(tmp_path) == [1, 2, 3]
    assert _local.remove_older(tmp_path, 2) == [1]
    assert _local.steps(tmp_path) == [2, 3] and not (tmp_path / ".step_4.tmp-abc").exists()
    assert _local.steps(tmp_path / "absent") == []


def test_a_failed_write_leaves_no_step(tmp_path):
    def broken():
        yield (0, 1, ((2, 4), (0, 6)), W[2:])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, blocks=broken())
    assert _local.steps(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_a_flipped_bit_in_a_block_is_refused_when_read(tmp_path):
    path = _write(tmp_path)
    data = bytearray((path / _local.DATA).read_bytes())
    data[3] ^= 0x01  # in the first block
    (path / _local.DATA).write_bytes(bytes(data))
    step = _local.load(tmp_path, 7)
    with pytest.raises(CorruptCheckpointError, match=r"\['w'\] box \[\[2, 4\], \[0, 6\]\] fails"):
        step.read(step.blocks[0])
    assert np.array_equal(step.read(step.blocks[1]), W[:2])  # the rest is still good


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda doc: doc["blocks"][0].__setitem__(2, [2, 4, 0, 60]), "lies outside it"),
        (lambda doc: doc["blocks"][0].__setitem__(4, 9), "wrong size"),
        (lambda doc: doc["layouts"].__setitem__(1, {"mesh": "x"}), "does not match its digest"),
        (lambda doc: doc.__setitem__("step", 8), "describes step 8"),
        (
            lambda doc: doc.__setitem__("version", 3),
            "version 3 .* reads 'distckpt-local' versions 1",
        ),
        (lambda doc: _claim_state_arrays(doc, 4), "claims 4 pipeline state arrays .* 3 leaves"),
    ],
)
def test_a_damaged_description_is_refused(tmp_path, edit, match):
    from distckpt import _manifest

    path = _write(tmp_path) / _local.DESCRIPTION
    doc = json.loads(path.read_bytes())
    doc.pop("manifest_crc32c")
    edit(doc)
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))
    with pytest.raises(CorruptCheckpointError, match=match):
        _local.load(tmp_path, 7)


def test_a_flipped_bit_in_the_description_is_refused(tmp_path):
    path = _write(tmp_path) / _local.DESCRIPTION
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="local step at .* is damaged"):
        _local.load(tmp_path, 7)


def test_many_blocks_written_and_read_on_threads_keep_their_places(tmp_path):
    """``write`` and ``read_many`` work on ``io_threads`` threads: every block where its
    record says, aligned for the devices, and a truncated file is refused."""
    from distckpt import _knobs
    from distckpt._storage.interface import ALIGN

    rows = [np.full((3, 6), n, np.float32) for n in range(40)]
    blocks = [(0, n % 2, ((0, 3), (0, 6)), r) for n, r in enumerate(rows)]
    with _knobs.override(io_threads=4):
        path = _write(tmp_path, blocks=blocks)
        step = _local.load(tmp_path, 7)
        got = step.read_many(step.blocks[:40])
    assert all(np.array_equal(g, r) for g, r in zip(got, rows, strict=True))
    assert all(g.ctypes.data % ALIGN == 0 for g in got)
    offsets = [b.offset for b in step.blocks]
    assert offsets == sorted(offsets) and offsets[1] - offsets[0] == rows[0].nbytes
    with open(path / _local.DATA, "r+b") as f:
        f.truncate(step.blocks[30].offset + 5)
    with pytest.raises(CorruptCheckpointError, match="is short"):
        step.read_many(step.blocks[:40])
