"""``distckpt.compat.datarax``: datarax's documented examples, run as datarax users wrote them.

The strings ``GUIDE_*``, ``OVERVIEW_*`` and ``QUICKREF_*`` below are the
examples of datarax's checkpoint documentation, copied verbatim: they are
the compatibility spec. ``run_example`` changes only their imports
(``datarax.checkpoint`` / ``datarax.typing`` -> ``distckpt.compat.datarax``)
and, where a page writes to an absolute path (``/checkpoints``), that path
(to the test's directory); relative paths (``./checkpoints``) run in the
test's directory. Examples that need datarax itself (its sources, modules)
are not here (docs/training_state.md says how they were checked). Then one
test per gap the switch exposed (issue 17), checkpoints written the way
datarax writes them (Orbax ``ckpt-<step>`` directories) read back, and
checkpoints datarax 0.1.0 and 0.1.4 themselves wrote (tests/data/datarax_written)
restored as datarax restored them. tests/test_compat_datarax_mp.py runs the examples
on several processes.
"""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distckpt
from distckpt import errors
from distckpt.compat import datarax as compat
from tests.recorder import GlobalRecorder, Recorder

# --------------------------------------------------------------------------- the examples, verbatim

OVERVIEW_QUICK_START = """
from datarax.checkpoint import OrbaxCheckpointHandler

# Save and restore with context manager
with OrbaxCheckpointHandler() as handler:
    # Save versioned checkpoint
    handler.save("/checkpoints", pipeline, step=1000)

    # Restore latest
    handler.restore("/checkpoints", pipeline)
"""

OVERVIEW_TRAINING_LOOP = """
handler = OrbaxCheckpointHandler()

for step, batch in enumerate(pipeline):
    loss = train_step(batch)

    # Save every 1000 steps
    if step % 1000 == 0:
        handler.save("/checkpoints", pipeline, step=step, keep=5)

# Cleanup
handler.close()
"""

OVERVIEW_MANAGEMENT = """
# List all checkpoints
steps = handler.get_checkpoint_steps("/checkpoints")
# [1000, 2000, 3000, 4000, 5000]

# Get latest step
latest = handler.latest_step("/checkpoints")
# 5000

# Restore specific step
handler.restore("/checkpoints", pipeline, step=3000)
"""

GUIDE_CORE = """
from datarax.checkpoint import OrbaxCheckpointHandler

# Create handler
handler = OrbaxCheckpointHandler()

# Use as context manager for automatic cleanup
with OrbaxCheckpointHandler() as handler:
    handler.save("./checkpoints", state, step=1)
    restored = handler.restore("./checkpoints")
"""

GUIDE_SAVING = """
from datarax.checkpoint import OrbaxCheckpointHandler
import jax.numpy as jnp

# Create handler
handler = OrbaxCheckpointHandler()

# State to checkpoint (dict or Checkpointable object)
state = {
    "model_weights": jnp.ones((10, 10)),
    "position": 42,
    "epoch": 5,
}

# Save checkpoint
handler.save(
    directory="./checkpoints",
    target=state,
    step=100,      # Optional step number
    keep=5,        # Keep last 5 checkpoints
    overwrite=False,
    metadata={"description": "Training checkpoint"},
)

# Don't forget to close when done
handler.close()
"""

GUIDE_RESTORING = """
from datarax.checkpoint import OrbaxCheckpointHandler

with OrbaxCheckpointHandler() as handler:
    # Restore latest checkpoint
    state = handler.restore("./checkpoints")

    # Restore specific step
    state = handler.restore("./checkpoints", step=50)

    # List available checkpoints
    steps = handler.get_checkpoint_steps("./checkpoints")
    print(f"Available steps: {steps}")

    # Get latest step number
    latest = handler.latest_step("./checkpoints")
    print(f"Latest step: {latest}")
"""

GUIDE_PRNG = """
import jax

# PRNGKeys are automatically serialized/deserialized
state = {
    "rng_key": jax.random.key(42),
    "split_keys": jax.random.split(jax.random.key(0), 4),
}

with OrbaxCheckpointHandler() as handler:
    handler.save("./checkpoints", state, step=1)
    restored = handler.restore("./checkpoints")

# Keys are properly restored
print(type(restored["rng_key"]))  # jax.Array (key type)
"""

