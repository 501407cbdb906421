"""``save(..., pipeline=)``: the state's arrays are data (checksummed, after the tree's
leaves), only the rest is in the commit record; types come back; identities are checked;
checkpoints whose state was all JSON still restore."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distckpt
from distckpt.errors import CorruptCheckpointError, DistckptError, TreeMismatchError
from tests.mp import case_value, run_processes
from tests.recorder import GlobalRecorder, Recorder

DATA = Path(__file__).resolve().parent / "data"
HERE = "tests.test_pipeline_data"


def _state() -> dict:
    return {
        "position": 3,
        "name": "shard-7",
        "big": np.arange(100 * 100, dtype=np.float32).reshape(100, 100),
        "order": np.arange(5, dtype=np.int64),
        "weights": jnp.linspace(0, 1, 4),
        "key": jax.random.key(9, impl="rbg"),
        "nested": [{"mask": np.array([True, False])}, (np.int32(7), "x")],
        "zero_d": np.array(2.5),
    }


def _check_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    assert got["position"] == 3 and got["name"] == "shard-7"
    for k in ("big", "order", "zero_d"):
        assert type(got[k]) is np.ndarray, k
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])
    assert isinstance(got["weights"], jax.Array) and got["weights"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got["weights"]), np.asarray(want["weights"]))
    assert isinstance(got["key"], jax.Array) and got["key"].dtype == want["key"].dtype
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(want["key"]))
    mask = got["nested"][0]["mask"]
    assert type(mask) is np.ndarray and mask.tolist() == [True, False]
    assert got["nested"][1] == (np.int32(7), "x") and type(got["nested"][1][0]) is np.int32


def _manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_bytes())


@pytest.mark.parametrize("cls", [Recorder, GlobalRecorder])
def test_the_state_arrays_are_data_and_come_back_as_their_types(tmp_path, cls):
    tree = {"w": np.arange(3.0), "step": 4}
    distckpt.save(tmp_path / "c", tree, pipeline=cls(_state()))
    doc = _manifest(tmp_path / "c")
    # Only the small rest is in the record: the 40 kB array is in the data files.
    assert len(json.dumps(doc["process_state"])) < 3000
    assert doc["process_state"]["arrays"] == 6
    assert doc["process_state"]["mode"] == ("global" if cls is GlobalRecorder else "per-process")
    paths = [tuple(k for _, k in leaf["path"]) for leaf in doc["leaves"]]
    assert sorted(paths[:2]) == [("step",), ("w",)]
    assert paths[2:] == [("__pipeline_state__", i) for i in range(6)]
    distckpt.verify(tmp_path / "c")
    info = distckpt.metadata(tmp_path / "c")
    assert sorted(info.tree) == ["step", "w"]  # the tree; the state's arrays are listed apart
    assert "['__pipeline_state__'][0]" in info.leaves

    back = cls()
    got = distckpt.restore(tmp_path / "c", pipeline=back)
    assert list(got) == ["w", "step"] and got["step"] == 4  # the tree alone
    np.testing.assert_array_equal(got["w"], tree["w"])
    _check_state(back.received, _state())
    # With a target (partial=False): the state's leaves are not the tree's.
    got = distckpt.restore(tmp_path / "c", {"w": np.empty(3), "step": 0})
    assert got["step"] == 4
    # Without pipeline= the state is left alone, and the tree is the tree.
    assert list(distckpt.restore(tmp_path / "c")) == ["w", "step"]


def test_a_damaged_state_array_is_caught_by_its_checksum(tmp_path):
    distckpt.save(tmp_path / "c", {}, pipeline=Recorder({"a": np.arange(64, dtype=np.int32)}))
    (data,) = (tmp_path / "c").glob("attempt-*/*.bin")
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    back = Recorder()
    with pytest.raises(
        CorruptCheckpointError, match=r"\['__pipeline_state__'\]\[0\]: chunk .* fails its crc32c"
    ):
        distckpt.restore(tmp_path / "c", pipeline=back)
    assert back.received is None  # nothing wrong is given


def test_a_state_without_arrays_is_all_in_the_record(tmp_path):
    distckpt.save(tmp_path / "c", {"x": 1}, pipeline=Recorder({"position": 9}))
    doc = _manifest(tmp_path / "c")
    assert "arrays" not in doc["process_state"] and len(doc["leaves"]) == 1
    back = Recorder()
    assert distckpt.restore(tmp_path / "c", pipeline=back) == {"x": 1}
    assert back.received == {"position": 9}


def test_a_checkpoint_whose_state_was_json_still_restores():
    """tests/data/pipeline_json was saved by the code that kept the whole state as
    JSON in the record (arrays base64, a jax.Array given back as numpy)."""
    path = DATA / "pipeline_json"
    assert "arrays" not in _manifest(path)["process_state"]
    back = Recorder({"data_source_repr": "Range(10)"})
    tree = distckpt.restore(path, pipeline=back)
    assert tree["step"] == 7 and tree["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    got = back.received
    assert list(got) == [
        "epoch",
        "position",
        "data_source_repr",
        "shard_count",
        "order",
        "weights",
        "pair",
    ]
    assert (got["epoch"], got["position"], got["shard_count"]) == (2, 17, 1)
    assert got["order"].dtype == np.int64 and got["order"].tolist() == [0, 1, 2, 3, 4]
    assert type(got["weights"]) is np.ndarray and got["weights"].tolist() == [0.5, 1.5]
    assert got["pair"] == (3, "x")
    # The identity check reads the old form too.
    other = Recorder({"data_source_repr": "Range(11)"})
    with pytest.raises(
        TreeMismatchError, match=r"data_source_repr: the checkpoint has 'Range\(10\)'"
    ):
        distckpt.restore(path, pipeline=other)
    assert other.received is None


def test_restore_refuses_a_state_recorded_for_other_data_unless_forced(tmp_path):
    saved = {"sampler_repr": "Seq(10)", "shard_count": 2, "position": 4, "a": np.arange(3)}
    distckpt.save(tmp_path / "c", {"w": np.ones(2)}, pipeline=Recorder(saved))
    same = Recorder({"sampler_repr": "Seq(10)", "shard_count": 2, "position": 0})
    distckpt.restore(tmp_path / "c", pipeline=same)
    assert same.received["position"] == 4 and same.received["a"].tolist() == [0, 1, 2]

    other = Recorder({"sampler_repr": "Seq(12)", "shard_count": 4, "position": 0})
    with pytest.raises(ValueError) as e:  # a TreeMismatchError, also a ValueError
        distckpt.restore(tmp_path / "c", pipeline=other)
    assert isinstance(e.value, TreeMismatchError)
    text = str(e.value)
    assert "sampler_repr: the checkpoint has 'Seq(10)', this iterator has 'Seq(12)'" in text
    assert "shard_count: the checkpoint has 2, this iterator has 4" in text
    assert "force_pipeline=True" in text
    assert other.received is None
    distckpt.restore(tmp_path / "c", pipeline=other, force_pipeline=True)
    assert other.received["sampler_repr"] == "Seq(10)" and other.received["a"].tolist() == [0, 1, 2]


def test_the_manager_saves_state_as_data_and_checks_identities(tmp_path):
    state = {"data_source_repr": "Range(8)", "position": 5, "order": jnp.arange(4)}
    with distckpt.CheckpointManager(tmp_path, timeout_s=30) as mgr:
        mgr.save(1, {"w": np.ones(2)}, pipeline=Recorder(state))
        mgr.wait_until_finished()
        assert _manifest(mgr.path(1))["process_state"]["arrays"] == 1
        back = Recorder({"data_source_repr": "Range(8)"})
        mgr.restore(target={"w": np.empty(2)}, pipeline=back)
        assert back.received["position"] == 5
        assert isinstance(back.received["order"], jax.Array)
        assert back.received["order"].tolist() == [0, 1, 2, 3]
        other = Recorder({"data_source_repr": "Range(9)"})
        with pytest.raises(TreeMismatchError, match="data_source_repr"):
            mgr.restore(1, pipeline=other)
        assert other.received is None
        mgr.restore(1, pipeline=other, force_pipeline=True)
        assert other.received["position"] == 5


def test_a_tree_key_that_takes_the_state_arrays_place_is_refused(tmp_path):
    with pytest.raises(TypeError, match="same key path"):
        distckpt.save(
            tmp_path / "c",
            {"__pipeline_state__": [np.zeros(1)]},
            pipeline=Recorder({"a": np.ones(1)}),
        )


# --------------------------------------------------------------------------- two processes


def _w_per_process(directory: str, force: bool) -> dict:
    p = jax.process_index()
    state = {
        "shard_index": p,
        "data_source_repr": "Range(100)",
        "order": np.arange(4, dtype=np.int64) + 10 * p,
        "weights": jnp.full((2,), float(p)),
    }
    distckpt.save(directory, {"w": np.arange(2.0)}, pipeline=Recorder(state))
    back = Recorder({"data_source_repr": "Range(100)" if p == 0 or force else "Range(99)"})
    try:
        distckpt.restore(directory, pipeline=back, force_pipeline=force)
    except DistckptError as e:
        return {"error": type(e).__name__, "text": str(e), "received": back.received}
    got = back.received
    return {
        "shard_index": got["shard_index"],
        "order": got["order"].tolist(),
        "order_dtype": str(got["order"].dtype),
        "weights": np.asarray(got["weights"]).tolist(),
        "weights_is_jax": isinstance(got["weights"], jax.Array),
    }


@pytest.mark.multiprocess
def test_each_process_gets_its_own_arrays_back_and_a_mismatch_fails_everywhere(tmp_path):
    # Both cases, one after the other in one job (tests/mp.py:each_case).
    cases = {
        "forced": [f"{HERE}:_w_per_process", {"directory": str(tmp_path / "a"), "force": True}],
        "checked": [f"{HERE}:_w_per_process", {"directory": str(tmp_path / "b"), "force": False}],
    }
    jobs = run_processes("tests.mp:each_case", args={"cases": cases})
    for p, r in enumerate(jobs):
        assert case_value(r, "forced") == {
            "shard_index": p,
            "order": [10 * p + i for i in range(4)],
            "order_dtype": "int64",
            "weights": [float(p)] * 2,
            "weights_is_jax": True,
        }
    # Process 1's iterator walks other data: no process gets a state.
    for value in (case_value(r, "checked") for r in jobs):
        assert value["received"] is None
        assert value["error"] == "TreeMismatchError"
        assert "failed in phase 'restore' on process(es) [1]" in value["text"]
        assert (
            "data_source_repr: the checkpoint has 'Range(100)', this iterator has 'Range(99)'"
            in (value["text"])
        )


def _w_local_tier(tmp: str) -> dict:
    import os

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    p = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    w = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("x")))
    kwargs = {
        "save_interval_steps": 10,
        "local_directory": f"{tmp}/local{p}",
        "local_save_interval_steps": 1,
        "timeout_s": 30,
    }
    saved = {"data_source_repr": "A", "position": 10 + p, "order": np.arange(3) + 10 * p}
    with distckpt.CheckpointManager(f"{tmp}/persistent", **kwargs) as mgr:
        mgr.save(1, {"w": w}, pipeline=Recorder(saved))
    out = {}
    for force in (False, True):
        back = Recorder({"data_source_repr": "A" if p == 0 else "B"})
        with distckpt.CheckpointManager(f"{tmp}/persistent", **kwargs) as mgr:
            try:
                mgr.restore(
                    None,
                    {"w": jax.ShapeDtypeStruct((8,), w.dtype, sharding=w.sharding)},
                    pipeline=back,
                    force_pipeline=force,
                )
                got = dict(back.received)
                got["order"] = [type(got["order"]).__name__, str(got["order"].dtype)] + got[
                    "order"
                ].tolist()
                out[str(force)] = {"tier": mgr.last_restore_stats.tier, "got": got}
            except TreeMismatchError as e:
                out[str(force)] = {"error": str(e), "got": back.received}
    # Local saves the processes disagree about are refused on every process, keeping nothing.
    refused = {
        "ragged": Recorder({"order": np.arange(3 + p)}),
        "global": GlobalRecorder({"position": 7, "order": np.arange(3) + p}),
    }
    with distckpt.CheckpointManager(f"{tmp}/persistent", **kwargs) as mgr:
        for step, (name, pipeline) in enumerate(refused.items(), start=2):
            try:
                mgr.save(step, {"w": w}, pipeline=pipeline)
                out[name] = "saved"
            except TreeMismatchError as e:
                out[name] = str(e)
    out["steps"] = sorted(os.listdir(f"{tmp}/local{p}"))
    return out


@pytest.mark.multiprocess
def test_a_local_tier_restore_checks_identities_on_every_process(tmp_path):
    results = run_processes(
        f"{HERE}:_w_local_tier",
        args={"tmp": str(tmp_path)},
        per_process_env={p: {"DISTCKPT_HOST": f"host{p}"} for p in range(2)},
    )
    for p, r in enumerate(results):
        refused = r.value["False"]
        assert refused["got"] is None
        assert "failed in phase 'pipeline' on process(es) [1]" in refused["error"]
        assert "data_source_repr: the checkpoint has 'A', this iterator has 'B'" in refused["error"]
        assert r.value["True"] == {
            "tier": "local",
            "got": {
                "data_source_repr": "A",
                "position": 10 + p,
                "order": ["ndarray", "int64", 10 * p, 10 * p + 1, 10 * p + 2],
            },
        }
        assert "processes [1] passed a tree whose" in r.value["ragged"], r.value["ragged"]
        assert f"This process ({p}) has:\n  state['order']: int64 [{3 + p}]" in r.value["ragged"]
        assert "differs on processes [1]" in r.value["global"], r.value["global"]
        assert [s for s in r.value["steps"] if s.startswith("step_")] == ["step_1"]


def test_a_checkpointable_the_handler_saved_before_restores_through_both_apis():
    """tests/data/handler_state was saved by CheckpointHandler().save(dir, obj) when the
    handler kept the arrays in a tree of their own ({"checkpointable_arrays": [...]})."""
    path = DATA / "handler_state"
    doc = _manifest(path)
    assert "arrays" not in doc["process_state"]
    assert [leaf["path"][0] for leaf in doc["leaves"]] == [["key", "checkpointable_arrays"]] * 3

    def check(got):
        assert list(got) == ["position", "data_source_repr", "order", "weights", "key"]
        assert got["position"] == 3 and got["data_source_repr"] == "Range(4)"
        assert type(got["order"]) is np.ndarray and got["order"].dtype == np.int64
        assert got["order"].tolist() == [0, 1, 2]
        assert isinstance(got["weights"], jax.Array) and got["weights"].tolist() == [1.5, 2.5]
        np.testing.assert_array_equal(
            jax.random.key_data(got["key"]), jax.random.key_data(jax.random.key(1))
        )

    check(distckpt.CheckpointHandler().restore(path))
    back = Recorder({"data_source_repr": "Range(4)"})
    assert distckpt.restore(path, pipeline=back) == {}  # the tree: the state's arrays only
    check(back.received)
    with pytest.raises(TreeMismatchError, match="data_source_repr"):
        distckpt.restore(path, pipeline=Recorder({"data_source_repr": "Range(5)"}))


def test_the_handler_saves_a_checkpointable_as_save_pipeline_does(tmp_path):
    state = {"position": 1, "order": jnp.arange(3)}
    distckpt.CheckpointHandler().save(tmp_path / "c", Recorder(state))
    doc = _manifest(tmp_path / "c")
    assert doc["process_state"]["arrays"] == 1
    assert [leaf["path"] for leaf in doc["leaves"]] == [[["key", "__pipeline_state__"], ["idx", 0]]]
    got = distckpt.CheckpointHandler().restore(tmp_path / "c")
    assert got["position"] == 1 and isinstance(got["order"], jax.Array)
    assert got["order"].tolist() == [0, 1, 2]
