"""Shardings beyond one mesh over every device: sub-meshes of one process,
host memory kinds, and targets on an abstract mesh (explicit sharding).

The single-process tests use the 8 fake CPU devices of tests/conftest.py;
the sub-mesh tests run 2 real processes with 2 devices each (tests/mp.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _put, cli
from distckpt.errors import TreeMismatchError
from tests.mp import run_processes

HERE = "tests.test_shardings"


# --------------------------------------------------------------------------- sub-meshes
#
# Two processes with two devices each. "glob" spans all four devices; "p1" and
# "one1" live on process 1's devices only (a pipeline stage, a value on one of
# its devices); "p0" on process 0's only; "key1" is a PRNG key on a device of
# process 1.


def _ref() -> dict:
    return {
        "glob": np.arange(8 * 6, dtype=np.float32).reshape(8, 6),
        "p1": np.arange(6 * 4, dtype=np.int32).reshape(6, 4) + 1000,
        "p0": np.arange(10, dtype=np.float32) - 50,
        "one1": np.array([7, 8, 9], np.int16),
    }


def _meshes():
    import jax
    from jax.sharding import Mesh

    devs = sorted(jax.devices(), key=lambda d: d.id)
    by_process = {p: [d for d in devs if d.process_index == p] for p in range(jax.process_count())}
    assert [len(v) for v in by_process.values()] == [2, 2]
    return (
        jax.make_mesh((2, 2), ("a", "b")),
        Mesh(np.array(by_process[0]), ("s",)),
        Mesh(np.array(by_process[1]), ("s",)),
        by_process,
    )


def _shardings(swapped: bool) -> dict:
    """Where each leaf goes; ``swapped`` moves each one to another process's devices."""
    glob, m0, m1, by_process = _meshes()
    if not swapped:
        return {
            "glob": NamedSharding(glob, P("a", "b")),
            "p1": NamedSharding(m1, P("s")),
            "p0": NamedSharding(m0, P("s")),
            "one1": SingleDeviceSharding(by_process[1][1]),
            "key1": SingleDeviceSharding(by_process[1][0]),
        }
    return {
        "glob": NamedSharding(m1, P(None, "s")),
        "p1": NamedSharding(m0, P(None, "s")),
        "p0": NamedSharding(m1, P()),
        "one1": SingleDeviceSharding(by_process[0][1]),
        "key1": NamedSharding(m0, P()),
    }


def _w_submesh_save(directory: str) -> dict:
    import jax

    ref, where = _ref(), _shardings(swapped=False)
    tree = {
        name: jax.make_array_from_callback(
            value.shape, where[name], lambda i, v=value: v[i], dtype=value.dtype
        )
        for name, value in ref.items()
    }
    # A typed key whose data lives on process 1 only (no shard on process 0).
    key_data = np.asarray(jax.random.key_data(jax.random.key(3)))
    data = jax.make_array_from_callback(
        key_data.shape, where["key1"], lambda i: key_data[i], dtype=key_data.dtype
    )
    tree["key1"] = jax.random.wrap_key_data(data)
    assert not tree["p1"].is_fully_addressable or jax.process_index() == 1
    distckpt.save(directory, tree, timeout_s=60)
    stats = distckpt.metadata(directory).save_stats
    return {"bytes_per_process": stats["bytes_per_process"]}


def _w_submesh_restore(directory: str, swapped: bool) -> dict:
    import jax

    ref, where = _ref(), _shardings(swapped)
    key_dtype = jax.random.key(0).dtype
    target = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where[name])
        for name, value in ref.items()
    }
    target["key1"] = jax.ShapeDtypeStruct((), key_dtype, sharding=where["key1"])
    out = distckpt.restore(directory, target, timeout_s=60)
    held = {}
    for name, arr in out.items():
        assert isinstance(arr, jax.Array), name
        assert arr.sharding == where[name], (name, arr.sharding)
        assert arr.shape == target[name].shape and arr.dtype == target[name].dtype, name
        mine = arr.sharding.addressable_devices
        assert arr.is_fully_addressable == (mine == arr.sharding.device_set), name
        if name == "key1":
            data = jax.random.key_data(arr)
            expect = np.asarray(jax.random.key_data(jax.random.key(3)))
        else:
            data, expect = arr, ref[name]
        count = 0
        for shard in data.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expect[shard.index], name)
            count += 1
        assert count == len(mine), name
        held[name] = count
    return held


def _w_submesh_restores(directory: str) -> dict:
    """Both restores of the test below, one after the other in one job."""
    held = {}
    for case, swapped in (("same", False), ("swapped", True)):
        try:
            held[case] = _w_submesh_restore(directory, swapped)
        except Exception as e:
            raise AssertionError(f"the restore onto the {case!r} shardings failed") from e
    return held