GUIDE_MULTIPLE = """
with OrbaxCheckpointHandler() as handler:
    # Save multiple checkpoints with keep=N
    for step in range(100):
        if step % 10 == 0:
            handler.save(
                "./checkpoints",
                {"step": step},
                step=step,
                keep=5,  # Only keep last 5 checkpoints
            )

    # List all available checkpoints
    checkpoints = handler.list_checkpoints("./checkpoints")
    print(f"Checkpoints: {checkpoints}")
"""

GUIDE_OVERWRITE = """
with OrbaxCheckpointHandler() as handler:
    # First save
    handler.save("./checkpoints", {"v": 1}, step=1)

    # Overwrite existing checkpoint
    handler.save("./checkpoints", {"v": 2}, step=1, overwrite=True)
"""

GUIDE_ERRORS = """
from datarax.checkpoint import OrbaxCheckpointHandler
from pathlib import Path

with OrbaxCheckpointHandler() as handler:
    checkpoint_dir = Path("./checkpoints")

    # Check if checkpoints exist
    if checkpoint_dir.exists():
        steps = handler.get_checkpoint_steps(checkpoint_dir)
        if steps:
            state = handler.restore(checkpoint_dir)
            print(f"Restored from step {handler.latest_step(checkpoint_dir)}")
        else:
            print("No checkpoints found")
    else:
        print("Checkpoint directory doesn't exist")
"""

QUICKREF_PIPELINE = """
from datarax.typing import CheckpointableIterator

class SimplePipeline(CheckpointableIterator[dict[str, jax.Array]]):
    def __init__(self, data, batch_size=10, seed=42):
        self.data = data
        self.batch_size = batch_size
        self.rng = jax.random.key(seed)
        self.epoch = 0
        self.position = 0

    def get_state(self) -> dict:
        return {
            "rng": jax.random.key_data(self.rng),
            "epoch": self.epoch,
            "position": self.position,
        }

    def set_state(self, state: dict) -> None:
        self.rng = jax.random.wrap_key_data(state["rng"])
        self.epoch = state["epoch"]
        self.position = state["position"]
"""

QUICKREF_SETUP = """
from datarax.checkpoint import PipelineCheckpoint

checkpoint_dir = "/path/to/checkpoints"
checkpointer = PipelineCheckpoint(checkpoint_dir)
print(f"Checkpoint directory: {checkpoint_dir}")
"""

QUICKREF_SAVE = """
step = 0
for epoch in range(2):
    for batch in pipeline:
        step += 1
        # Process batch...

        if step % 100 == 0:  # Save every 100 steps
            checkpointer.save(
                pipeline,
                step=step,
                metadata={"epoch": epoch},
                keep=3,  # Keep last 3 checkpoints
            )
            print(f"Saved checkpoint at step {step}")
"""

QUICKREF_RESTORE = """
# Create new pipeline (simulating restart)
new_pipeline = SimplePipeline(data)
print(f"Before restore: position={new_pipeline.position}")

# Restore from latest checkpoint
checkpointer.restore_latest(new_pipeline)
print(f"After restore: position={new_pipeline.position}")

# Continue processing
for batch in new_pipeline:
    # Processing continues from saved position
    pass
"""

ABSOLUTE_PATHS = ("/checkpoints", "/path/to/checkpoints")


def run_example(example: str, namespace: dict, directory: str) -> dict:
    """Runs a documentation example with its datarax imports pointed at distckpt.compat.datarax
    and its absolute checkpoint path at ``directory``; returns its namespace."""
    code = textwrap.dedent(example)
    for module in ("datarax.checkpoint", "datarax.typing"):
        code = code.replace(f"from {module} import", "from distckpt.compat.datarax import")
    for path in ABSOLUTE_PATHS:
        code = code.replace(f'"{path}"', json.dumps(directory))
    assert "datarax." not in code.replace("distckpt.compat.datarax", "")
    exec(compile(code, "<datarax example>", "exec"), namespace)
    return namespace


