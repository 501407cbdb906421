"""Data-pipeline state and the handler API, in one process (tests/test_pipeline_mp.py: several)."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distckpt
from distckpt.errors import CheckpointExistsError, NotCommittedError, TreeMismatchError
from distckpt.pipeline import ShuffledIterator
from tests.recorder import Recorder


def _jitter(indices, rng):
    return indices, rng.integers(0, 1000, size=len(indices))


def _take(it, n):
    return [
        np.asarray(b if not isinstance(b, tuple) else np.concatenate(b))
        for b in itertools.islice(it, n)
    ]


def test_every_kind_of_state_value_comes_back_with_its_type(tmp_path):
    state = {
        "position": 3,
        "ratio": 0.25,
        "name": "shard-7",
        "done": False,
        "nothing": None,
        "raw": b"\x00\xff",
        "shape": (2, 3),
        "empty": (),
        "ids": [1, [2, {"deep": "x"}]],
        7: "an int key",
        "7": "a str key that looks like an int",
        "order": np.arange(5, dtype=np.int16),
        "scalar": np.float32(1.5),
        "weights": jnp.linspace(0, 1, 4),
        "key": jax.random.key(9, impl="rbg"),
        "np_rng": np.random.default_rng(3).bit_generator.state,
    }
    distckpt.save(tmp_path / "c", {"x": np.ones(2)}, pipeline=Recorder(state))
    back = Recorder()
    distckpt.restore(tmp_path / "c", pipeline=back)
    got = back.received
    assert list(got) == list(state)
    assert got[7] == "an int key" and got["7"] == "a str key that looks like an int"
    assert got["shape"] == (2, 3) and got["empty"] == () and got["raw"] == b"\x00\xff"
    assert got["ids"] == [1, [2, {"deep": "x"}]] and got["nothing"] is None
    assert got["order"].dtype == np.int16 and got["order"].tolist() == [0, 1, 2, 3, 4]
    assert type(got["scalar"]) is np.float32 and got["scalar"] == 1.5
    np.testing.assert_array_equal(got["weights"], np.linspace(0, 1, 4, dtype=np.float32))
    assert got["key"].dtype == state["key"].dtype
    np.testing.assert_array_equal(
        jax.random.key_data(got["key"]), jax.random.key_data(state["key"])
    )
    assert got["np_rng"] == state["np_rng"]


def test_state_that_is_not_host_data_is_refused_by_name(tmp_path):
    with pytest.raises(Exception, match=r"state\['bad'\]\[0\].*object"):
        distckpt.save(tmp_path / "c", {}, pipeline=Recorder({"bad": [object()]}))
    with pytest.raises(Exception, match="returned list; it must return a dict"):
        distckpt.save(tmp_path / "d", {}, pipeline=Recorder([1]))
    with pytest.raises(TypeError, match="get_state.*set_state"):
        distckpt.save(tmp_path / "e", {}, pipeline=42)
    assert not os.path.exists(tmp_path / "c" / "manifest.json")


def test_restoring_a_pipeline_from_a_checkpoint_without_one_says_so(tmp_path):
    distckpt.save(tmp_path / "c", {"x": 1})
    with pytest.raises(TreeMismatchError, match="holds no pipeline state"):
        distckpt.restore(tmp_path / "c", pipeline=Recorder())
    with pytest.raises(TypeError, match="get_state.*set_state"):
        distckpt.restore(tmp_path / "c", pipeline="not a pipeline")


@pytest.mark.parametrize("transform_seed", [None, 5])
def test_the_iterator_resumes_the_exact_batch_sequence(tmp_path, transform_seed):
    def make():
        return ShuffledIterator(
            50,
            global_batch_size=8,
            seed=11,
            process_index=0,
            process_count=1,
            transform=_jitter if transform_seed is not None else None,
            transform_seed=transform_seed,
        )

    uninterrupted = _take(make(), 20)  # 6 batches per epoch: crosses 3 epoch boundaries
    it = make()
    first = _take(it, 9)
    with distckpt.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(9, {"step": 9}, pipeline=it)
        _take(it, 4)  # moves on while the save commits: the saved state is step 9's
    resumed = make()
    with distckpt.CheckpointManager(tmp_path) as mgr:
        mgr.restore(9, pipeline=resumed)
    rest = _take(resumed, 11)
    for a, b in zip(first + rest, uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch is a permutation of the examples that fit in whole batches.
    epoch0 = np.concatenate([b[:8] for b in uninterrupted[:6]])
    assert len(set(epoch0.tolist())) == 48


def test_the_iterator_refuses_a_position_from_a_different_configuration(tmp_path):
    it = ShuffledIterator(50, 8, seed=1, process_index=0, process_count=1)
    next(it)
    distckpt.save(tmp_path / "c", {}, pipeline=it)
    other = ShuffledIterator(60, 8, seed=1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="num_examples: saved 50, this iterator has 60"):
        distckpt.restore(tmp_path / "c", {}, partial=True, pipeline=other)


# --------------------------------------------------------------------------- handler API


def test_handler_saves_steps_and_restores_the_latest_or_a_given_one(tmp_path):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jax.device_put(
        jnp.arange(32.0), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    )
    with distckpt.CheckpointHandler() as h:
        for step in (10, 20, 30):
            state = {
                "w": w * step,
                "epoch": step // 10,
                "tag": f"s{step}",
                "key": jax.random.key(step),
            }
            h.save(tmp_path, state, step=step, metadata={"note": step})
        assert h.get_checkpoint_steps(tmp_path) == [10, 20, 30]
        assert h.latest_step(tmp_path) == 30
        latest = h.restore(tmp_path, state)
        assert latest["epoch"] == 3 and latest["tag"] == "s30"
        assert latest["w"].sharding.spec == state["w"].sharding.spec
        np.testing.assert_array_equal(latest["w"], np.arange(32.0) * 30)
        older = h.restore(tmp_path, step=10)  # no target: host values
        assert isinstance(older["w"], np.ndarray) and older["tag"] == "s10"
        np.testing.assert_array_equal(
            jax.random.key_data(older["key"]), jax.random.key_data(jax.random.key(10))
        )
        infos = h.list_checkpoints(tmp_path)
        assert [i.step for i in infos] == [10, 20, 30]
        assert infos[0].user_metadata == {"note": 10}


def test_handler_never_falls_back_to_another_step(tmp_path):
    with distckpt.CheckpointHandler() as h:
        h.save(tmp_path, {"v": 1}, step=1)
        h.save(tmp_path, {"v": 2}, step=2)
        with pytest.raises(NotCommittedError, match=r"step 5 is not.*\[1, 2\].*no other step"):
            h.restore(tmp_path, step=5)
        with pytest.raises(NotCommittedError, match="no committed checkpoints"):
            h.restore(tmp_path / "empty")


def test_handler_keep_prunes_only_after_the_new_step_commits(tmp_path):
    with distckpt.CheckpointHandler() as h:
        for step in range(1, 6):
            h.save(tmp_path, {"v": np.full(3, step)}, step=step, keep=2)
        assert h.get_checkpoint_steps(tmp_path) == [4, 5]
        # A save that fails leaves the kept steps alone.
        with pytest.raises(TypeError):
            h.save(tmp_path, {"v": object()}, step=6, keep=1)
        assert h.get_checkpoint_steps(tmp_path) == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]


def test_handler_overwrite_and_dict_key_types(tmp_path):
    with distckpt.CheckpointHandler() as h:
        h.save(tmp_path, {"names": {"1": "str key"}, "ids": {2: "int key"}}, step=1)
        with pytest.raises(CheckpointExistsError, match="already committed"):
            h.save(tmp_path, {"names": {"1": "x"}, "ids": {2: "x"}}, step=1)
        h.save(tmp_path, {"names": {"1": "new"}, "ids": {2: "new"}}, step=1, overwrite=True)
        got = h.restore(tmp_path, step=1)
    assert got == {"names": {"1": "new"}, "ids": {2: "new"}}  # "1" stays a str, 2 an int


def test_handler_without_a_step_and_the_newer_spelling(tmp_path):
    with distckpt.CheckpointHandler() as h:
        h.save_to_directory(tmp_path / "one", {"v": np.arange(3)})
        np.testing.assert_array_equal(h.restore(tmp_path / "one")["v"], np.arange(3))
        with pytest.raises(ValueError, match="keep= needs step="):
            h.save(tmp_path / "two", {"v": 1}, keep=3)


def test_handler_with_a_checkpointable_target_calls_set_state(tmp_path):
    it = ShuffledIterator(40, 4, seed=2, process_index=0, process_count=1)
    _take(it, 3)
    with distckpt.CheckpointHandler(async_checkpointing=True) as h:
        h.save(tmp_path, it, step=3)
        expected = _take(it, 2)
        fresh = ShuffledIterator(40, 4, seed=2, process_index=0, process_count=1)
        assert h.restore(tmp_path, fresh) is fresh
    for a, b in zip(_take(fresh, 2), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pipeline_checkpoint_save_and_restore_latest(tmp_path):
    ckpt = distckpt.PipelineCheckpoint(tmp_path)
    it = ShuffledIterator(30, 3, seed=4, process_index=0, process_count=1)
    assert ckpt.restore_latest(it) is None  # a fresh start: nothing to restore
    for step in range(1, 8):
        next(it)
        if step % 2 == 0:
            ckpt.save(it, step=step, metadata={"epoch": it.epoch}, keep=2)
    assert ckpt.steps() == [4, 6]
    fresh = ShuffledIterator(30, 3, seed=4, process_index=0, process_count=1)
    assert ckpt.restore_latest(fresh) == 6
    assert fresh.batch == 6
    ckpt.restore(fresh, step=4)
    assert fresh.batch == 4
    with pytest.raises(NotCommittedError, match="step 2 is not"):
        ckpt.restore(fresh, step=2)
    ckpt.close()
