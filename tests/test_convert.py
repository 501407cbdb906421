"""distckpt convert and Orbax reading, on checkpoints written here by distckpt and orbax."""

from __future__ import annotations

import json
import os
import sys
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _convert, _export, _sources
from distckpt.cli import main
from distckpt.errors import CheckpointExistsError, TreeMismatchError

ocp = pytest.importorskip("orbax.checkpoint")


def _tree() -> dict:
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
            "b": jnp.arange(8, dtype=jnp.bfloat16),
        },
        "layers": [np.arange(6, dtype=np.int16).reshape(2, 3), np.float64(2.5)],
        "rng": jax.random.key(3),
        "step": 42,
        "lr": 0.125,
        "done": False,
        "skip": None,
    }


def _host(tree):
    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return np.asarray(x)
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def _assert_same(got, want):
    got, want = _host(got), _host(want)
    assert jax.tree.structure(got, is_leaf=lambda x: x is None) == jax.tree.structure(
        want, is_leaf=lambda x: x is None
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
        else:
            assert g == w and type(g) is type(w)


@pytest.fixture
def orbax_dir(tmp_path):
    tree = _tree()
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "orbax", tree, custom_metadata={"run": "o1"})
        ck.wait_until_finished()
    return tmp_path / "orbax", tree


def test_orbax_to_distckpt_restores_equal_values(orbax_dir, tmp_path, capsys):
    src, tree = orbax_dir
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "distckpt"]) == 0
    assert "from orbax" in capsys.readouterr().out
    distckpt.verify(tmp_path / "d")
    info = distckpt.metadata(tmp_path / "d")
    assert info.user_metadata == {"run": "o1"}
    assert info.leaves["['rng']"].prng_impl == "threefry2x32"
    _assert_same(distckpt.restore(tmp_path / "d", _abstract(tree)), tree)

    assert main(["diff", str(src), str(tmp_path / "d"), "--values"]) == 0
    assert "0 different" in capsys.readouterr().out


def _abstract(tree):
    mesh = jax.make_mesh((8,), ("z",))

    def one(x):
        if isinstance(x, np.generic):
            return np.asarray(x)  # np.float64 is a float: ask for a 0-d array
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=NamedSharding(mesh, P(*([None] * x.ndim)))
            )
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def test_restore_reads_an_orbax_checkpoint_directly(orbax_dir):
    src, tree = orbax_dir
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    target = {
        "params": {
            "w": jax.ShapeDtypeStruct(
                (16, 8), jnp.float32, sharding=NamedSharding(mesh, P("b", "a"))
            ),
            "b": np.zeros(8, jnp.bfloat16),
        },
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
        "step": 0,
    }
    got = distckpt.restore(src, target, partial=True)
    assert got["params"]["w"].sharding == target["params"]["w"].sharding
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.asarray(tree["params"]["w"]))
    np.testing.assert_array_equal(got["params"]["b"], np.asarray(tree["params"]["b"]))
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(tree["rng"]))
    assert got["step"] == 42
    plain = distckpt.restore(src)
    np.testing.assert_array_equal(plain["layers"][0], tree["layers"][0])
    assert plain["lr"] == 0.125 and plain["done"] is False

    with pytest.raises(TreeMismatchError) as e:
        distckpt.restore(src, {"params": {"w": np.zeros((8, 16), np.float32)}, "x": 1})
    msg = str(e.value)
    assert "Orbax checkpoint" in msg and "target shape (8, 16)" in msg
    assert "['x']: in the target but not in the checkpoint" in msg
    assert "['step']: in the checkpoint" in msg


def test_distckpt_to_orbax_and_back(tmp_path, capsys):
    tree = {k: v for k, v in _tree().items()}
    distckpt.save(tmp_path / "d", tree, metadata={"epoch": 3})
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "o"), "--to", "orbax"]) == 0
    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(tmp_path / "o")
    want = {**tree, "layers": [tree["layers"][0], np.float64(2.5)]}
    np.testing.assert_array_equal(restored["params"]["w"], np.asarray(tree["params"]["w"]))
    np.testing.assert_array_equal(restored["layers"][0], tree["layers"][0])
    assert restored["step"] == 42 and restored["done"] is False
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(tree["rng"])
    )

    assert main(["convert", str(tmp_path / "o"), str(tmp_path / "d2"), "--to", "distckpt"]) == 0
    capsys.readouterr()
    assert distckpt.metadata(tmp_path / "d2").user_metadata == {"epoch": 3}
    del want["skip"]
    got = distckpt.restore(tmp_path / "d2")
    assert got["layers"][1] == 2.5
    np.testing.assert_array_equal(got["params"]["w"], np.asarray(tree["params"]["w"]))
    np.testing.assert_array_equal(got["params"]["b"], np.asarray(tree["params"]["b"]))

    code = main(["convert", str(tmp_path / "d"), str(tmp_path / "o"), "--to", "orbax"])
    assert code == 2 and "already exists" in capsys.readouterr().err

    distckpt.save(tmp_path / "s", {"name": "run1", "x": np.ones(2)})
    assert main(["convert", str(tmp_path / "s"), str(tmp_path / "o3"), "--to", "orbax"]) == 2
    assert "Orbax cannot store Python str leaves (['name'])" in capsys.readouterr().err


