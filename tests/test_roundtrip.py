"""Single-process save/restore on 8 fake CPU devices: dtypes x save shardings x target shardings."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _knobs
from distckpt.errors import CheckpointExistsError, NotCommittedError, TreeMismatchError

DTYPES = ["float32", "bfloat16", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"]
for _name in ["float8_e4m3fn", "float8_e5m2", "int4", "uint4"]:
    try:
        jnp.dtype(_name)
        DTYPES.append(_name)
    except TypeError:  # pragma: no cover - depends on the jax version
        pass


def _mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


SAVE_LAYOUTS = {
    "2d_x_y": (((2, 4), ("x", "y")), P("x", "y")),
    "rows_8": (((8,), ("d",)), P("d", None)),
    "replicated": (((2, 4), ("x", "y")), P()),
    "partial_replica": (((2, 4), ("x", "y")), P(None, "y")),
    "multi_axis": (((2, 4), ("x", "y")), P(("x", "y"), None)),
}
TARGET_LAYOUTS = {
    "same": (((2, 4), ("x", "y")), P("x", "y")),
    "transposed_mesh": (((4, 2), ("a", "b")), P("b", "a")),
    "cols_8": (((8,), ("d",)), P(None, "d")),
    "replicated_4dev": (((4,), ("r",)), P()),
    "single_device": None,
}


def _values(dtype: str, shape=(16, 24)) -> np.ndarray:
    rng = np.random.default_rng(0)
    dt = jnp.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if jnp.issubdtype(dt, jnp.integer):
        info = jnp.iinfo(dt)
        return rng.integers(max(info.min, -8), min(info.max, 7) + 1, shape).astype(dt)
    return rng.standard_normal(shape).astype(np.float32).astype(dt)


def _sharding(layout):
    if layout is None:
        return SingleDeviceSharding(jax.devices()[3])
    (shape, names), spec = layout
    return NamedSharding(_mesh(shape, names), spec)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_resharded(tmp_path, dtype):
    x = jax.device_put(_values(dtype), _sharding(SAVE_LAYOUTS["2d_x_y"]))
    value = np.asarray(x)  # without jax_enable_x64, 64-bit values become 32-bit
    distckpt.save(tmp_path / "c", {"x": x})
    target = _sharding(TARGET_LAYOUTS["transposed_mesh"])
    out = distckpt.restore(
        tmp_path / "c", {"x": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=target)}
    )
    assert out["x"].dtype == value.dtype
    assert out["x"].sharding == target
    np.testing.assert_array_equal(np.asarray(out["x"]), value)


@pytest.mark.parametrize("save", sorted(SAVE_LAYOUTS))
@pytest.mark.parametrize("target", sorted(TARGET_LAYOUTS))
def test_sharding_matrix(tmp_path, save, target):
    value = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    x = jax.device_put(value, _sharding(SAVE_LAYOUTS[save]))
    with _knobs.override(chunk_bytes=256):  # many chunks per shard: exercises reassembly
        distckpt.save(tmp_path / "c", {"x": x})
    sharding = _sharding(TARGET_LAYOUTS[target])
    out = distckpt.restore(
        tmp_path / "c", {"x": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)}
    )
    assert out["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["x"]), value)
    for shard in out["x"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_replicated_array_is_stored_once(tmp_path):
    value = np.ones((64, 64), np.float32)
    x = jax.device_put(value, _sharding(SAVE_LAYOUTS["replicated"]))
    distckpt.save(tmp_path / "c", {"x": x})
    info = distckpt.metadata(tmp_path / "c")
    assert info.total_bytes == value.nbytes
    assert distckpt.verify(tmp_path / "c").bytes_checked == value.nbytes


def test_special_shapes(tmp_path):
    tree = {
        "scalar": jax.device_put(jnp.float32(3.5)),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "empty_sharded": jax.device_put(
            np.zeros((8, 0), np.int32), _sharding((((8,), ("d",)), P("d", None)))
        ),
        "np_scalar": np.float64(2.0),
        "np0d": np.array(7, np.int16),
    }
    distckpt.save(tmp_path / "c", tree)
    out = distckpt.restore(tmp_path / "c")
    assert out["scalar"].shape == () and out["scalar"] == 3.5
    assert out["empty"].shape == (0, 4)
    assert out["empty_sharded"].shape == (8, 0)
    assert out["np_scalar"] == 2.0 and out["np0d"] == 7 and out["np0d"].dtype == np.int16
    distckpt.verify(tmp_path / "c")


Pair = collections.namedtuple("Pair", ["mu", "nu"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    params: dict
    step: jax.Array


def test_structures_and_python_leaves(tmp_path):
    mesh = _mesh((2, 4), ("x", "y"))
    w = jax.device_put(np.arange(32.0).reshape(4, 8), NamedSharding(mesh, P("x", "y")))
    tree = {
        "state": State(params={"w": w}, step=jnp.array(5)),
        "by_layer": {0: jnp.ones(2), 1: jnp.zeros(2)},
        "opt": Pair(mu=jnp.zeros(3), nu=(jnp.ones(3), [jnp.arange(2)])),
        "py": {"i": 3, "f": 0.5, "b": False, "s": "text", "n": None, "big": 2**70},
        "str_digit_key": {"1": jnp.ones(1)},
    }
    distckpt.save(tmp_path / "c", tree, metadata={"note": "hello", "epoch": 2})
    plain = distckpt.restore(tmp_path / "c")
    # The saved containers, with integer dict keys kept as ints and "1" kept a str;
    # the namedtuple as its (imported) class, the dataclass node as a dict of its fields.
    assert list(plain["by_layer"]) == [0, 1]
    assert list(plain["str_digit_key"]) == ["1"]
    assert plain["py"] == {"i": 3, "f": 0.5, "b": False, "s": "text", "n": None, "big": 2**70}
    assert type(plain["opt"]) is Pair and type(plain["opt"].nu) is tuple
    assert type(plain["opt"].nu[1]) is list
    assert list(plain["state"]) == ["params", "step"] and plain["state"]["step"] == 5
    # Into the real structure.
    target = jax.tree_util.tree_map(lambda a: a, tree)
    out = distckpt.restore(tmp_path / "c", target)
    assert isinstance(out["state"], State) and isinstance(out["opt"], Pair)
    assert out["state"].params["w"].sharding == w.sharding
    np.testing.assert_array_equal(np.asarray(out["state"].params["w"]), np.asarray(w))
    assert out["py"]["big"] == 2**70 and out["py"]["n"] is None
    assert distckpt.metadata(tmp_path / "c").user_metadata == {"note": "hello", "epoch": 2}


def test_prng_keys(tmp_path):
    mesh = _mesh((2, 4), ("x", "y"))
    keys = jax.random.split(jax.random.key(0), 8)
    sharded = jax.device_put(keys, NamedSharding(mesh, P(("x", "y"))))
    rbg = jax.random.key(1, impl="rbg")
    distckpt.save(tmp_path / "c", {"k": sharded, "rbg": rbg, "legacy": jax.random.PRNGKey(3)})
    target = {
        "k": jax.ShapeDtypeStruct(
            (8,), keys.dtype, sharding=NamedSharding(_mesh((4,), ("a",)), P("a"))
        ),
        "rbg": rbg,
        "legacy": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    out = distckpt.restore(tmp_path / "c", target)
    assert jax.dtypes.issubdtype(out["k"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(out["k"]), jax.random.key_data(keys))
    assert str(jax.random.key_impl(out["rbg"])) == "rbg"
    np.testing.assert_array_equal(jax.random.key_data(out["rbg"]), jax.random.key_data(rbg))
    # The restored keys work.
    assert jax.vmap(jax.random.normal)(out["k"]).shape == (8,)


def test_mismatch_lists_every_difference(tmp_path):
    distckpt.save(
        tmp_path / "c",
        {"a": jnp.ones((2, 3)), "b": jnp.ones(4, jnp.int32), "c": 1, "d": jnp.ones(2)},
    )
    target = {
        "a": jax.ShapeDtypeStruct((3, 2), jnp.float32),
        "b": jax.ShapeDtypeStruct((4,), jnp.float32),
        "c": "one",
        "new": jax.ShapeDtypeStruct((1,), jnp.float32),
    }
    with pytest.raises(TreeMismatchError) as info:
        distckpt.restore(tmp_path / "c", target)
    text = str(info.value)
    assert len(info.value.problems) == 5, text
    assert "['a']: target shape (3, 2), checkpoint has float32[2, 3]" in text
    assert "['b']: target dtype float32, checkpoint has int32[4] (pass cast=True" in text
    assert "['c']: target is a Python str" in text
    assert "['new']: in the target but not in the checkpoint" in text
    assert "['d']: in the checkpoint (float32[2]) but not in the target" in text


def test_cast_and_partial(tmp_path):
    distckpt.save(
        tmp_path / "c",
        {"params": {"w": jnp.arange(4, dtype=jnp.int32)}, "opt": {"mu": jnp.ones(4)}, "n": 3},
    )
    out = distckpt.restore(
        tmp_path / "c",
        {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, "n": 0.0},
        partial=True,
        cast=True,
    )
    assert (
        out["params"]["w"].dtype == jnp.float32 and out["n"] == 3.0 and isinstance(out["n"], float)
    )
    # A None target leaf skips that subtree without partial=True.
    out = distckpt.restore(
        tmp_path / "c", {"params": {"w": np.zeros(4, np.int32)}, "opt": None, "n": 0}
    )
    assert out["opt"] is None and isinstance(out["params"]["w"], np.ndarray)


def test_not_committed_and_overwrite(tmp_path):
    with pytest.raises(NotCommittedError, match="does not exist"):
        distckpt.restore(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(NotCommittedError, match="not a distckpt checkpoint"):
        distckpt.metadata(tmp_path / "junk")
    (tmp_path / "half" / "attempt-0123").mkdir(parents=True)
    with pytest.raises(NotCommittedError, match="interrupted"):
        distckpt.restore(tmp_path / "half")
    assert not distckpt.is_committed(tmp_path / "half")

    distckpt.save(tmp_path / "c", {"v": jnp.zeros(3)})
    assert distckpt.is_committed(tmp_path / "c")
    with pytest.raises(CheckpointExistsError):
        distckpt.save(tmp_path / "c", {"v": jnp.ones(3)})
    distckpt.save(tmp_path / "c", {"v": jnp.ones(3)}, overwrite=True)
    np.testing.assert_array_equal(distckpt.restore(tmp_path / "c")["v"], np.ones(3))
    # The old attempt's data is gone once the new one committed.
    assert len([p for p in (tmp_path / "c").iterdir() if p.name.startswith("attempt-")]) == 1

    # A save into a directory with an interrupted attempt commits and cleans it up.
    distckpt.save(tmp_path / "half", {"v": jnp.ones(1)})
    assert not (tmp_path / "half" / "attempt-0123").exists()


def test_unsupported_leaves_are_all_reported(tmp_path):
    with pytest.raises(TypeError) as info:
        distckpt.save(tmp_path / "c", {"a": object(), "b": jnp.ones(1), "c": [1j]})
    assert "['a']" in str(info.value) and "['c'][0]" in str(info.value)
    assert not (tmp_path / "c").exists() or not distckpt.is_committed(tmp_path / "c")


def test_many_small_leaves_share_one_file(tmp_path):
    tree = {f"leaf{i:04d}": np.full(256, i, np.float32) for i in range(500)}
    distckpt.save(tmp_path / "c", tree)
    info = distckpt.metadata(tmp_path / "c")
    assert info.files == 1
    out = distckpt.restore(tmp_path / "c")
    assert all(out[k][0] == i for i, k in enumerate(sorted(tree)))


def test_memory_kvstore_backend():
    x = jax.device_put(np.arange(48.0).reshape(6, 8), _sharding(SAVE_LAYOUTS["2d_x_y"]))
    distckpt.save("memory://ckpt_test", {"x": x, "s": "a"})
    out = distckpt.restore(
        "memory://ckpt_test",
        {"x": jax.ShapeDtypeStruct((6, 8), x.dtype, sharding=_sharding(None)), "s": ""},
    )
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(x))
    assert distckpt.verify("memory://ckpt_test").leaves == 2


def test_tensorstore_file_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_IO_BACKEND", "tensorstore")
    x = jax.device_put(
        np.arange(48.0, dtype=np.float32).reshape(6, 8), _sharding(SAVE_LAYOUTS["2d_x_y"])
    )
    distckpt.save(tmp_path / "c", {"x": x})
    monkeypatch.delenv("DISTCKPT_IO_BACKEND")
    # Same format either way: the POSIX path reads what the kvstore path wrote.
    np.testing.assert_array_equal(distckpt.restore(tmp_path / "c")["x"], np.asarray(x))


def _kinds_of_sharding():
    out = {name: _sharding(layout) for name, layout in SAVE_LAYOUTS.items()}
    out["single_device"] = _sharding(None)
    explicit = getattr(jax.sharding, "AxisType", None)
    if explicit is not None and hasattr(explicit, "Explicit"):
        mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(explicit.Explicit,) * 2)
        out["explicit_axes"] = NamedSharding(mesh, P("x", "y"))
    return out


def test_restored_arrays_are_what_device_put_gives(tmp_path):
    # Restore builds most arrays through the runtime's batched device_put
    # (distckpt/_put.py), not the public API; every property a user can see
    # must be the same as jax.device_put's, for the first leaf of a kind
    # (public path) and the later ones (batched path, when this JAX has it).
    shardings = _kinds_of_sharding()
    values = {
        f"{name}_{i}": np.arange(16 * 24, dtype=np.float32).reshape(16, 24) + i
        for name in shardings
        for i in range(3)
    }
    tree = {k: jax.device_put(v, shardings[k.rsplit("_", 1)[0]]) for k, v in values.items()}
    distckpt.save(tmp_path / "c", tree)
    out = distckpt.restore(tmp_path / "c", jax.tree.map(distckpt.abstract_like, tree))
    double = jax.jit(lambda a: a * 2)
    for key, value in values.items():
        want, got = jax.device_put(value, tree[key].sharding), out[key]
        assert (got.aval, got.sharding, got.committed) == (want.aval, want.sharding, True), key
        assert not got.weak_type
        np.testing.assert_array_equal(np.asarray(got), value)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
        np.testing.assert_array_equal(np.asarray(double(got)), value * 2)


def test_donating_restored_arrays_never_writes_into_shared_buffers(tmp_path):
    # Devices that hold the same block share one host buffer after restore,
    # as after jax.device_put. A donating step must not write into it, or it
    # would change the block under the other devices while they read it.
    value = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    shardings = {
        "replicated": _sharding(SAVE_LAYOUTS["replicated"]),
        "partial_replica": _sharding(SAVE_LAYOUTS["partial_replica"]),
        "rows_of_2": NamedSharding(_mesh((2, 4), ("x", "y")), P("x")),
    }
    tree = {k: jax.device_put(value, s) for k, s in shardings.items()}
    distckpt.save(tmp_path / "c", tree)
    for key, sharding in shardings.items():
        restored = distckpt.restore(
            tmp_path / "c", {key: distckpt.abstract_like(tree[key])}, partial=True
        )[key]
        before = {s.data.unsafe_buffer_pointer() for s in restored.addressable_shards}
        step = jax.jit(lambda a: a * 2 + 1, donate_argnums=0, out_shardings=sharding)
        result = step(restored)
        assert restored.is_deleted()
        for shard in result.addressable_shards:
            assert shard.data.unsafe_buffer_pointer() not in before, key
            np.testing.assert_array_equal(np.asarray(shard.data), (value * 2 + 1)[shard.index])
