"""Defects found by black-box testing: unsupported numpy dtypes, a file as a
checkpoint path, and 64-bit leaves restored into jax.Arrays without x64."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.cli import main
from distckpt.errors import NotCommittedError, TreeMismatchError

X64_FIX = 'jax.config.update("jax_enable_x64", True)'


@contextlib.contextmanager
def _x64(enabled: bool):
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- dtypes


def test_object_and_structured_numpy_leaves_are_listed_with_the_other_problems(tmp_path):
    tree = {
        "objects": np.array([1, "a"], dtype=object),
        "record": {"fields": np.zeros(3, dtype=[("a", "i4"), ("b", "f4")])},
        "one_record": np.zeros(2, dtype=[("a", "i4")])[0],  # a numpy scalar of that dtype
        "thing": object(),
        "fine": np.arange(3),
    }
    with pytest.raises(TypeError) as info:
        distckpt.save(tmp_path / "c", tree)
    lines = str(info.value).splitlines()
    assert lines[0] == "the tree has leaves distckpt cannot save:"
    assert lines[1:] == [
        "  ['objects']: cannot save a numpy array of dtype object: object arrays hold pointers "
        "to Python objects, not values; convert it to a numeric or string dtype, or save its "
        "items as separate leaves",
        "  ['one_record']: cannot save a numpy array of dtype [('a', '<i4')]: structured dtypes "
        "are not supported; save the fields as separate arrays "
        "({name: arr[name] for name in arr.dtype.names})",
        "  ['record']['fields']: cannot save a numpy array of dtype [('a', '<i4'), ('b', '<f4')]: "
        "structured dtypes are not supported; save the fields as separate arrays "
        "({name: arr[name] for name in arr.dtype.names})",
        "  ['thing']: cannot save a leaf of type builtins.object; supported leaves are jax.Array, "
        "numpy arrays, int, float, bool, str and None",
    ]
    assert not distckpt.is_committed(tmp_path / "c")


def test_numpy_dtypes_that_round_trip_stay_supported(tmp_path):
    tree = {
        "day": np.array(["2024-01-01", "NaT"], dtype="datetime64[D]"),
        "span": np.array([1, -2], dtype="timedelta64[s]"),
        "text": np.array(["ab", "c"]),
        "raw": np.frombuffer(b"abcdefgh", dtype="V4"),
        "big_endian": np.array([1, 2], dtype=">i4"),
    }
    distckpt.save(tmp_path / "c", tree)
    out = distckpt.restore(tmp_path / "c")
    for name, value in tree.items():
        assert out[name].dtype == value.dtype, name
        assert out[name].tobytes() == value.tobytes(), name


# --------------------------------------------------------------------------- a file as the path


def test_a_file_is_reported_as_a_file_not_as_missing(tmp_path, capsys):
    f = tmp_path / "state.npz"
    f.write_bytes(b"PK\x03\x04 not a checkpoint directory")
    expected = f"no checkpoint at {f}: it is a file, not a checkpoint directory"
    for call in (distckpt.restore, distckpt.metadata, distckpt.verify):
        with pytest.raises(NotCommittedError) as info:
            call(f)
        assert str(info.value).startswith(expected), call
        assert "does not exist" not in str(info.value)
    assert main(["verify", str(f)]) == 1
    assert expected in capsys.readouterr().err
    assert main(["inspect", str(f)]) == 2
    assert expected in capsys.readouterr().err


# --------------------------------------------------------------------------- 64-bit leaves


@pytest.fixture
def saved64(tmp_path):
    tree = {
        "i": np.array([2**40, -3, 2**31], np.int64),
        "small": np.array([1, -2, 3], np.int64),
        "u": np.array([2**63], np.uint64),
        "f": np.array([1 / 3, 1e300], np.float64),
        "g": np.array([1 / 3, 2.5], np.float64),
        "c": np.array([1 / 3 + 1j], np.complex128),
    }
    distckpt.save(tmp_path / "c", tree)
    return tmp_path / "c", tree


def _sds(shape, dtype):
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def test_64bit_leaf_into_a_64bit_jax_target_without_x64_is_refused(saved64):
    path, tree = saved64
    assert not jax.config.jax_enable_x64
    target = {k: _sds(v.shape, v.dtype) for k, v in tree.items()}
    assert target["i"].dtype == np.int64  # the struct keeps the dtype; arrays would not
    with pytest.raises(TreeMismatchError) as info:
        distckpt.restore(path, target)
    assert len(info.value.problems) == len(tree)
    by_leaf = {p.split(":")[0]: p for p in info.value.problems}
    for name, held in (("i", "int32"), ("u", "uint32"), ("f", "float32"), ("c", "complex64")):
        problem = by_leaf[f"['{name}']"]
        saved = str(tree[name].dtype)
        assert f"target dtype {saved} for a jax.Array, checkpoint has {saved}[" in problem
        assert f"jax_enable_x64 is off and JAX would hold it as {held}" in problem
        assert X64_FIX in problem and f"ask for {held} in the target with cast=True" in problem

    # abstract_like keeps numpy leaves on the host: their values come back exactly.
    out = distckpt.restore(path, distckpt.abstract_like(tree))
    for name, value in tree.items():
        assert out[name].dtype == value.dtype and isinstance(out[name], np.ndarray)
        np.testing.assert_array_equal(out[name], value)

    # With x64 on, the same targets restore every value exactly.
    with _x64(True):
        out = distckpt.restore(path, target)
        for name, value in tree.items():
            assert isinstance(out[name], jax.Array) and out[name].dtype == value.dtype
            np.testing.assert_array_equal(np.asarray(out[name]), value)


def test_a_32bit_target_for_a_64bit_leaf_casts_only_values_that_fit(saved64):
    path, tree = saved64
    # What a jax.Array made from the int64 value is without x64: int32, already wrapped.
    assert jnp.asarray(tree["i"]).dtype == jnp.int32
    as_array = {"i": jax.device_put(jnp.zeros(3, jnp.int32), jax.devices()[0])}
    with pytest.raises(TreeMismatchError) as info:
        distckpt.restore(path, as_array, partial=True)
    assert (
        "['i']: target dtype int32, checkpoint has int64[3] (jax_enable_x64 is off: to get "
        f"int64, call {X64_FIX} first; or pass cast=True" in str(info.value)
    )

    # cast=True with values that fit: converted (float64 -> float32 rounds, as a cast does).
    out = distckpt.restore(
        path,
        {"small": _sds((3,), jnp.int32), "g": _sds((2,), jnp.float32)},
        partial=True,
        cast=True,
    )
    np.testing.assert_array_equal(np.asarray(out["small"]), [1, -2, 3])
    assert out["small"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out["g"]), np.float32([1 / 3, 2.5]))

    # cast=True with values that do not fit: refused, naming the leaf and a value.
    cases = [
        (
            "i",
            _sds((3,), jnp.int32),
            "2 of the saved int64 values (e.g. 1099511627776 does not fit int32)",
        ),
        (
            "u",
            np.zeros(1, np.int64),
            "1 of the saved uint64 values (e.g. 9223372036854775808 does not fit int64)",
        ),
        (
            "f",
            _sds((2,), jnp.float32),
            "1 of the saved float64 values (e.g. 1e+300 would become infinite",
        ),
        ("c", np.zeros(1, np.float64), "would lose its imaginary part"),
    ]
    for name, target, expected in cases:
        with pytest.raises(TreeMismatchError) as info:
            distckpt.restore(path, {name: target}, partial=True, cast=True)
        message = str(info.value)
        assert message.startswith(f"['{name}']: cast=True to "), message
        assert expected in message, message
        assert f"Restore into {tree[name].dtype} instead" in message