def test_orbax_missing_names_the_extra(tmp_path, monkeypatch, capsys):
    distckpt.save(tmp_path / "d", {"x": np.ones(2)})
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # as if not installed
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "o"), "--to", "orbax"]) == 2
    assert "pip install 'distckpt[orbax]'" in capsys.readouterr().err


def test_convert_to_distckpt_refuses_a_committed_destination_before_reading(
    tmp_path, monkeypatch, capsys
):
    distckpt.save(tmp_path / "d", {"x": np.ones(2)})
    distckpt.save(tmp_path / "e", {"y": np.zeros(3)})

    def no_load(source):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(_convert, "load_tree", no_load)
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "e"), "--to", "distckpt"]) == 2
    err = capsys.readouterr().err
    assert f"a committed checkpoint already exists at {tmp_path / 'e'}" in err
    assert "--overwrite" in err
    with pytest.raises(CheckpointExistsError):
        _convert.convert(str(tmp_path / "d"), str(tmp_path / "e"), to="distckpt")
    assert distckpt.restore(tmp_path / "e")["y"].shape == (3,)  # untouched
    monkeypatch.undo()
    args = ["convert", str(tmp_path / "d"), str(tmp_path / "e"), "--to", "distckpt"]
    assert main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(distckpt.restore(tmp_path / "e")["x"], np.ones(2))


def test_npz_export_names_dtypes_and_record(tmp_path, capsys):
    tree = _tree()
    tree["a/b"] = np.ones(2, np.uint8)  # a '/' in a key is escaped
    tree["empty"] = np.zeros((0, 3), np.float32)
    tree["name"] = "run1"
    distckpt.save(tmp_path / "d", tree, metadata={"epoch": 3})
    out = tmp_path / "x.npz"
    assert main(["convert", str(tmp_path / "d"), str(out), "--to", "npz"]) == 0
    capsys.readouterr()
    with np.load(out) as z:
        names = set(z.files)
        assert {"params/w", "params/b", "layers/0", "layers/1", "rng", "step", "a~1b"} <= names
        assert "skip" not in names
        np.testing.assert_array_equal(z["params/w"], np.asarray(tree["params"]["w"]))
        record = json.loads(str(z["__distckpt__"]))
        b = z["params/b"]
        assert b.dtype == np.uint16  # bfloat16 bits
        np.testing.assert_array_equal(b.view(jnp.bfloat16), np.asarray(tree["params"]["b"]))
        assert z["step"] == 42 and z["step"].dtype == np.int64
        assert z["done"].dtype == np.bool_ and str(z["name"]) == "run1"
        assert z["empty"].shape == (0, 3)
        np.testing.assert_array_equal(z["rng"], jax.random.key_data(tree["rng"]))
    leaves = {e["name"]: e for e in record["leaves"]}
    assert leaves["params/b"]["dtype"] == "bfloat16" and leaves["params/b"]["stored_as"] == "uint16"
    assert leaves["rng"]["impl"] == "threefry2x32"
    assert leaves["skip"]["kind"] == "none"
    assert leaves["a~1b"]["path"] == [["key", "a/b"]]
    assert record["user_metadata"] == {"epoch": 3}
    for name, entry in leaves.items():  # names are reversible
        assert _export.split_name(name) == [str(k) for _, k in entry["path"]]

    assert main(["convert", str(tmp_path / "d"), str(out), "--to", "npz"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "d"), str(out), "--to", "npz", "--overwrite"]) == 0


def _read_safetensors(path) -> tuple[dict, dict]:
    header, start = _export.read_safetensors_header(str(path))
    dtypes = {v: k for k, v in _export.SAFETENSORS_DTYPES.items()}
    raw = open(path, "rb").read()
    out = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dtype = np.dtype(jnp.dtype(dtypes[info["dtype"]]))
        out[name] = np.frombuffer(raw[start + a : start + b], dtype).reshape(info["shape"])
        end = max(end, b)
    assert start % 8 == 0 and start + end == len(raw)  # no gaps, no trailing bytes
    return out, header["__metadata__"]