def pipeline_class(namespace: dict) -> type:
    """The quickref's ``SimplePipeline`` (its state methods, verbatim) made iterable.

    The page shows only the state methods; iterating epochs of batches is
    added here so the page's loops run: an epoch ends with StopIteration and
    the next ``for`` starts the next epoch.
    """
    run_example(QUICKREF_PIPELINE, namespace, "")
    base = namespace["SimplePipeline"]

    class Iterating(base):  # type: ignore[misc, valid-type]
        def __iter__(self):
            return self

        def __next__(self):
            if self.position >= len(self.data):
                self.epoch, self.position = self.epoch + 1, 0
                raise StopIteration
            batch = self.data[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            return batch

    Iterating.__name__ = "SimplePipeline"
    namespace["SimplePipeline"] = Iterating
    return Iterating


def _train_step(batch):
    return float(np.sum(batch))


# --------------------------------------------------------------------------- the examples run


def test_quickref_pipeline_checkpoint_saves_keeps_three_and_restores_the_latest(tmp_path, capsys):
    ns = {"jax": jax}
    simple = pipeline_class(ns)
    ns["data"] = np.arange(1500, dtype=np.float32)  # 150 batches an epoch: saves at 100..300
    ns["pipeline"] = pipeline = simple(ns["data"], seed=7)
    directory = str(tmp_path / "ckpt")
    run_example(QUICKREF_SETUP, ns, directory)
    run_example(QUICKREF_SAVE, ns, directory)
    assert capsys.readouterr().out.splitlines()[-3:] == [
        f"Saved checkpoint at step {s}" for s in (100, 200, 300)
    ]
    checkpointer = ns["checkpointer"]
    assert sorted(checkpointer.list_checkpoints()) == [100, 200, 300]  # keep=3
    # Step 300 is the last batch of the second epoch: position 1500, epoch 1.
    saved_rng = np.asarray(jax.random.key_data(pipeline.rng))
    run_example(QUICKREF_RESTORE, ns, directory)
    out = capsys.readouterr().out.splitlines()
    assert out == ["Before restore: position=0", "After restore: position=1500"]
    new = ns["new_pipeline"]
    assert new.epoch == 2  # 1 restored, and the page's loop ended that epoch
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(new.rng)), saved_rng)
    assert checkpointer.handler.restore(directory, metadata_only=True) == {"epoch": 1}


def test_overview_examples_save_restore_and_list(tmp_path):
    ns = {"jax": jax}
    simple = pipeline_class(ns)
    directory = str(tmp_path / "ckpt")
    pipeline = simple(np.arange(30, dtype=np.float32), seed=1)
    next(pipeline)
    ns["pipeline"] = pipeline
    run_example(OVERVIEW_QUICK_START, ns, str(tmp_path / "quick"))
    assert pipeline.position == 10

    ns["pipeline"] = looping = simple(np.arange(20010, dtype=np.float32), seed=2)
    ns["train_step"] = _train_step
    run_example(OVERVIEW_TRAINING_LOOP, ns, directory)
    handler = compat.OrbaxCheckpointHandler()
    assert handler.get_checkpoint_steps(directory) == [0, 1000, 2000]
    restored = simple(np.arange(20010, dtype=np.float32), seed=5)
    handler.restore(directory, restored, step=1000)
    assert restored.position == 10010 and restored.epoch == 0
    assert looping.position == 0 and looping.epoch == 1  # the loop ran the epoch out

    for step in (3000, 4000, 5000):
        handler.save(directory, restored, step=step, keep=5)
    ns["handler"], ns["pipeline"] = handler, simple(np.arange(3, dtype=np.float32))
    run_example(OVERVIEW_MANAGEMENT, ns, directory)
    assert ns["steps"] == [1000, 2000, 3000, 4000, 5000]
    assert ns["latest"] == 5000
    assert ns["pipeline"].position == 10010
    handler.close()


