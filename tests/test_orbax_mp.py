"""Orbax checkpoints saved by 2-process jobs, restored by 1, 2 and 3-process jobs onto other meshes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.mp import run_processes

pytest.importorskip("orbax.checkpoint")
pytestmark = pytest.mark.multiprocess

HERE = "tests.test_orbax_mp"
W = (24, 12)  # divisible by the 2, 3, 4, 6 and 8-way splits below


def _reference() -> dict:
    return {
        "w": np.arange(W[0] * W[1], dtype=np.float32).reshape(W) / 7,
        "b": (np.arange(12, dtype=np.int32) * 3 - 5),
        "emb": np.arange(48 * 12, dtype=np.float32).reshape(48, 12).astype("bfloat16"),
    }


def _w_save(directories: dict[str, str]) -> int:
    """Saves on a (2, 4) mesh spanning both processes, with orbax-checkpoint's defaults,
    once per ``{how: directory}`` (one job writes every flavour the tests read)."""
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("x", "y"))
    ref = _reference()

    def put(value, spec):
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda i: value[i]
        )

    tree = {
        "params": {"w": put(ref["w"], P("x", "y")), "b": put(ref["b"], P())},
        "emb": put(ref["emb"], P(None, "y")),
        "step": 5,
    }
    for how, directory in directories.items():
        if how == "mgr":
            with ocp.CheckpointManager(directory) as mgr:
                mgr.save(5, args=ocp.args.StandardSave(tree))
                mgr.wait_until_finished()
        elif how == "zarr3":
            handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
            ocp.Checkpointer(handler).save(directory, args=ocp.args.PyTreeSave(tree))
        else:
            with ocp.StandardCheckpointer() as ck:
                ck.save(directory, tree)
                ck.wait_until_finished()
    return jax.process_index()


def _target(mesh_shape, names, w_spec, emb_spec):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(tuple(mesh_shape), tuple(names))

    def arr(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))

    return {
        "params": {"w": arr(W, jnp.float32, w_spec), "b": arr((12,), jnp.int32, [])},
        "emb": arr((48, 12), jnp.float32, emb_spec),  # bfloat16 saved: cast=True
        "step": 0,
    }


def _check(out) -> dict:
    import jax

    ref = _reference()
    want = {"w": ref["w"], "b": ref["b"], "emb": ref["emb"].astype(np.float32)}
    got = {"w": out["params"]["w"], "b": out["params"]["b"], "emb": out["emb"]}
    shards = 0
    for name, arr in got.items():
        for shard in arr.addressable_shards:
            data = np.asarray(shard.data)
            assert data.dtype == want[name].dtype, name
            np.testing.assert_array_equal(data, want[name][shard.index], err_msg=name)
            shards += 1
    assert out["step"] == 5
    return {"process": jax.process_index(), "shards": shards}


def _w_restore(directory: str, mesh_shape: list, names: list, w_spec: list, emb_spec: list):
    import distckpt

    target = _target(mesh_shape, names, w_spec, emb_spec)
    out = distckpt.restore(directory, target, cast=True, timeout_s=30)
    return _check(out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("orbax_mp")
    # The manager saves with StandardCheckpointer's defaults; one job saves both.
    directories = {how: str(base / how) for how in ("mgr", "zarr3")}
    results = run_processes(f"{HERE}:_w_save", 2, 4, args={"directories": directories})
    assert [r.value for r in results] == [0, 1]
    return {"mgr": os.path.join(directories["mgr"], "5"), "zarr3": directories["zarr3"]}


def test_the_save_is_what_orbax_writes_by_default(saved):
    """OCDBT (zarr, or zarr3), one OCDBT sub-tree per process, the manager's step layout."""
    import json

    for item, zarr3 in ((os.path.join(saved["mgr"], "default"), False), (saved["zarr3"], True)):
        meta = json.load(open(os.path.join(item, "_METADATA")))
        assert meta["use_zarr3"] is zarr3 and meta["use_ocdbt"] is True
        entries = set(os.listdir(item))
        assert {"ocdbt.process_0", "ocdbt.process_1", "manifest.ocdbt"} <= entries, entries


