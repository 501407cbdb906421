"""``distckpt.compat.datarax`` in a job of real processes: datarax's examples, multi-host.

The examples are tests/test_compat_datarax.py's verbatim copies of datarax's
documentation (the overview's, the guide's and the quickref's), run on every
process of a 2-process job with only their imports changed; each process's pipeline walks its own shard (a seed of its
own), and must get exactly its own position back. One run covers the
examples, per-process and global Checkpointable state with arrays, and a
checkpoint datarax wrote, read by every process.
"""

from __future__ import annotations

import os

import pytest

from tests.mp import run_processes
from tests.recorder import GlobalRecorder, Recorder

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_compat_datarax_mp"


def _w_examples(directory: str, datarax_dir: str) -> dict:
    import contextlib
    import io
    import os

    import jax
    import jax.numpy as jnp
    import numpy as np

    from distckpt.compat import datarax as compat
    from tests import test_compat_datarax as t

    pid = jax.process_index()
    out: dict = {}

    # The quickref, each process its own pipeline (its own seed and data).
    ns: dict = {"jax": jax}
    simple = t.pipeline_class(ns)
    ns["data"] = np.arange(1500, dtype=np.float32) + 10_000 * pid
    ns["pipeline"] = pipeline = simple(ns["data"], seed=40 + pid)
    ckpt_dir = os.path.join(directory, "quickref")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        t.run_example(t.QUICKREF_SETUP, ns, ckpt_dir)
        t.run_example(t.QUICKREF_SAVE, ns, ckpt_dir)
        saved_rng = np.asarray(jax.random.key_data(pipeline.rng)).tolist()
        t.run_example(t.QUICKREF_RESTORE, ns, ckpt_dir)
    out["printed"] = printed.getvalue().splitlines()
    new = ns["new_pipeline"]
    out["rng_back"] = np.asarray(jax.random.key_data(new.rng)).tolist() == saved_rng
    out["steps"] = sorted(ns["checkpointer"].list_checkpoints())

    # The overview's examples: each process's pipeline its own data, saved and restored.
    ns = {"jax": jax}
    simple = t.pipeline_class(ns)
    ns["pipeline"] = quick = simple(np.arange(30, dtype=np.float32) + pid, seed=1)
    for _ in range(pid + 1):
        next(quick)
    t.run_example(t.OVERVIEW_QUICK_START, ns, os.path.join(directory, "overview_quick"))
    out["overview_quick"] = quick.position  # restored: the position this process saved
    overview = os.path.join(directory, "overview")
    ns["pipeline"] = simple(np.arange(20010, dtype=np.float32), seed=2 + pid)
    ns["train_step"] = t._train_step
    t.run_example(t.OVERVIEW_TRAINING_LOOP, ns, overview)
    handler = compat.OrbaxCheckpointHandler()
    resumed = simple(np.arange(20010, dtype=np.float32), seed=9)
    handler.restore(overview, resumed, step=1000)
    out["overview_resumed"] = (
        resumed.position,
        np.asarray(jax.random.key_data(resumed.rng)).tolist()
        == np.asarray(jax.random.key_data(jax.random.key(2 + pid))).tolist(),
    )
    ns["handler"], ns["pipeline"] = handler, simple(np.arange(3, dtype=np.float32))
    for step in (3000, 4000, 5000):
        handler.save(overview, resumed, step=step, keep=5)
    t.run_example(t.OVERVIEW_MANAGEMENT, ns, overview)
    out["overview_management"] = (ns["steps"], ns["latest"], ns["pipeline"].position)

    # The guide's examples, in order, in directories of their own (./checkpoints in each).
    def enter(name: str) -> None:
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        os.chdir(os.path.join(directory, name))

    enter("guide")
    ns = {"state": {"position": 3, "epoch": 1}}
    t.run_example(t.GUIDE_CORE, ns, "")
    compat.OrbaxCheckpointHandler().save("./checkpoints", {"position": 50}, step=50, keep=None)
    t.run_example(t.GUIDE_SAVING, ns, "")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        t.run_example(t.GUIDE_RESTORING, ns, "")
        t.run_example(t.GUIDE_ERRORS, ns, "")
    out["guide"] = printed.getvalue().splitlines()
    enter("multiple")
    with contextlib.redirect_stdout(io.StringIO()):
        t.run_example(t.GUIDE_MULTIPLE, ns, "")
    out["multiple"] = sorted(ns["checkpoints"])
    enter("overwrite")
    t.run_example(t.GUIDE_OVERWRITE, ns, "")
    out["overwritten"] = compat.OrbaxCheckpointHandler().restore("./checkpoints")

    # The guide's PRNG example: keys the same on every process.
    enter("prng")
    t.run_example(t.GUIDE_PRNG, ns, "")
    key_back = ns["restored"]["split_keys"]
    out["keys"] = bool(
        np.array_equal(
            jax.random.key_data(key_back), jax.random.key_data(ns["state"]["split_keys"])
        )
    )

    # Per-process and global Checkpointable state with arrays.
    mine = {
        "w": jnp.arange(12.0).reshape(3, 4) + pid,
        "order": np.arange(5, dtype=np.int64) * (pid + 1) + 2**40,
        "key": jax.random.key(pid),
        "position": 100 + pid,
    }
    shared = {"table": np.arange(8, dtype=np.int64), "epoch": 2}
    with compat.OrbaxCheckpointHandler(timeout_s=30) as handler:
        handler.save(os.path.join(directory, "pp"), Recorder(mine), step=1)
        handler.save(os.path.join(directory, "gl"), GlobalRecorder(shared), step=1)
        back = handler.restore(os.path.join(directory, "pp"))
        target = GlobalRecorder()
        handler.restore(os.path.join(directory, "gl"), target)
        out["per_process"] = (
            type(back["w"]) is type(mine["w"])
            and bool(np.array_equal(np.asarray(back["w"]), np.asarray(mine["w"])))
            and back["order"].dtype == np.int64
            and bool(np.array_equal(back["order"], mine["order"]))
            and bool(
                np.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(mine["key"]))
            )
            and back["position"] == 100 + pid
        )
        out["global"] = (
            target.received["epoch"] == 2
            and bool(np.array_equal(target.received["table"], shared["table"]))
            and target.received["table"].dtype == np.int64
        )
        # Checkpoints datarax 0.1.4 wrote (tests/data/datarax_written), read by every process.
        fixture = t._fixture_module()
        out["datarax_steps"] = handler.get_checkpoint_steps(datarax_dir)
        out["datarax_state"] = fixture.describe(handler.restore(datarax_dir))
        out["datarax_step_100"] = fixture.describe(handler.restore(datarax_dir, step=100))
        # Identity: each process's shard_count is checked against its own saved state.
        it_ckpt = compat.IteratorCheckpoint(os.path.join(directory, "it"), handler=handler)
        it_ckpt.save(t.Sharded(2, position=pid + 1), step=1)
        try:
            it_ckpt.restore(t.Sharded(3))
            out["identity"] = "restored"
        except ValueError as e:
            out["identity"] = "shard_count" in str(e)
        out["forced"] = it_ckpt.restore(t.Sharded(3), force=True).position
    return out