def test_guide_examples_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"state": {"position": 3, "epoch": 1}}
    run_example(GUIDE_CORE, ns, "")
    assert ns["restored"] == {"position": 3, "epoch": 1}
    handler = compat.OrbaxCheckpointHandler()
    # The restoring example asks for step 50; saved here (steps must increase in distckpt).
    handler.save("./checkpoints", {"position": 50}, step=50, keep=None)

    run_example(GUIDE_SAVING, ns, "")
    assert handler.get_checkpoint_steps("./checkpoints") == [1, 50, 100]  # keep=5
    assert handler.restore("./checkpoints", step=100, metadata_only=True) == {
        "description": "Training checkpoint"
    }
    capsys.readouterr()

    run_example(GUIDE_RESTORING, ns, "")
    assert ns["state"] == {"position": 50}
    assert ns["steps"] == [1, 50, 100] and ns["latest"] == 100
    assert capsys.readouterr().out.splitlines() == [
        "Available steps: [1, 50, 100]",
        "Latest step: 100",
    ]
    latest = handler.restore("./checkpoints")
    assert isinstance(latest["model_weights"], jax.Array)
    np.testing.assert_array_equal(latest["model_weights"], np.ones((10, 10), np.float32))
    assert latest["position"] == 42 and latest["epoch"] == 5

    run_example(GUIDE_ERRORS, ns, "")
    assert capsys.readouterr().out.splitlines() == ["Restored from step 100"]
    handler.close()


