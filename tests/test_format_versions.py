"""Every released format version still restores: one small checkpoint per version in tests/data.

A new format version adds a directory tests/data/format_v<N> written by the
release that introduced it (and never rewritten), plus its expected values
here. docs/format.md keeps the changelog of the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import distckpt
from distckpt import _manifest

DATA = Path(__file__).resolve().parent / "data"


def _expected_v1() -> dict:
    return {
        "params": {
            "w": np.arange(64, dtype=np.float32).reshape(8, 8) / 4,
            "b": np.linspace(-1, 1, 5).astype(np.float16),
        },
        "bf16": np.arange(6, dtype=jax.numpy.bfloat16),
        "rng": np.asarray(jax.random.key_data(jax.random.key(7))),
        "step": 42,
        "name": "fixture",
        "none": None,
        "opt": [np.int64(3), [np.arange(3, dtype=np.int32)]],
    }


# v2: the same tree, zstd-compressed; v3: the same tree, chunk records in an index;
# v4: the same tree, saved with a pipeline state whose array is a leaf after it
EXPECTED = {1: _expected_v1, 2: _expected_v1, 3: _expected_v1, 4: _expected_v1}


def test_the_pipeline_state_of_format_4_restores_with_its_array():
    from tests.recorder import Recorder

    back = Recorder()
    distckpt.restore(DATA / "format_v4", pipeline=back)
    assert back.received["position"] == 17
    order = back.received["order"]
    assert isinstance(order, np.ndarray) and order.dtype == np.int64
    np.testing.assert_array_equal(order, np.arange(6)[::-1])


def test_every_format_version_has_a_fixture():
    versions = sorted(int(p.name.removeprefix("format_v")) for p in DATA.glob("format_v*"))
    assert versions == list(range(1, _manifest.FORMAT_VERSION + 1))
    assert sorted(EXPECTED) == versions


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_a_checkpoint_of_each_released_format_restores(version):
    path = DATA / f"format_v{version}"
    doc = json.loads((path / "manifest.json").read_bytes())
    assert doc["format_version"] == version
    distckpt.verify(path)
    got = distckpt.restore(path)
    got["rng"] = jax.random.key_data(got["rng"])
    expected = EXPECTED[version]()
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        if isinstance(b, np.ndarray | np.generic):
            assert np.asarray(a).dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), b)
        else:
            assert a == b
    # Onto a sharded target too.
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    w = distckpt.restore(
        path,
        {"params": {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}},
        partial=True,
    )["params"]["w"]
    np.testing.assert_array_equal(np.asarray(w), expected["params"]["w"])