@pytest.mark.multiprocess
def test_arrays_on_one_process_sub_mesh_save_and_restore(tmp_path):
    """A process with no shard of a leaf writes and reads nothing for it."""
    directory = str(tmp_path / "ckpt")
    saved = run_processes(f"{HERE}:_w_submesh_save", 2, 2, args={"directory": directory})
    ref = _ref()
    # Process 1 wrote its own arrays; process 0 its own and half of the global one.
    half = ref["glob"].nbytes // 2
    assert saved[0].value["bytes_per_process"] == [
        half + ref["p0"].nbytes,
        half + ref["p1"].nbytes + ref["one1"].nbytes + 8,
    ]
    info = distckpt.metadata(directory)
    assert info.leaves["['p1']"].sharding == {
        "type": "NamedSharding",
        "mesh": {"s": 2},
        "spec": ["s"],
    }
    assert info.leaves["['one1']"].sharding == {"type": "SingleDeviceSharding"}
    distckpt.verify(directory)
    back = distckpt.restore(directory)  # every leaf, on the host, in this process
    for name, value in ref.items():
        np.testing.assert_array_equal(back[name], value)

    restored = run_processes(f"{HERE}:_w_submesh_restores", 2, 2, args={"directory": directory})
    assert [r.value["same"] for r in restored] == [
        {"glob": 2, "p1": 0, "p0": 2, "one1": 0, "key1": 0},
        {"glob": 2, "p1": 2, "p0": 0, "one1": 1, "key1": 1},
    ]
    assert [r.value["swapped"] for r in restored] == [
        {"glob": 0, "p1": 2, "p0": 0, "one1": 1, "key1": 2},
        {"glob": 2, "p1": 0, "p0": 2, "one1": 0, "key1": 0},
    ]


# --------------------------------------------------------------------------- memory kinds


def _mesh():
    return jax.make_mesh((2, 4), ("x", "y"))


def test_cpu_backend_has_the_host_memory_kinds():
    # What the tests below rely on: all three kinds exist on this backend.
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    assert {"device", "pinned_host", "unpinned_host"} <= kinds


@pytest.mark.parametrize("kind", ["pinned_host", "unpinned_host"])
def test_host_memory_kind_round_trip(tmp_path, kind, capsys):
    mesh = _mesh()
    host = NamedSharding(mesh, P("x", "y"), memory_kind=kind)
    dev = NamedSharding(mesh, P("x", "y"))
    values = {
        "mu": np.arange(64, dtype=np.float32).reshape(8, 8),
        "nu": np.arange(64, dtype=np.float32).reshape(8, 8) * -2,
        "w": np.arange(64, dtype=np.float32).reshape(8, 8) + 0.5,
        "c": np.arange(8, dtype=np.int32),
    }
    tree = {
        "mu": jax.device_put(values["mu"], host),
        "nu": jax.device_put(values["nu"], host),  # same shape and sharding: _put's fast path
        "w": jax.device_put(values["w"], dev),
        "c": jax.device_put(values["c"], SingleDeviceSharding(jax.devices()[3], memory_kind=kind)),
    }
    assert tree["mu"].sharding.memory_kind == kind
    distckpt.save(tmp_path / "c", tree)

    info = distckpt.metadata(tmp_path / "c")
    assert info.leaves["['mu']"].sharding == {
        "type": "NamedSharding",
        "mesh": {"x": 2, "y": 4},
        "spec": ["x", "y"],
        "memory_kind": kind,
    }
    assert info.leaves["['c']"].sharding == {"type": "SingleDeviceSharding", "memory_kind": kind}
    assert "memory_kind" not in info.leaves["['w']"].sharding  # the default: device memory
    assert cli.main(["inspect", str(tmp_path / "c")]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert f"P('x', 'y') in {kind}" in lines["['mu']"]
    assert f"in {kind}" not in lines["['w']"]

    def check(out, want):
        for name, arr in out.items():
            assert arr.sharding == want[name], name
            assert arr.sharding.memory_kind == want[name].memory_kind, name
            for shard in arr.addressable_shards:
                assert shard.data.sharding.memory_kind == want[name].memory_kind, name
            np.testing.assert_array_equal(np.asarray(arr), values[name], name)

    # Onto the same shardings.
    same = {name: a.sharding for name, a in tree.items()}
    assert _put._batched_device_put is not None, "the fast path must be what builds 'nu'"
    target = {
        n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for n, a in tree.items()
    }
    check(distckpt.restore(tmp_path / "c", target), same)
    # abstract_like replicates the single-device leaf on the mesh, in its memory kind.
    like = distckpt.abstract_like(tree)
    assert like["c"].sharding == NamedSharding(mesh, P(), memory_kind=kind)
    check(distckpt.restore(tmp_path / "c", like), {**same, "c": like["c"].sharding})

    # Host memory save -> device memory target, and the reverse.
    flipped = {
        "mu": NamedSharding(mesh, P("y", None)),
        "nu": NamedSharding(mesh, P("y", None)),
        "w": NamedSharding(mesh, P(None, "x"), memory_kind=kind),
        "c": NamedSharding(mesh, P(), memory_kind=kind),
    }
    target = {
        name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flipped[name])
        for name, v in values.items()
    }
    check(distckpt.restore(tmp_path / "c", target), flipped)

    # The restored host-memory state is usable: a jitted step moves it to device.
    out = distckpt.restore(tmp_path / "c", distckpt.abstract_like(tree))
    step = jax.jit(lambda m, w: m * 2 + w, out_shardings=dev)
    np.testing.assert_array_equal(
        np.asarray(step(jax.device_put(out["mu"], dev), out["w"])),
        values["mu"] * 2 + values["w"],
    )