def test_guide_prng_keys_come_back_as_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = run_example("from datarax.checkpoint import OrbaxCheckpointHandler\n", {}, "")
    run_example(GUIDE_PRNG, ns, "")
    restored, state = ns["restored"], ns["state"]
    for name in ("rng_key", "split_keys"):
        assert isinstance(restored[name], jax.Array)
        assert jax.dtypes.issubdtype(restored[name].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(
            jax.random.key_data(restored[name]), jax.random.key_data(state[name])
        )
    assert "jax" in capsys.readouterr().out


def test_guide_keep_and_overwrite(tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    ns = run_example("from datarax.checkpoint import OrbaxCheckpointHandler\n", {}, "")
    run_example(GUIDE_MULTIPLE, ns, "")
    # Paths are absolute (datarax's keep a relative directory relative).
    where = tmp_path / "a" / "checkpoints"
    expected = {s: str(where / f"step_{s:08d}") for s in (50, 60, 70, 80, 90)}
    assert ns["checkpoints"] == expected
    assert capsys.readouterr().out == f"Checkpoints: {expected}\n"

    os.makedirs(tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    run_example(GUIDE_OVERWRITE, ns, "")
    with compat.OrbaxCheckpointHandler() as handler:
        assert handler.restore("./checkpoints") == {"v": 2}
        with pytest.raises(ValueError, match="overwrite"):
            handler.save("./checkpoints", {"v": 3}, step=1)
        with pytest.raises(compat.CheckpointExistsError):
            handler.save("./checkpoints", {"v": 3}, step=1)


# --------------------------------------------------------------------------- the gaps, one by one


def test_save_returns_the_path_of_the_committed_checkpoint(tmp_path):
    with compat.OrbaxCheckpointHandler() as handler:
        path = handler.save(tmp_path, {"x": 1}, step=3)
        assert path == str(tmp_path / "step_00000003") and os.path.isdir(path)
        unstepped = handler.save(tmp_path / "u", {"x": 1})
        assert unstepped == str(tmp_path / "u" / "checkpoint")
        assert os.path.isfile(os.path.join(unstepped, "manifest.json"))
        assert handler.restore(tmp_path / "u") == {"x": 1}
        assert handler.list_checkpoints(tmp_path) == {3: path}


def test_a_checkpointable_restored_without_a_target_gives_its_state(tmp_path):
    big = jax.device_put(jnp.arange(1_000_000, dtype=jnp.float32).reshape(1000, 1000))
    state = {
        "weights": big,
        "order": np.arange(6, dtype=np.int16),
        "key": jax.random.key(3),
        "position": 7,
        "name": "shard-2",
        "nested": {"ids": [1, (2, 3)], 5: b"\x00\x01"},
    }
    with compat.OrbaxCheckpointHandler() as handler:
        path = handler.save(tmp_path, Recorder(state), step=1)
        back = handler.restore(tmp_path)
        target = Recorder()
        assert handler.restore(tmp_path, target) is target
    # The arrays went to the data files: the commit record stays small.
    assert os.path.getsize(os.path.join(path, "manifest.json")) < 20_000
    for got in (back, target.received):
        assert list(got) == list(state)
        assert type(got["weights"]) is type(big) and got["weights"].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got["weights"]), np.asarray(big))
        assert type(got["order"]) is np.ndarray and got["order"].dtype == np.int16
        np.testing.assert_array_equal(got["order"], np.arange(6, dtype=np.int16))
        assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(
            jax.random.key_data(got["key"]), jax.random.key_data(state["key"])
        )
        assert got["position"] == 7 and got["name"] == "shard-2"
        assert got["nested"] == {"ids": [1, (2, 3)], 5: b"\x00\x01"}


def test_a_flipped_byte_in_a_checkpointable_array_is_caught(tmp_path):
    with compat.OrbaxCheckpointHandler() as handler:
        path = handler.save(tmp_path, Recorder({"w": np.arange(256, dtype=np.uint8)}), step=1)
    (attempt,) = [e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e))]
    (data,) = [f for f in os.listdir(os.path.join(path, attempt)) if f.endswith(".bin")]
    with open(os.path.join(path, attempt, data), "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="checksum|crc"):
        compat.OrbaxCheckpointHandler().restore(tmp_path)


def test_missing_checkpoints_raise_value_error_and_never_fall_back(tmp_path):
    handler = compat.OrbaxCheckpointHandler()
    with pytest.raises(ValueError, match="directory not found"):
        handler.restore(tmp_path / "absent")
    with pytest.raises(ValueError, match="no checkpoints found"):
        handler.restore(tmp_path)
    handler.save(tmp_path, {"v": 1}, step=1)
    handler.save(tmp_path, {"v": 0})  # tmp_path/checkpoint, which datarax would fall back to
    with pytest.raises(compat.CheckpointNotFoundError, match=r"step 2 .*steps there: \[1\]") as e:
        handler.restore(tmp_path, step=2)
    assert isinstance(e.value, errors.NotCommittedError) and isinstance(e.value, FileNotFoundError)
    assert handler.get_checkpoint_steps(tmp_path / "absent") == []
    assert handler.latest_step(tmp_path / "absent") is None


def test_keep_defaults_to_one_like_datarax(tmp_path):
    with compat.OrbaxCheckpointHandler() as handler:
        for step in (1, 2, 3):
            handler.save(tmp_path, {"s": step}, step=step)
        assert handler.get_checkpoint_steps(tmp_path) == [3]
        handler.save(tmp_path, {"s": 4}, step=4, keep=None)
        handler.save(tmp_path, {"s": 5}, step=5, keep=0)
        assert handler.get_checkpoint_steps(tmp_path) == [3, 4, 5]


def test_pipeline_checkpoint_api(tmp_path):
    ns = {"jax": jax}
    simple = pipeline_class(ns)
    pipe = simple(np.arange(40, dtype=np.float32))
    ckpt = compat.PipelineCheckpoint(tmp_path)
    with pytest.raises(ValueError, match="no checkpoints found"):
        ckpt.restore_latest(pipe)
    assert not ckpt.has_checkpoint()
    next(pipe)
    assert ckpt.save_to_step(pipe, 999, interval=1000) is None
    path = ckpt.save_to_step(pipe, 1000, interval=1000)
    assert path == str(tmp_path / "step_00001000")
    next(pipe)
    assert ckpt.save_at_step(pipe, 1500, interval=1000) is None  # datarax 0.1.0's name
    ckpt.save(pipe, 1700, 5)  # datarax's positional order: step, keep, overwrite, metadata
    ckpt.save_to_directory(pipe, step=2000, keep=5)
    fresh = simple(np.arange(40, dtype=np.float32))
    assert ckpt.restore(fresh) is fresh and fresh.position == 20  # latest by default
    assert ckpt.restore(fresh, step=1000).position == 10
    assert ckpt.restore_latest(fresh) is fresh and fresh.position == 20
    assert ckpt.list_checkpoints() == {
        1000: path,
        1700: str(tmp_path / "step_00001700"),
        2000: str(tmp_path / "step_00002000"),
    }
    assert ckpt.get_latest_step() == 2000 and ckpt.has_checkpoint()
    with pytest.raises(ValueError, match="no get_state"):
        ckpt.save_to_directory(object(), step=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must return a dict"):
        ckpt.save_to_directory(Recorder([1]), step=1)  # type: ignore[arg-type]
    ckpt.close()


def test_a_plain_dict_checkpoint_restores_into_a_checkpointable(tmp_path):
    with compat.OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, {"position": 4, "w": jnp.arange(3.0)}, step=1)
        target = Recorder()
        handler.restore(tmp_path, target)
    assert target.received["position"] == 4 and isinstance(target.received["w"], np.ndarray)


# --------------------------------------------------------------------------- identity checks


class Sharded(Recorder):
    def __init__(self, shard_count, position=0, source="mnist:train"):
        super().__init__()
        self.shard_count, self.position, self.source = shard_count, position, source

    def get_state(self):
        return {
            "position": self.position,
            "shard_count": self.shard_count,
            "shard_index": 0,
            "data_source_repr": self.source,
        }

    def set_state(self, state):
        self.position = state["position"]


def test_an_iterator_state_recorded_for_other_data_is_refused_unless_forced(tmp_path):
    ckpt = compat.IteratorCheckpoint(tmp_path)
    ckpt.save(Sharded(4, position=9), step=1)
    other = Sharded(8, source="mnist:test")
    with pytest.raises(ValueError, match="shard_count") as e:
        ckpt.restore(other)
    assert isinstance(e.value, errors.TreeMismatchError)
    assert e.value.problems == [
        "data_source_repr: the checkpoint has 'mnist:train', this iterator has 'mnist:test'",
        "shard_count: the checkpoint has 4, this iterator has 8",
    ]
    assert other.position == 0
    assert ckpt.restore(other, force=True).position == 9
    assert ckpt.restore_latest(Sharded(4)).position == 9
    # The handler checks a Checkpointable target too; the native API the same way.
    with pytest.raises(ValueError, match="shard_count"):
        ckpt.handler.restore(tmp_path, Sharded(8))
    assert ckpt.handler.restore(tmp_path, Sharded(8), force=True).position == 9
    native = distckpt.PipelineCheckpoint(tmp_path)
    with pytest.raises(errors.TreeMismatchError, match="data_source_repr"):
        native.restore_latest(Sharded(4, source="cifar"))
    assert native.restore(Sharded(4, source="cifar"), 1, force=True).position == 9
    # An iterator that records no identity is not checked.
    assert ckpt.restore(Recorder()).received["position"] == 9


# --------------------------------------------------------------------------- checkpoints datarax wrote


def _datarax_encoded(value):
    """A state as datarax hands it to Orbax: strings as character codes, keys as key data."""
    if isinstance(value, str):
        return {"__string__": True, "char_codes": [ord(c) for c in value]}
    if isinstance(value, dict):
        return {k: _datarax_encoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_datarax_encoded(v) for v in value]
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return {"__prng_key__": True, "key_data": jax.random.key_data(value).tolist()}
    return value


def write_like_datarax(directory, state, step=None, metadata=None):
    """Writes ``state`` where and as datarax's handler does: ``directory/ckpt-<step>``
    (``directory/checkpoint`` without a step), one Orbax StandardCheckpointer save of
    the encoded state, the metadata under ``__metadata__`` (a non-dict state under
    ``__state__``)."""
    import orbax.checkpoint as ocp

    if metadata:
        state = (
            {**state, "__metadata__": metadata}
            if isinstance(state, dict)
            else {"__state__": state, "__metadata__": metadata}
        )
    name = "checkpoint" if step is None else f"ckpt-{step}"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, name), _datarax_encoded(state))
    checkpointer.wait_until_finished()
    checkpointer.close()


