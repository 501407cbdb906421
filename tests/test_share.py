"""Read once, then share: leaves replicated across processes are read in parts and gathered.

Real processes (tests/mp.py) on a mesh ("replica", "fsdp") whose replica
axis spans processes. Bytes read from storage are counted by a wrapper
around the POSIX reader in each process: a count, not a time.
"""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.mp import case_value, run_processes

HERE = "tests.test_share"
W = (2048, 2048)  # float32, 16 MiB: saves each process 4-8 MiB of reads, shared by default
MID = (512, 1024)  # 2 MiB: saves 0.5-1 MiB, below what the default shares (share=True does)


def _reference() -> dict:
    return {
        "w": np.arange(W[0] * W[1], dtype=np.float32).reshape(W),
        "mid": -np.arange(MID[0] * MID[1], dtype=np.float32).reshape(MID),
        "b": np.linspace(-1, 1, 128, dtype=np.float32),
        "odd": np.arange(15, dtype=np.float32).reshape(3, 5),  # no dimension divides by 2
        "ints": np.arange(64 * 64, dtype=np.int32).reshape(64, 64) - 2000,
        "half": (np.arange(64 * 32).reshape(64, 32) / 7).astype(ml_dtypes.bfloat16),
        "table": np.arange(10, dtype=np.int64),
    }