@pytest.mark.parametrize(
    "which, procs, devices, mesh_shape, names, w_spec, emb_spec",
    [
        ("mgr", 2, 4, [4, 2], ["a", "b"], ["b", "a"], ["a", None]),
        ("zarr3", 3, 2, [3, 2], ["a", "b"], ["a", "b"], [None, ["a", "b"]]),
        ("mgr", 3, 2, [6], ["z"], [None, "z"], ["z"]),
    ],
)
def test_restore_on_other_process_counts_and_meshes(
    saved, which, procs, devices, mesh_shape, names, w_spec, emb_spec
):
    args = {"mesh_shape": mesh_shape, "names": names, "w_spec": w_spec, "emb_spec": emb_spec}
    results = run_processes(
        f"{HERE}:_w_restore", procs, devices, args={"directory": saved[which], **args}
    )
    assert [r.value["process"] for r in results] == list(range(procs))


@pytest.mark.parametrize("which", ["zarr3", "mgr"])
def test_restore_in_one_process_onto_another_mesh(saved, which):
    out = _w_restore(saved[which], [8], ["z"], ["z", None], ["z", None])
    assert out["shards"] == 8 + 8 + 8


def _w_restore_each(paths: list[str]) -> dict:
    import jax

    import distckpt

    try:
        distckpt.restore(paths[jax.process_index()], timeout_s=30)
    except distckpt.errors.DistckptError as e:
        return {"type": type(e).__name__, "message": str(e), "processes": e.processes}
    return {"type": None}


def test_damaged_data_seen_by_one_process_fails_every_process(saved, tmp_path):
    import shutil

    damaged = str(tmp_path / "damaged")
    shutil.copytree(saved["zarr3"], damaged)
    for root, _, names in os.walk(damaged):
        if os.path.basename(root) == "d":  # OCDBT's data files
            for name in names:
                os.truncate(os.path.join(root, name), 16)
    results = run_processes(
        f"{HERE}:_w_restore_each", 2, 2, args={"paths": [saved["zarr3"], damaged]}
    )
    for r in results:
        assert r.value["type"] == "CorruptCheckpointError", r.value
        assert r.value["processes"] == [1] and "TensorStore could not" in r.value["message"]


def _w_convert(src: str, dst: str) -> dict:
    import jax

    import distckpt
    from distckpt.cli import main

    # The command line, as under `distckpt launch`; the Python call is
    # distckpt.convert (tests/test_safetensors.py).
    assert main(["convert", src, dst, "--to", "distckpt", "--distributed"]) == 0
    return {"process": jax.process_index(), "committed": distckpt.is_committed(dst)}


def test_two_processes_convert_an_orbax_checkpoint_each_its_part(saved, tmp_path):
    import jax

    import distckpt

    dst = str(tmp_path / "converted")
    results = run_processes(f"{HERE}:_w_convert", 2, 4, args={"src": saved["zarr3"], "dst": dst})
    assert [r.value for r in results] == [{"process": p, "committed": True} for p in (0, 1)]
    assert "by 2 processes" in results[0].stdout and "converted" not in results[1].stdout
    info = distckpt.metadata(dst)
    assert info.process_count == 2
    # Each process wrote its half of every array (each leaf split across the processes).
    files = sorted(f for f in os.listdir(dst) if f.startswith("attempt"))
    data = [
        f for _, _, fs in os.walk(os.path.join(dst, files[0])) for f in fs if f.endswith(".bin")
    ]
    assert {f[:6] for f in data} == {"p00000", "p00001"}, data
    out = distckpt.restore(dst)
    ref = _reference()
    np.testing.assert_array_equal(out["params"]["w"], ref["w"])
    np.testing.assert_array_equal(out["params"]["b"], ref["b"])
    assert out["emb"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(out["emb"].astype(np.float32), ref["emb"].astype(np.float32))
    assert out["step"] == 5