def test_checkpoints_datarax_wrote_are_listed_and_restored(tmp_path):
    state = {
        "weights": jnp.arange(6.0).reshape(2, 3),
        "indices": np.arange(5),
        "position": 42,
        "source": "mnist",
        "rng": jax.random.key(5),
    }
    write_like_datarax(tmp_path, state, step=100, metadata={"epoch": 3, "note": "old"})
    write_like_datarax(tmp_path, {"position": 7}, step=50)
    with compat.OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(tmp_path) == [50, 100]
        assert handler.list_checkpoints(tmp_path) == {
            50: str(tmp_path / "ckpt-50"),
            100: str(tmp_path / "ckpt-100"),
        }
        back = handler.restore(tmp_path)
        assert sorted(back) == sorted(state)
        assert isinstance(back["weights"], jax.Array)
        np.testing.assert_array_equal(back["weights"], np.arange(6.0).reshape(2, 3))
        np.testing.assert_array_equal(back["indices"], np.arange(5))
        assert back["position"] == 42 and back["source"] == "mnist"
        np.testing.assert_array_equal(
            jax.random.key_data(back["rng"]), jax.random.key_data(state["rng"])
        )
        assert handler.restore(tmp_path, metadata_only=True) == {"epoch": 3, "note": "old"}
        target = Recorder()
        assert handler.restore(tmp_path, target, step=50) is target
        assert target.received == {"position": 7}

        # After the switch: new steps are distckpt's, old ones stay readable and are not pruned.
        handler.save(tmp_path, {"position": 43}, step=200)
        assert handler.get_checkpoint_steps(tmp_path) == [50, 100, 200]
        assert handler.restore(tmp_path) == {"position": 43}
        assert handler.restore(tmp_path, step=100)["position"] == 42