# --------------------------------------------------------------------------- abstract meshes


def _explicit_mesh():
    return jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _init():
    return {
        "w": jax.device_put(jnp.zeros((8, 4)), P("x", "y")),
        "b": jax.device_put(jnp.zeros((4,)), P("y")),
        "rep": jnp.zeros((6,)),
        "step": jnp.zeros((), jnp.int32),
    }


def _saved_state(directory):
    mesh = _explicit_mesh()
    state = {
        "w": jax.device_put(
            np.arange(32, dtype=np.float32).reshape(8, 4), NamedSharding(mesh, P("x", "y"))
        ),
        "b": jax.device_put(np.arange(4, dtype=np.float32), NamedSharding(mesh, P("y"))),
        "rep": jax.device_put(np.linspace(0, 1, 6, dtype=np.float32), NamedSharding(mesh, P())),
        "step": jax.device_put(np.int32(41), NamedSharding(mesh, P())),
    }
    distckpt.save(directory, state)
    return mesh, {k: np.asarray(v) for k, v in state.items()}


def test_eval_shape_under_set_mesh_is_a_restore_target(tmp_path):
    mesh, values = _saved_state(tmp_path / "c")
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(_init)
        assert isinstance(abstract["w"].sharding.mesh, jax.sharding.AbstractMesh)
        direct = distckpt.restore(tmp_path / "c", abstract)
        target = distckpt.abstract_like(abstract)
        via_like = distckpt.restore(tmp_path / "c", target)
    for name, spec in [("w", P("x", "y")), ("b", P("y")), ("rep", P(None))]:
        want = NamedSharding(mesh, spec)
        assert target[name].sharding == want, name
        for out in (direct, via_like):
            assert out[name].sharding == want, name
            assert out[name].sharding.mesh == mesh, name
            np.testing.assert_array_equal(np.asarray(out[name]), values[name], name)
    # abstract_like puts a leaf without a sharding on the mesh that is set.
    assert target["step"].sharding == NamedSharding(mesh, P())
    assert via_like["step"].sharding == NamedSharding(mesh, P()) and int(via_like["step"]) == 41
    assert int(direct["step"]) == 41
    # The restored state works under the mesh it was restored for.
    with jax.set_mesh(mesh):
        total = jax.jit(lambda s: (s["w"] * 2).sum() + s["b"].sum())(via_like)
    assert float(total) == float(values["w"].sum() * 2 + values["b"].sum())


def test_abstract_mesh_target_without_a_set_mesh_is_a_clear_error(tmp_path):
    mesh, _ = _saved_state(tmp_path / "c")
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(_init)
    with pytest.raises(TreeMismatchError) as e:
        distckpt.restore(tmp_path / "c", abstract)
    msg = str(e.value)
    assert "['w']: " in msg and "['b']: " in msg and "abstract mesh {'x': 2, 'y': 4}" in msg
    assert "call restore inside `with jax.set_mesh(mesh):`" in msg
    assert "concrete NamedSharding" in msg
    with pytest.raises(TreeMismatchError) as e:
        distckpt.abstract_like(abstract)
    assert "['w']: " in str(e.value) and "call abstract_like inside" in str(e.value)

    other = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.set_mesh(other), pytest.raises(TreeMismatchError) as e:
        distckpt.restore(tmp_path / "c", abstract)
    assert "but the mesh set by jax.set_mesh is {'x': 4, 'y': 2}" in str(e.value)