def _mesh():
    """("replica", "fsdp"), rows in process order: the replica axis spans processes."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(2, -1), ("replica", "fsdp"))


def _count_reads() -> dict:
    """Counts the bytes this process reads from data files (every read goes through here;
    the chunk indexes, a few KiB, are left out)."""
    from distckpt._storage import posix

    counts = {"bytes": 0}
    read = posix._PosixReader.read

    def counting(self, name, offset, nbytes, out=None):
        if name.endswith(".bin"):
            counts["bytes"] += nbytes
        return read(self, name, offset, nbytes, out)

    posix._PosixReader.read = counting
    return counts


def _save(directory: str, only_w: bool = False) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    mesh, ref = _mesh(), _reference()

    def put(value, spec):
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda i: value[i]
        )

    every = P(("replica", "fsdp"))  # each process writes its half
    state = {"w": put(ref["w"], every)}
    if not only_w:
        state |= {
            "mid": put(ref["mid"], every),
            "b": put(ref["b"], every),
            "odd": put(ref["odd"], P()),
            "ints": put(ref["ints"], every),
            "half": put(ref["half"], every),
            "table": ref["table"],
            "keys": jax.random.split(jax.random.key(7), 8),
        }
    distckpt.save(directory, state, timeout_s=30)


def _target(only_w: bool = False, names: tuple[str, ...] | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _mesh()

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    target = {"w": sds(W, jnp.float32, P("fsdp"))}
    if not only_w:
        target |= {
            "mid": sds(MID, jnp.float32, P("fsdp")),
            "b": sds((128,), jnp.float32, P()),
            "odd": sds((3, 5), jnp.float32, P()),
            "ints": sds((64, 64), jnp.float32, P(None, "fsdp")),  # cast=True
            "half": sds((64, 32), jnp.bfloat16, P("fsdp")),
            "table": np.zeros(10, np.int64),
            "keys": sds((8,), jax.random.key(0).dtype, P()),
        }
    return {k: v for k, v in target.items() if names is None or k in names}


def _check(out: dict, target: dict) -> None:
    import jax

    ref = _reference()
    ref["ints"] = ref["ints"].astype(np.float32)
    for name, value in out.items():
        if name == "table":
            np.testing.assert_array_equal(value, ref["table"])
            continue
        assert value.sharding.is_equivalent_to(target[name].sharding, value.ndim), name
        if name == "keys":
            want = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(7), 8)))
            for shard in value.addressable_shards:
                np.testing.assert_array_equal(
                    np.asarray(jax.random.key_data(shard.data)), want[shard.index]
                )
            continue
        assert value.dtype == target[name].dtype, name
        for shard in value.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), ref[name][shard.index])


def _w_restore(directory: str) -> dict:
    """Restores w and mid four ways counting the bytes each reads (in MiB), then the whole
    tree three ways (values checked)."""
    import jax

    import distckpt
    from distckpt import _knobs

    _save(directory)
    counts = _count_reads()
    read: dict = {}
    pair = _target(names=("w", "mid"))
    for how, share in (("auto", None), ("on", True), ("off", False), ("knob off", None)):
        counts["bytes"] = 0
        with _knobs.override(restore_share="off" if how == "knob off" else "auto"):
            out = distckpt.restore(directory, pair, partial=True, share=share)
        _check(out, pair)
        read[how] = counts["bytes"] / 2**20
    for share in (None, True, False):
        out = distckpt.restore(directory, _target(), cast=True, share=share, timeout_s=30)
        _check(out, _target())
    return {"process": jax.process_index(), "read": read}


# The two 2 x 2 cases (_w_restore, then _w_damaged) run one after the other in
# one job (tests/mp.py:each_case); their tests read their own results
# (tests/conftest.py runs this module on one xdist worker, so the job runs once).


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("share")
    cases = {w: [f"{HERE}:{w}", {"directory": str(root / w)}] for w in ("_w_restore", "_w_damaged")}
    return run_processes("tests.mp:each_case", 2, 2, args={"cases": cases})


@pytest.mark.multiprocess
def test_two_replica_groups_each_read_half(two_by_two):
    # 2 processes x 2 devices: each process's devices hold all of w (16 MiB)
    # and mid (2 MiB) in two fsdp halves. Shared, each process reads one
    # half and gathers the other; mid only with share=True.
    for value in (case_value(r, "_w_restore") for r in two_by_two):
        assert value["read"] == {
            "auto": 16 / 2 + 2,
            "on": 16 / 2 + 2 / 2,
            "off": 16 + 2,
            "knob off": 16 + 2,
        }, value


@pytest.mark.multiprocess
def test_four_processes_on_a_two_by_two_mesh(tmp_path):
    # 4 processes x 1 device: each needs half of w and of mid; shared, a quarter.
    directory = str(tmp_path / "ckpt")
    results = run_processes(f"{HERE}:_w_restore", 4, 1, args={"directory": directory}, timeout=150)
    for r in results:
        assert r.value["read"] == {
            "auto": 16 / 4 + 2 / 2,
            "on": 16 / 4 + 2 / 4,
            "off": 16 / 2 + 2 / 2,
            "knob off": 16 / 2 + 2 / 2,
        }, r.value


def _w_damaged(directory: str) -> dict:
    """Processes that plan differently are refused; then a flipped byte in process 0's file:
    every process raises, and shared, only one process read it."""
    import jax
    from jax.experimental import multihost_utils

    import distckpt
    from distckpt.errors import CorruptCheckpointError, InconsistentProcessesError

    _save(directory, only_w=True)
    out = {}
    # Processes that would share differently are refused before any collective.
    try:
        distckpt.restore(
            directory, _target(only_w=True), share=jax.process_index() == 0, timeout_s=30
        )
        out["split"] = "returned"
    except InconsistentProcessesError as e:
        out["split"] = {"type": type(e).__name__, "message": str(e)}
    if jax.process_index() == 0:
        attempt = next(e for e in os.listdir(directory) if e.startswith("attempt-"))
        path = os.path.join(directory, attempt, "p00000.s000.bin")
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0x10]))
    multihost_utils.sync_global_devices("damaged")
    for how, share in (("shared", True), ("not shared", False)):
        try:
            distckpt.restore(directory, _target(only_w=True), share=share, timeout_s=30)
            out[how] = "returned"
        except CorruptCheckpointError as e:
            out[how] = {"type": type(e).__name__, "processes": e.processes}
    return out


@pytest.mark.multiprocess
def test_a_chunk_only_one_process_reads_fails_the_restore_everywhere(two_by_two):
    values = [case_value(r, "_w_damaged") for r in two_by_two]
    shared = [value["shared"] for value in values]
    assert shared[0] == shared[1] and shared[0]["type"] == "CorruptCheckpointError"
    assert len(shared[0]["processes"]) == 1  # one process read that chunk; both raised
    for value in values:
        assert value["not shared"] == {"type": "CorruptCheckpointError", "processes": [0, 1]}
        assert value["split"]["type"] == "InconsistentProcessesError"
        assert "planned different reads to share" in value["split"]["message"]


# --------------------------------------------------------------------------- the plan (pure)


def test_a_process_spanning_axis_goes_after_the_axes_of_the_first_dimension_it_divides():
    from distckpt._share import read_spec

    axes = {"replica": 2, "fsdp": 4}
    spanning = frozenset({"replica"})
    assert read_spec((64, 8), ("fsdp",), axes, spanning) == (("fsdp", "replica"), None)
    assert read_spec((4, 8), ("fsdp",), axes, spanning) == ("fsdp", ("replica",))
    assert read_spec((64, 8), (), axes, spanning) == (("replica",), None)
    assert read_spec((3, 5), (), axes, spanning) is None  # no dimension divides
    assert read_spec((64, 8), ("fsdp",), axes, frozenset({"fsdp"})) is None  # within a process
    assert read_spec((64,), ("replica",), axes, spanning) is None  # the spec uses it
    assert read_spec((), (), axes, spanning) is None  # 0-d
    two = {"dp": 2, "pp": 3, "tp": 2}
    # pp divides no dimension with the axes already there: only dp is shared.
    assert read_spec((4, 9), (None, "tp"), two, frozenset({"dp", "pp"})) == (("dp",), "tp")
    assert read_spec((4, 18), (None, "tp"), two, frozenset({"dp", "pp"})) == (
        ("dp",),
        ("tp", "pp"),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 12]), min_size=1, max_size=3),
    st.lists(st.sampled_from([None, "a", "b", "c", ("a", "b")]), max_size=3),
    st.sets(st.sampled_from(["a", "b", "c"])),
)
def test_read_parts_tile_each_target_part_exactly(shape, spec, spanning):
    # On a fake 2x2x2 mesh: every device's read box lies in its target box,
    # and the devices holding one target box read disjoint parts covering it.
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from distckpt import _reshard
    from distckpt._share import read_spec

    spec = spec[: len(shape)]
    names = [n for e in spec for n in ((e,) if isinstance(e, str) else e or ())]
    if len(names) != len(set(names)):
        return  # an axis used twice is not a valid spec
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("a", "b", "c"))
    for n, e in zip(shape, spec, strict=False):  # spec may be shorter
        if n % math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ())):
            return  # the target itself does not divide this shape
    target_boxes = NamedSharding(mesh, P(*spec)).devices_indices_map(tuple(shape))
    read = read_spec(tuple(shape), spec, dict(mesh.shape), frozenset(spanning))
    if read is None:
        return
    read_boxes = NamedSharding(mesh, P(*read)).devices_indices_map(tuple(shape))
    holders: dict = {}
    for d, idx in target_boxes.items():
        box = _reshard.box_from_index(idx, shape)
        part = _reshard.box_from_index(read_boxes[d], shape)
        assert _reshard.intersect(part, box) == part
        holders.setdefault(box, set()).add(part)
    for box, parts in holders.items():
        assert sum(_reshard.box_size(p) for p in parts) == _reshard.box_size(box)
        rel = [tuple((a - o, b - o) for (a, b), (o, _) in zip(p, box, strict=True)) for p in parts]
        assert not _reshard.coverage_problems(_reshard.box_shape(box), rel)


def test_the_switch_reads_its_environment_variable(monkeypatch):
    from distckpt import _knobs

    monkeypatch.delenv("DISTCKPT_RESTORE_SHARE", raising=False)
    assert _knobs.get("restore_share") == "auto"
    monkeypatch.setenv("DISTCKPT_RESTORE_SHARE", "off")
    assert _knobs.get("restore_share") == "off"
    monkeypatch.setenv("DISTCKPT_RESTORE_SHARE", "sometimes")
    with pytest.raises(ValueError, match="auto, on, off"):
        _knobs.get("restore_share")


def test_one_process_reads_as_before(tmp_path):
    # Nothing spans processes in a single-process job: no plan, no collective.
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    mesh = jax.make_mesh((2, 4), ("replica", "fsdp"))
    w = jax.device_put(np.ones(W, np.float32), NamedSharding(mesh, P("fsdp")))
    distckpt.save(str(tmp_path / "c"), {"w": w})
    target = {"w": jax.ShapeDtypeStruct(W, np.float32, sharding=w.sharding)}
    out = distckpt.restore(str(tmp_path / "c"), target, share=True)
    assert out["w"].sharding == w.sharding
    with pytest.raises(TypeError, match="share"):
        distckpt.restore(str(tmp_path / "c"), target, share="yes")