def test_a_datarax_checkpoint_without_a_step(tmp_path):
    write_like_datarax(tmp_path, [1, 2], metadata={"kind": "list"})
    with compat.OrbaxCheckpointHandler() as handler:
        assert handler.get_checkpoint_steps(tmp_path) == []
        assert handler.restore(tmp_path) == [1, 2]
        assert handler.restore(tmp_path, metadata_only=True) == {"kind": "list"}


def test_an_nnx_module_is_saved_as_its_state_and_updated_in_place(tmp_path):
    from flax import nnx

    saved, other = nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    with compat.OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, saved, step=1)
        assert handler.restore(tmp_path, other) is other
    np.testing.assert_array_equal(np.asarray(other.kernel[...]), np.asarray(saved.kernel[...]))
    np.testing.assert_array_equal(np.asarray(other.bias[...]), np.asarray(saved.bias[...]))


@pytest.mark.parametrize("cls", [Recorder, GlobalRecorder], ids=["per-process", "global"])
def test_every_kind_of_array_in_a_state_keeps_its_dtype_shape_and_type(tmp_path, cls):
    state = {
        "empty": np.zeros((0, 3), np.float32),
        "flags": np.array([True, False]),
        "zero_d": np.array(5),  # int64: not narrowed to int32 on its way through a device
        "wide": np.array([2**40, -1], np.int64),
        "doubles": np.array([0.1, 1e300]),
        "complex": np.array([1 + 2j]),
        "half": jnp.ones(3, jnp.bfloat16),
        "text": np.array(["ab", "c"]),  # not numbers: kept in the record, as before
        "keys": jax.random.split(jax.random.key(0, impl="rbg"), 3),
    }
    with compat.OrbaxCheckpointHandler(async_checkpointing=True) as handler:
        handler.save(tmp_path, cls(state), step=1)
        back = handler.restore(tmp_path)
    for name, want in state.items():
        got = back[name]
        if name == "keys":
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
            continue
        assert type(got) is type(want), name
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