def test_safetensors_export(tmp_path, capsys):
    tree = _tree()
    distckpt.save(tmp_path / "d", tree)
    out = tmp_path / "x.safetensors"
    assert main(["convert", str(tmp_path / "d"), str(out), "--to", "safetensors"]) == 0
    capsys.readouterr()
    tensors, meta = _read_safetensors(out)
    np.testing.assert_array_equal(tensors["params/w"], np.asarray(tree["params"]["w"]))
    np.testing.assert_array_equal(tensors["params/b"], np.asarray(tree["params"]["b"]))
    np.testing.assert_array_equal(tensors["layers/0"], tree["layers"][0])
    assert tensors["step"] == 42 and tensors["done"] == False  # noqa: E712
    record = json.loads(meta["distckpt"])
    assert {e["name"] for e in record["leaves"]} >= {"skip", "rng"}
    try:
        from safetensors.numpy import load_file
    except ImportError:
        pass  # not installed here: our reader above is the check
    else:
        loaded = load_file(str(out))
        np.testing.assert_array_equal(loaded["params/w"], np.asarray(tree["params"]["w"]))

    distckpt.save(tmp_path / "i4", {"q": jnp.arange(4, dtype=jnp.int4), "ok": np.ones(2)})
    code = main(["convert", str(tmp_path / "i4"), str(tmp_path / "q.st"), "--to", "safetensors"])
    err = capsys.readouterr().err
    assert code == 2 and "['q'] (int4)" in err and "--to npz" in err
    assert not (tmp_path / "q.st").exists()


def test_flat_name_collision_is_refused(tmp_path):
    distckpt.save(tmp_path / "d", {"__distckpt__": np.ones(2)})
    with _sources.open_source(tmp_path / "d") as src, pytest.raises(ValueError, match="flat name"):
        _export.to_npz(src, str(tmp_path / "x.npz"))
    assert not os.path.exists(tmp_path / "x.npz")
    assert _export.flat_name((("key", "a/b~c"), ("idx", 0))) == "a~1b~0c/0"
    assert _export.split_name("a~1b~0c/0") == ["a/b~c", "0"]
    assert _export.flat_name(()) == "__root__"


def test_export_streams_with_bounded_memory(tmp_path):
    big = np.arange(4 << 20, dtype=np.float64).reshape(4096, 1024)  # 32 MiB
    distckpt.save(tmp_path / "d", {"big": big})
    del big
    for fmt, write in (("npz", _export.to_npz), ("safetensors", _export.to_safetensors)):
        with _sources.open_source(tmp_path / "d") as src:
            tracemalloc.start()
            write(src, str(tmp_path / f"x.{fmt}"), slab_bytes=1 << 20)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 8 << 20, f"{fmt}: peak {peak} bytes for a 32 MiB leaf"
    with zipfile.ZipFile(tmp_path / "x.npz") as zf:
        assert zf.getinfo("big.npy").file_size > 32 << 20
    with np.load(tmp_path / "x.npz") as z:
        assert z["big"][4095, 1023] == (4 << 20) - 1
    tensors, _ = _read_safetensors(tmp_path / "x.safetensors")
    assert tensors["big"][123, 45] == 123 * 1024 + 45


def test_convert_refuses_a_path_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "o"), "--to", "npz"]) == 2
    err = capsys.readouterr().err
    assert "not a distckpt checkpoint" in err and str(tmp_path / "junk") in err


@pytest.mark.parametrize("use_ocdbt,use_zarr3", [(False, False), (True, True), (False, True)])
def test_restore_reads_other_orbax_layouts(tmp_path, use_ocdbt, use_zarr3):
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "n": np.arange(3), "s": 5}
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    ocp.Checkpointer(handler).save(tmp_path / "o", args=ocp.args.PyTreeSave(tree))
    got = distckpt.restore(tmp_path / "o")
    np.testing.assert_array_equal(got["a"], np.asarray(tree["a"]))
    np.testing.assert_array_equal(got["n"], tree["n"])
    assert got["s"] == 5


def test_orbax_manager_step_directory_is_found(tmp_path):
    tree = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(tmp_path / "mgr") as mgr:
        mgr.save(7, args=ocp.args.StandardSave(tree))
        mgr.wait_until_finished()
    got = distckpt.restore(tmp_path / "mgr" / "7")
    np.testing.assert_array_equal(got["w"], tree["w"])


def test_ls_and_inspect_understand_an_orbax_manager_directory(tmp_path, capsys):
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path / "mgr", options=options) as mgr:
        for step in (3, 7):
            tree = {"w": np.full(4, step, np.float32)}
            mgr.save(step, args=ocp.args.StandardSave(tree), metrics={"loss": 1.0 / step})
        mgr.wait_until_finished()
    (tmp_path / "mgr" / "9.orbax-checkpoint-tmp-123").mkdir()  # a save that did not finish
    assert main(["ls", str(tmp_path / "mgr")]) == 0
    out = capsys.readouterr().out
    assert "an Orbax CheckpointManager directory" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "committed" in lines["3"] and "loss=0.3333" in lines["3"]
    assert "*best" in lines["7"] and "uncommitted" in lines["9"]
    assert main(["ls", str(tmp_path / "mgr"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "orbax" and doc["best"]["step"] == 7
    assert [s["step"] for s in doc["steps"]] == [3, 7, 9] and doc["steps"][0]["process_count"] == 1

    assert main(["inspect", str(tmp_path / "mgr")]) == 0
    out = capsys.readouterr().out
    assert "steps 3, 7; the latest:" in out and "/mgr/7/default: Orbax checkpoint" in out
    got = distckpt.restore(tmp_path / "mgr" / "7")
    np.testing.assert_array_equal(got["w"], np.full(4, 7, np.float32))