def test_datarax_examples_and_state_on_two_processes(tmp_path):
    import json
    import shutil

    from tests import test_compat_datarax as t

    datarax_dir = tmp_path / "written_by_datarax"
    shutil.copytree(os.path.join(t.WRITTEN, "0.1.4", "dict_state"), datarax_dir)
    with open(os.path.join(t.WRITTEN, "0.1.4", "expected.json")) as f:
        expected = json.load(f)["dict_state"]
    results = run_processes(
        f"{HERE}:_w_examples",
        2,
        2,
        args={"directory": str(tmp_path), "datarax_dir": str(datarax_dir)},
        timeout=120,
    )
    for pid, r in enumerate(results):
        assert r.value == {
            "printed": [
                "Checkpoint directory: " + str(tmp_path / "quickref"),
                "Saved checkpoint at step 100",
                "Saved checkpoint at step 200",
                "Saved checkpoint at step 300",
                "Before restore: position=0",
                "After restore: position=1500",
            ],
            "rng_back": True,
            "overview_quick": 10 * (pid + 1),
            "overview_resumed": [10010, True],
            "overview_management": [[1000, 2000, 3000, 4000, 5000], 5000, 10010],
            "steps": [100, 200, 300],
            "keys": True,
            "guide": [
                "Available steps: [1, 50, 100]",
                "Latest step: 100",
                "Restored from step 100",
            ],
            "multiple": [50, 60, 70, 80, 90],
            "overwritten": {"v": 2},
            "per_process": True,
            "global": True,
            "datarax_steps": expected["steps"],
            "datarax_state": expected["latest_state"],
            "datarax_step_100": expected["by_step"]["100"]["state"],
            "identity": True,
            "forced": pid + 1,
        }, pid


def _w_mismatch(directory: str) -> str:
    import jax
    import numpy as np

    from distckpt.compat import datarax as compat

    pid = jax.process_index()
    state = {"order": np.arange(3 + pid), "position": pid}  # process 1's array is longer
    with compat.OrbaxCheckpointHandler(timeout_s=30) as handler:
        try:
            handler.save(directory, Recorder(state), step=1)
        except ValueError as e:
            return f"{type(e).__name__}: {e}"
    return "saved"


def test_per_process_arrays_of_different_shapes_are_refused_on_every_process(tmp_path):
    results = run_processes(f"{HERE}:_w_mismatch", 2, 1, args={"directory": str(tmp_path)})
    for r in results:
        assert r.value.startswith("TreeMismatchError"), r.value
        assert "same shapes" in r.value, r.value
        assert f"state['order']: int64 [{3 + r.process_id}]" in r.value, r.value
    from distckpt.compat import datarax as compat

    assert compat.OrbaxCheckpointHandler().get_checkpoint_steps(tmp_path) == []  # none committed