def test_orbax_checkpoint_manager_steps_are_listed_too(tmp_path):
    """datarax versions that keep steps with an Orbax CheckpointManager: ``N/<item>/``."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path, item_names=("data_iterator",)) as manager:
        item = ocp.args.StandardSave({"position": 3, "order": np.arange(3)})
        manager.save(5, args=ocp.args.Composite(data_iterator=item))
        manager.wait_until_finished()
    handler = compat.OrbaxCheckpointHandler()
    assert handler.list_checkpoints(tmp_path) == {5: str(tmp_path / "5")}
    back = handler.restore(tmp_path)
    assert back["position"] == 3
    np.testing.assert_array_equal(back["order"], np.arange(3))


def test_a_module_that_is_checkpointable_is_saved_through_get_state(tmp_path):
    from flax import nnx

    class Counter(nnx.Module):
        def __init__(self):
            self.count = nnx.Variable(jnp.array(0))

        def get_state(self):
            return {"count": int(self.count[...]), "kind": "counter"}

        def set_state(self, state):
            self.count[...] = jnp.array(state["count"])

    saved, other = Counter(), Counter()
    saved.count[...] = jnp.array(4)
    with compat.OrbaxCheckpointHandler() as handler:
        handler.save(tmp_path, saved, step=1)
        assert handler.restore(tmp_path) == {"count": 4, "kind": "counter"}
        handler.restore(tmp_path, other)
    assert int(other.count[...]) == 4


# --------------------------------------------------------------------------- written by datarax itself

WRITTEN = os.path.join(os.path.dirname(__file__), "data", "datarax_written")


def _fixture_module():
    """tests/data/datarax_written/make_fixture.py, which wrote the checkpoints with datarax
    and recorded what datarax restores from them (``describe``, ``SimplePipeline``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "datarax_written", os.path.join(WRITTEN, "make_fixture.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DATARAX_VERSIONS = ("0.1.0", "0.1.4")  # <step>/default/ and ckpt-<step>/ layouts


@pytest.mark.parametrize("version", DATARAX_VERSIONS)
def test_checkpoints_written_by_datarax_restore_as_datarax_restores_them(tmp_path, version):
    """The checkpoints in tests/data/datarax_written/<version> were written by that datarax
    release's own handler (``OrbaxCheckpointHandler``, ``PipelineCheckpoint``); expected.json
    is what datarax's handler returned from them. The compat handler gives the same
    listing, the same states (types, dtypes, shapes, values) and the same metadata."""
    import shutil

    fixture = _fixture_module()
    written = os.path.join(WRITTEN, version)
    with open(os.path.join(written, "expected.json")) as f:
        expected = json.load(f)
    assert expected["datarax"] == version
    with compat.OrbaxCheckpointHandler() as handler:
        for name in ("dict_state", "pipeline", "unstepped"):
            directory = str(tmp_path / name)  # a copy: nothing may be written into the fixture
            shutil.copytree(os.path.join(written, name), directory)
            want = expected[name]
            assert handler.get_checkpoint_steps(directory) == want["steps"], name
            assert handler.latest_step(directory) == want["latest"], name
            # The directories that are there (datarax 0.1.0 lists ckpt-N even where it
            # wrote N/).
            listed = handler.list_checkpoints(directory)
            assert list(listed) == want["steps"], name
            assert all(os.path.basename(p) in (str(s), f"ckpt-{s}") for s, p in listed.items())
            assert all(
                os.path.isdir(p) and os.path.dirname(p) == directory for p in listed.values()
            )
            assert fixture.describe(handler.restore(directory)) == want["latest_state"], name
            for step, per_step in want["by_step"].items():
                got = handler.restore(directory, step=int(step))
                assert fixture.describe(got) == per_step["state"], (name, step)
                meta = handler.restore(directory, step=int(step), metadata_only=True)
                assert meta == per_step["metadata"], (name, step)
        pipeline = compat.PipelineCheckpoint(str(tmp_path / "pipeline"))
        restored = pipeline.restore_latest(fixture.SimplePipeline(0, 0, 0))
        assert fixture.describe(restored.get_state()) == expected["pipeline"]["restore_latest"]
        # After the switch: new steps are distckpt's; datarax's stay readable and are kept.
        pipeline.save(fixture.SimplePipeline(1, 3, 4500), step=450, keep=3)
        assert pipeline.list_checkpoints().keys() == {200, 300, 400, 450}
        assert handler.restore(str(tmp_path / "pipeline"), step=400)["position"] == 4000


@pytest.mark.parametrize("version", DATARAX_VERSIONS)
def test_every_datarax_method_is_there_with_its_positional_parameters(version):
    """signatures.json records, for each public method of that datarax release's handler
    classes, the parameters that can be passed by position and their defaults: the compat
    classes have each method and accept the same arguments in the same order (a parameter
    datarax names with a leading underscore may have another name here)."""
    fixture = _fixture_module()
    with open(os.path.join(WRITTEN, version, "signatures.json")) as f:
        theirs = json.load(f)
    ours = fixture.signatures(compat)
    problems = []
    for method, params in theirs.items():
        if method not in ours:
            problems.append(f"{method}: missing")
            continue
        mine = ours[method][: len(params)]
        same = len(mine) == len(params) and all(
            (a == b) or (a[0].startswith("_") and a[1] == b[1])
            for a, b in zip(params, mine, strict=True)
        )
        if not same:
            problems.append(f"{method}: datarax {params}, compat {ours[method]}")
    assert not problems, "\n".join(problems)
