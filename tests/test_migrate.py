"""Restoring into a tree whose key paths changed: rename, init, drop, and the error otherwise."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.errors import TreeMismatchError


@pytest.fixture
def old(tmp_path):
    """A checkpoint of the old layout: layer_0, layer_1, a removed 'legacy' leaf."""
    tree = {
        "params": {
            "layer_0": {
                "kernel": np.full((4, 8), 0.0, np.float32),
                "bias": np.zeros(8, np.float32),
            },
            "layer_1": {"kernel": np.full((8, 2), 1.0, np.float32), "bias": np.ones(2, np.float32)},
        },
        "legacy": {"ema": np.arange(3.0)},
        "step": 10,
    }
    distckpt.save(tmp_path / "old", tree)
    return tmp_path / "old", tree


def _new_target(mesh):
    """The new layout: blocks/<i>, a new 'scale' leaf, no 'legacy'."""
    rep = NamedSharding(mesh, P())
    sds = lambda shape: jax.ShapeDtypeStruct(shape, np.float32, sharding=rep)  # noqa: E731
    return {
        "params": {
            "blocks": {
                "0": {"kernel": sds((4, 8)), "bias": sds((8,))},
                "1": {"kernel": sds((8, 2)), "bias": sds((2,))},
            },
            "scale": sds((2,)),
        },
        "step": 0,
    }


def test_an_unmapped_layout_change_lists_every_path_and_suggests_the_mapping(old):
    path, _ = old
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(TreeMismatchError) as info:
        distckpt.restore(path, _new_target(mesh))
    text = str(info.value)
    for p in ["['params']['blocks']['0']['kernel']", "['params']['scale']", "['legacy']['ema']"]:
        assert p in text
    assert '"params/layer_0/kernel": "params/blocks/0/kernel"' in text  # the suggestion
    assert len(info.value.problems) == 4 + 1 + 4 + 1  # 4 new, scale; 4 old, legacy


def test_rename_init_and_drop_restore_the_new_layout(old):
    path, tree = old
    mesh = jax.make_mesh((8,), ("x",))
    scale = jax.device_put(np.full(2, 0.5, np.float32), NamedSharding(mesh, P()))
    got = distckpt.restore(
        path,
        _new_target(mesh),
        rename={r"params/layer_(\d+)/(.*)": r"params/blocks/\1/\2"},
        init={"params": {"scale": scale}},
        drop=[r"legacy/.*"],
    )
    np.testing.assert_array_equal(
        got["params"]["blocks"]["1"]["kernel"], tree["params"]["layer_1"]["kernel"]
    )
    np.testing.assert_array_equal(
        got["params"]["blocks"]["0"]["bias"], tree["params"]["layer_0"]["bias"]
    )
    assert got["params"]["scale"] is scale and got["step"] == 10
    assert got["params"]["blocks"]["0"]["kernel"].sharding.spec == P()
    # A function works as well as patterns; init can be a function too.
    got = distckpt.restore(
        path,
        _new_target(mesh),
        rename=lambda p: p.replace("layer_", "blocks/") if p.startswith("params/") else None,
        init=lambda p: scale if p == "params/scale" else None,
        drop=["legacy/ema"],
    )
    assert got["params"]["scale"] is scale


def test_a_rename_that_merges_two_leaves_is_refused(old):
    path, _ = old
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(TreeMismatchError, match="rename maps both"):
        distckpt.restore(
            path,
            _new_target(mesh),
            rename={r"params/layer_\d+/(.*)": r"params/blocks/0/\1"},
            partial=True,
        )


def test_diff_shows_what_a_mapping_would_do(old, tmp_path, capsys):
    from distckpt.cli import main

    path, tree = old
    new = {
        "params": {"blocks": {str(i): tree["params"][f"layer_{i}"] for i in (0, 1)}},
        "step": 10,
    }
    distckpt.save(tmp_path / "new", new)
    assert main(["diff", str(path), str(tmp_path / "new")]) == 1
    capsys.readouterr()
    args = ["--rename", r"params/layer_(\d+)/(.*)=params/blocks/\1/\2", "--drop", "legacy/.*"]
    assert main(["diff", str(path), str(tmp_path / "new"), "--values", *args]) == 0
    out = capsys.readouterr().out
    assert "params/layer_1/kernel -> params/blocks/1/kernel" in out
    assert "legacy/ema: dropped" in out
    assert "structure: same leaves" in out and "0 different" in out