# --------------------------------------------------------------------------- agreed step choice


def _w_agreed_step(tmp: str) -> dict:
    """Each process sees its own directory at one path (/proc/self/cwd is per process):
    like a local disk per host, which distckpt must not let processes read apart."""
    import os

    import jax

    from distckpt import errors
    from distckpt.compat.datarax import CheckpointNotFoundError, OrbaxCheckpointHandler

    p = jax.process_index()
    os.chdir(f"{tmp}/host{p}")
    where = "/proc/self/cwd/ckpts"
    handler = OrbaxCheckpointHandler(timeout_s=30)
    out: dict = {"listed": handler.get_checkpoint_steps(where)}
    calls = {
        "step5": {"step": 5},
        "latest": {},  # the primary's latest (7) is not on process 1
        "step9": {"step": 9},  # not on the primary
        "apart": {"step": 5 if p == 0 else None},
        "differ": {"step": 3},  # each host's copy of step 3 holds other contents
        "damaged": {"step": 2},  # process 1's copy cannot be read
    }
    calls["no_dir"] = {"directory": "/proc/self/cwd/only_on_0"}
    for name, kw in calls.items():
        kw = {"directory": where, **kw}
        try:
            out[name] = int(handler.restore(**kw)["position"])
        except (
            CheckpointNotFoundError,
            errors.InconsistentProcessesError,
            errors.CorruptCheckpointError,
        ) as e:
            out[name] = {"error": type(e).__name__, "value_error": isinstance(e, ValueError)}
            out[name]["text"] = str(e)
    from distckpt.compat.datarax import IteratorCheckpoint

    class It:
        def __init__(self):
            self.state = {"position": -1}

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

        def __iter__(self):
            return self

        def __next__(self):
            raise StopIteration

    try:
        IteratorCheckpoint(where, handler=handler).restore_latest(It())
        out["restore_latest"] = "restored"
    except errors.InconsistentProcessesError as e:
        out["restore_latest"] = str(e)
    return out


def test_the_primary_chooses_the_datarax_step_and_a_missing_one_fails_everywhere(tmp_path):
    from tests.test_compat_datarax import write_like_datarax

    write_like_datarax(tmp_path / "host0" / "only_on_0", {"position": 1}, step=1)
    for host, steps in ((0, (5, 7)), (1, (5, 9))):
        for step in steps:
            write_like_datarax(tmp_path / f"host{host}" / "ckpts", {"position": step}, step=step)
        write_like_datarax(tmp_path / f"host{host}" / "ckpts", {"position": 3 + 30 * host}, step=3)
        write_like_datarax(tmp_path / f"host{host}" / "ckpts", {"position": 2}, step=2)
    for index in ("manifest.ocdbt", "ocdbt.process_0/manifest.ocdbt"):  # unreadable on host 1
        os.remove(tmp_path / "host1" / "ckpts" / "ckpt-2" / index)
    results = run_processes(f"{HERE}:_w_agreed_step", args={"tmp": str(tmp_path)})
    assert results[0].value["listed"] == [2, 3, 5, 7]
    assert results[1].value["listed"] == [2, 3, 5, 9]
    for r in results:
        v = r.value
        assert v["step5"] == 5
        assert v["latest"]["error"] == "CheckpointNotFoundError" and v["latest"]["value_error"]
        assert "process 1 finds no checkpoint at /proc/self/cwd/ckpts/ckpt-7" in v["latest"]["text"]
        assert "which the primary (process 0) chose" in v["latest"]["text"]
        assert v["step9"]["error"] == "CheckpointNotFoundError"
        assert (
            "step 9 is not a checkpoint in /proc/self/cwd/ckpts (steps there: [2, 3, 5, 7])"
            in (v["step9"]["text"])
        )
        assert v["apart"]["error"] == "InconsistentProcessesError"
        assert "asked for different steps (by process: {0: 5, 1: None}" in v["apart"]["text"]
        assert v["no_dir"]["error"] == "CheckpointNotFoundError"
        assert (
            "checkpoint directory not found on process 1: /proc/self/cwd/only_on_0"
            in v["no_dir"]["text"]
        )
        assert "see different latest steps (by process: {0: 7, 1: 9})" in v["restore_latest"]
        assert v["differ"]["error"] == "InconsistentProcessesError", v["differ"]
        assert "the processes read different contents at this path" in v["differ"]["text"]
        assert "/proc/self/cwd/ckpts/ckpt-3" in v["differ"]["text"]
        # A read that fails on one process fails the restore on every process, at once.
        assert v["damaged"]["error"] == "CorruptCheckpointError", v["damaged"]
        assert v["damaged"]["value_error"] and "ckpt-2" in v["damaged"]["text"]
