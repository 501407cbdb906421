"""zstd compression: every dtype round-trips, resharding works, damage is caught, copy re-encodes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _knobs
from distckpt.errors import CorruptCheckpointError

DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.int4,
]


def _values(dtype, shape):
    rng = np.random.default_rng(0)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.dtype(dtype).kind in "iu" or dtype is ml_dtypes.int4:
        return rng.integers(0, 7, shape).astype(dtype)
    return (rng.standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_compressed(tmp_path, dtype):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    host = _values(dtype, (16, 24))
    tree = {
        "sharded": jax.device_put(host, NamedSharding(mesh, P("x", "y"))),
        "host": host[:3],
        "key": jax.random.key(1),
    }
    with _knobs.override(chunk_bytes=64):  # many chunks, some of one element
        distckpt.save(tmp_path / "c", tree, compression="zstd", compression_level=1)
    doc = json.loads((tmp_path / "c" / "manifest.json").read_bytes())
    assert doc["format_version"] == 3  # compression needs 2, chunk indexes 3
    assert {e.get("compression") for e in doc["leaves"]} == {"zstd"}
    other = NamedSharding(jax.make_mesh((8,), ("z",)), P(None, "z"))
    got = distckpt.restore(
        tmp_path / "c",
        {
            "sharded": jax.ShapeDtypeStruct((16, 24), tree["sharded"].dtype, sharding=other),
            "host": np.zeros((3, 24), host.dtype),
            "key": distckpt.abstract_like(tree["key"]),
        },
    )
    np.testing.assert_array_equal(np.asarray(got["sharded"]), np.asarray(tree["sharded"]))
    np.testing.assert_array_equal(got["host"], host[:3])
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(tree["key"]))
    distckpt.verify(tmp_path / "c")


def test_compression_shrinks_what_compresses_and_damage_is_caught(tmp_path):
    tree = {"zeros": np.zeros((256, 256), np.float32), "noise": np.random.rand(256, 256)}
    distckpt.save(tmp_path / "raw", tree)
    distckpt.save(tmp_path / "z", tree, compression="zstd")
    raw, z = distckpt.metadata(tmp_path / "raw"), distckpt.metadata(tmp_path / "z")
    assert z.total_bytes < raw.total_bytes * 0.95
    assert json.loads((tmp_path / "raw" / "manifest.json").read_bytes())["format_version"] == 3
    data = next((tmp_path / "z").glob("attempt-*/*.bin"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    data.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match="fails its crc32c"):
        distckpt.restore(tmp_path / "z")
    with pytest.raises(CorruptCheckpointError, match="fails its crc32c"):
        distckpt.verify(tmp_path / "z")


def test_copy_re_encodes_both_ways(tmp_path):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    w = jax.device_put(jnp.tile(jnp.arange(64.0), (32, 1)), NamedSharding(mesh, P("x", "y")))
    distckpt.save(tmp_path / "raw", {"w": w, "step": 3})
    packed = distckpt.copy(
        tmp_path / "raw", tmp_path / "z", compression="zstd", compression_level=9
    )
    assert packed.bytes < distckpt.metadata(tmp_path / "raw").total_bytes / 2
    distckpt.verify(tmp_path / "z")
    distckpt.copy(tmp_path / "z", tmp_path / "back", compression=None)
    back = json.loads((tmp_path / "back" / "manifest.json").read_bytes())
    assert back["format_version"] == 3 and all("compression" not in e for e in back["leaves"])
    for path in ("z", "back"):
        got = distckpt.restore(tmp_path / path)
        np.testing.assert_array_equal(got["w"], np.asarray(w))
        assert got["step"] == 3
    assert distckpt.copy(tmp_path / "z", tmp_path / "same").bytes == packed.bytes  # "keep"
    from distckpt.cli import main

    assert (
        main(["copy", str(tmp_path / "raw"), str(tmp_path / "cli"), "--compression", "zstd"]) == 0
    )
    doc = json.loads((tmp_path / "cli" / "manifest.json").read_bytes())
    assert doc["format_version"] == 3 and {e.get("compression") for e in doc["leaves"]} >= {"zstd"}


def test_manager_saves_compressed(tmp_path):
    with distckpt.CheckpointManager(tmp_path, async_save=True, compression="zstd") as mgr:
        for step in (1, 2):
            mgr.save(step, {"v": np.zeros(4096, np.float32) + step})
    assert distckpt.metadata(mgr.path(2)).total_bytes < 4096
    assert distckpt.restore(mgr.path(2))["v"][0] == 2.0
    with pytest.raises(ValueError, match="compression must be None or one of"):
        distckpt.save(tmp_path / "x", {"v": np.zeros(2)}, compression="lz4")
