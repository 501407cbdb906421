"""CheckpointManager in one process: retention, async saves, errors, hygiene, preemption."""

from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _layout, _storage
from distckpt.errors import CheckpointExistsError, CorruptCheckpointError, NotCommittedError
from tests.faults import fail_once


def _tiny(step: int) -> dict:
    return {"x": np.full(4, step, np.int32), "step": step}


def _run(directory, steps=30, metrics=lambda s: None, **options) -> distckpt.CheckpointManager:
    mgr = distckpt.CheckpointManager(directory, **options)
    for step in range(1, steps + 1):
        mgr.save(step, _tiny(step), metrics=metrics(step))
    mgr.wait_until_finished()
    return mgr


def _on_disk(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize(
    "options,metrics,expected",
    [
        ({}, None, list(range(1, 31))),
        ({"max_to_keep": 3}, None, [28, 29, 30]),
        ({"max_to_keep": 2, "keep_every_n_steps": 10}, None, [10, 20, 29, 30]),
        # |step - 7| is smallest at 7; 6 and 8 tie and the newer one wins.
        ({"best_metric": "loss", "keep_best": 2}, lambda s: {"loss": abs(s - 7)}, [7, 8, 30]),
        (
            {"best_metric": "acc", "best_mode": "max", "keep_best": 2},
            lambda s: {"acc": s % 9},
            [17, 26, 30],
        ),
        # Steps saved without the metric are never "best"; the latest is always kept.
        (
            {"best_metric": "loss", "keep_best": 1},
            lambda s: {"loss": s} if s % 2 == 0 else None,
            [2, 30],
        ),
        (
            {"max_to_keep": 2, "keep_every_n_steps": 10, "best_metric": "loss", "keep_best": 1},
            lambda s: {"loss": abs(s - 13)},
            [10, 13, 20, 29, 30],
        ),
    ],
    ids=[
        "keep-all",
        "latest-3",
        "latest-2+every-10",
        "best-2-min",
        "best-2-max",
        "best-with-gaps",
        "all-rules",
    ],
)
def test_retention_over_30_saves(tmp_path, options, metrics, expected):
    mgr = _run(tmp_path, metrics=metrics or (lambda s: None), **options)
    assert mgr.all_steps() == expected
    assert _on_disk(tmp_path) == [_layout.step_name(s) for s in expected]
    # A new manager (a restarted job) sees the same steps and metrics.
    again = distckpt.CheckpointManager(tmp_path, **options)
    assert again.all_steps() == expected
    assert [again.metrics(s) for s in expected] == [mgr.metrics(s) for s in expected]
    for step in expected:
        assert mgr.restore(step)["step"] == step


def test_best_step_and_metadata(tmp_path):
    mgr = _run(tmp_path, steps=5, metrics=lambda s: {"loss": 10 - s}, best_metric="loss")
    assert mgr.best_step() == 5
    assert mgr.latest_step() == 5
    info = mgr.metadata(3)
    assert info.leaves["['x']"].shape == (4,)
    assert info.step == 3 and info.metrics == {"loss": 7}
    # The manifest keeps each process's bytes beside the summary every process gets.
    assert set(info.save_stats) == {
        "blocking_s",
        "write_s",
        "commit_s",
        "total_bytes",
        "max_process_bytes",
        "max_process",
        "files",
        "bytes_per_process",
    }
    assert info.save_stats["bytes_per_process"] == [16]
    stats = mgr.last_save_stats
    assert stats.total_bytes == stats.max_process_bytes == 16 and stats.max_process == 0
    assert stats.files == 1 and stats.write_s >= 0
    last = mgr.metadata(5).save_stats
    assert stats.to_json() == {k: v for k, v in last.items() if k != "bytes_per_process"}


def test_missing_step_lists_the_steps_that_exist(tmp_path):
    mgr = _run(tmp_path, steps=3)
    with pytest.raises(NotCommittedError, match=r"step 7 is not a committed step.*\[1, 2, 3\]"):
        mgr.restore(7)
    with pytest.raises(CheckpointExistsError, match="step 2 is already committed"):
        mgr.save(2, _tiny(2), force=True)
    assert mgr.restore()["step"] == 3
    mgr.delete(2)
    assert mgr.all_steps() == [1, 3]
    assert _on_disk(tmp_path) == ["step_00000001", "step_00000003"]
    empty = distckpt.CheckpointManager(tmp_path / "empty")
    with pytest.raises(NotCommittedError, match="no committed steps"):
        empty.restore()


def test_should_save_follows_the_interval(tmp_path):
    mgr = distckpt.CheckpointManager(tmp_path, save_interval_steps=5, async_save=False)
    saved = [s for s in range(1, 21) if mgr.save(s, _tiny(s))]
    assert saved == [5, 10, 15, 20] == mgr.all_steps()
    assert mgr.save(21, _tiny(21), force=True) and mgr.all_steps()[-1] == 21


def test_async_save_with_a_donating_train_step(tmp_path):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state):
        return {"w": state["w"] * 2 + 1, "n": state["n"] + 1}

    state = {"w": jax.device_put(jnp.zeros((64, 32)), sharding), "n": jnp.array(0)}
    expected = {}
    with distckpt.CheckpointManager(tmp_path, max_to_keep=10) as mgr:
        for step in range(1, 9):
            state = train_step(state)  # donates the buffers the previous save copied from
            expected[step] = np.asarray(state["w"]).copy()
            mgr.save(step, state)
    target = {
        "w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sharding),
        "n": jax.ShapeDtypeStruct((), jnp.int32),
    }
    for step in range(1, 9):
        out = mgr.restore(step, target)
        np.testing.assert_array_equal(np.asarray(out["w"]), expected[step])
        assert int(out["n"]) == step


def test_the_runtime_keeps_a_viewed_buffer_from_donation():
    # Async saves on CPU keep views of the caller's shards instead of copying
    # them, because the runtime refuses to reuse a buffer that has a live view.
    # This pins that behaviour of the JAX in use; without it saves copy.
    from distckpt import _stage

    assert _stage.views_outlive_donation()


@pytest.mark.parametrize("staging", ["views", "copies", "device"])
def test_async_staging_survives_donation_and_reuse(tmp_path, monkeypatch, staging):
    # Each way an async save takes shards off the caller's hands, against a
    # donating step that overwrites the state right after save() returns:
    # views of CPU buffers, copies into the pool's reused buffers (the runtime
    # probe said no), and copying fetches as from accelerator memory.
    from distckpt import _stage

    if staging == "copies":
        monkeypatch.setattr(_stage, "_probe_result", [False])
    if staging == "device":
        monkeypatch.setattr(_stage, "_fetch_copies", lambda device: True)
        monkeypatch.setattr(_stage, "_host_copy", lambda data: np.array(data, copy=True))
    monkeypatch.setattr(_stage, "_COPY_BAND_BYTES", 64 << 10)  # several bands per shard
    mesh = jax.make_mesh((8,), ("x",))
    rows = NamedSharding(mesh, P("x", None))

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state):
        return {"w": state["w"] * 3 + 1, "b": state["b"] - 1}

    state = {
        "w": jax.device_put(jnp.arange(512 * 256, dtype=jnp.float32).reshape(512, 256), rows),
        "b": jnp.zeros((), jnp.int32),
        "host": np.arange(64 * 1024, dtype=np.int64).reshape(64, 1024),
    }
    expected = {}
    with distckpt.CheckpointManager(tmp_path, max_to_keep=10) as mgr:
        for step in range(1, 5):
            expected[step] = jax.tree.map(lambda a: np.array(a, copy=True), state)
            mgr.save(step, state)
            host = state["host"]
            state = {**train_step({"w": state["w"], "b": state["b"]}), "host": host}
            host += 1  # the saved numpy leaf changes in place
    for step, want in expected.items():
        got = mgr.restore(step, jax.tree.map(np.asarray, want))
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)


def test_background_error_surfaces_once_and_does_not_poison(tmp_path, monkeypatch):
    mgr = distckpt.CheckpointManager(tmp_path)
    mgr.save(1, _tiny(1))
    mgr.wait_until_finished()
    failing = fail_once(_storage.PosixStorage.writer, OSError(5, "injected write error"))
    monkeypatch.setattr(_storage.PosixStorage, "writer", failing)
    mgr.save(2, _tiny(2))  # returns: the error happens in the background
    with pytest.raises(OSError, match="injected write error"):
        mgr.save(3, _tiny(3))
    assert mgr.all_steps() == [1]
    assert mgr.save(3, _tiny(3))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 3]
    # The failed attempt left no data; the empty step directory goes at the next start.
    assert not list((tmp_path / "step_00000002").iterdir())
    mgr.close()
    assert distckpt.CheckpointManager(tmp_path).all_steps() == [1, 3]
    assert not (tmp_path / "step_00000002").exists()


def test_start_up_removes_our_leftovers_only(tmp_path):
    _run(tmp_path, steps=2)
    (tmp_path / "step_00000005" / "attempt-0123456789abcdef").mkdir(parents=True)  # crashed save
    (tmp_path / ".step_00000001.deleting-0badcafe").mkdir()  # crashed delete
    (tmp_path / "step_00000009").mkdir()
    (tmp_path / "step_00000009" / "notes.txt").write_text("not ours")  # foreign
    (tmp_path / "logs").mkdir()
    kept = distckpt.CheckpointManager(tmp_path, clean_on_start=False)
    assert kept.all_steps() == [1, 2]
    assert (tmp_path / "step_00000005").exists()
    mgr = distckpt.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1, 2]
    assert _on_disk(tmp_path) == ["logs", "step_00000001", "step_00000002", "step_00000009"]


def test_sigterm_in_a_single_process(tmp_path):
    mgr = distckpt.CheckpointManager(tmp_path, save_interval_steps=100)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert not mgr.reached_preemption(1)  # installs the notice handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.reached_preemption(2)
        assert mgr.should_save(2) and not mgr.should_save(3)
        assert mgr.save(2, _tiny(2), blocking=True)
        assert mgr.all_steps() == [2]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_forward_signal_turns_usr1_into_a_notice(tmp_path):
    mgr = distckpt.CheckpointManager(tmp_path)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        distckpt.forward_signal(signal.SIGUSR1)
        assert not mgr.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.reached_preemption(2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
        distckpt.CheckpointManager("/tmp/never", max_to_keep=0)
    with pytest.raises(ValueError, match="keep_best=2 needs best_metric"):
        distckpt.CheckpointManager("/tmp/never", keep_best=2)
    with pytest.raises(ValueError, match="best_mode must be"):
        distckpt.CheckpointManager("/tmp/never", best_mode="lowest")


def test_a_corrupt_latest_step_falls_back_only_when_told_to(tmp_path):
    with distckpt.CheckpointManager(tmp_path, async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"v": np.full(64, float(step))})
    data = next((tmp_path / "step_00000003").glob("attempt-*/*.bin"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    mgr = distckpt.CheckpointManager(tmp_path)
    with pytest.raises(CorruptCheckpointError) as info:
        mgr.restore()
    assert "restore(fall_back=True)" in "".join(getattr(info.value, "__notes__", []))
    got = mgr.restore(fall_back=True)
    assert mgr.last_restored_step == 2 and got["v"][0] == 2.0
    with pytest.raises(CorruptCheckpointError):  # an explicit step never falls back
        mgr.restore(3, fall_back=True)


def test_storage_budget_warns_and_records_the_projection(tmp_path, caplog):
    tree = {"v": np.zeros(1024, np.float32)}  # 4 KiB a step
    with distckpt.CheckpointManager(
        tmp_path, async_save=False, max_to_keep=3, storage_budget_bytes=10_000
    ) as mgr:
        with caplog.at_level("WARNING", logger="distckpt"):
            for step in (1, 2, 3, 4):
                mgr.save(step, tree)
    storage = [
        json.loads((tmp_path / f"step_{s:08d}" / "manifest.json").read_bytes())["manager"][
            "storage"
        ]
        for s in (2, 3, 4)
    ]
    assert [s["over_budget"] for s in storage] == [False, True, True]
    assert storage[2]["kept_steps"] == [2, 3, 4] and storage[2]["projected_bytes"] >= 3 * 4096
    assert "over the storage budget of 10000 bytes" in caplog.text


def test_selected_steps_are_backed_up_in_the_background(tmp_path):
    with distckpt.CheckpointManager(
        tmp_path / "run",
        async_save=True,
        max_to_keep=1,
        best_metric="loss",
        backup_to=tmp_path / "backup",
        backup_every_n_steps=3,
        backup_best=True,
    ) as mgr:
        for step, loss in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 2.0), (6, 9.0)]:
            mgr.save(step, {"v": np.full(8, float(step))}, metrics={"loss": loss})
    assert mgr.all_steps() == [6]  # retention at the source is unchanged
    backed = sorted(p.name for p in (tmp_path / "backup").iterdir())
    # best so far when saved: 1 (5.0), 2 (1.0); every 3rd: 3, 6.
    assert backed == ["step_00000001", "step_00000002", "step_00000003", "step_00000006"]
    assert distckpt.restore(tmp_path / "backup" / "step_00000002")["v"][0] == 2.0
    distckpt.verify(tmp_path / "backup" / "step_00000006")
    assert mgr.backup_errors == []


def test_retention_waits_for_a_step_s_backup_before_deleting_it(tmp_path, monkeypatch):
    # max_to_keep=1 deletes each step at the next save; a slow backup of it
    # must still find it (it used to fail with "no checkpoint at ...").
    import distckpt._copy

    real_copy = distckpt._copy.copy

    def slow_copy(*args, **kwargs):
        time.sleep(0.3)
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(distckpt._copy, "copy", slow_copy)
    with distckpt.CheckpointManager(
        tmp_path / "run", async_save=True, max_to_keep=1, backup_to=tmp_path / "backup"
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"v": np.full(8, float(step))})
    assert mgr.backup_errors == []
    assert mgr.all_steps() == [3]
    backed = sorted(p.name for p in (tmp_path / "backup").iterdir())
    assert backed == ["step_00000001", "step_00000002", "step_00000003"]
    assert distckpt.restore(tmp_path / "backup" / "step_00000001")["v"][0] == 1.0


def test_a_failed_backup_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "not_a_dir").write_text("a file where the backups should go")
    with caplog.at_level("WARNING", logger="distckpt"):
        with distckpt.CheckpointManager(
            tmp_path / "run", async_save=False, backup_to=tmp_path / "not_a_dir"
        ) as mgr:
            mgr.save(1, {"v": np.zeros(4)})
            mgr.wait_for_backups()
            mgr.save(2, {"v": np.ones(4)})  # training goes on
    assert len(mgr.backup_errors) == 2 and "backup of step 1" in mgr.backup_errors[0]
    assert "backup of step 1" in caplog.text


# ------------------------------------------------------------------ black-box defects (issue 18)


def test_opening_a_directory_never_deletes_a_running_save(tmp_path):
    from distckpt._save import SaveJob

    _run(tmp_path, steps=1)
    # Another job is writing step 2: its attempt exists and is locked.
    job = SaveJob(str(tmp_path / "step_00000002"), _tiny(2), manager={"step": 2, "metrics": None})
    job.start(copy=True)
    # ... and an overwrite of step 1 is in flight too.
    over = SaveJob(str(tmp_path / "step_00000001"), _tiny(1), overwrite=True)
    over.start(copy=True)
    attempts_1 = sorted(os.listdir(tmp_path / "step_00000001"))

    assert distckpt.CheckpointHandler().latest_step(tmp_path) == 1
    assert distckpt.CheckpointManager(tmp_path).all_steps() == [1]
    assert sorted(os.listdir(tmp_path / "step_00000001")) == attempts_1
    assert (tmp_path / "step_00000002" / job.attempt).is_dir()

    job.finish()
    over.finish()
    mgr = distckpt.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1, 2]
    assert mgr.restore(2)["x"].tolist() == [2] * 4
    # Once nothing holds them, leftovers of crashed saves do go.
    (tmp_path / "step_00000007" / "attempt-0123456789abcdef").mkdir(parents=True)
    distckpt.CheckpointManager(tmp_path)
    assert not (tmp_path / "step_00000007").exists()


def test_an_object_store_s_running_save_is_left_alone_until_it_is_old(tmp_path):
    from distckpt import _knobs
    from distckpt._save import SaveJob

    root = f"memory://hygiene-{os.getpid()}"
    _run(root, steps=1)
    job = SaveJob(f"{root}/step_00000002", _tiny(2), manager={"step": 2, "metrics": None})
    job.start(copy=True)
    assert distckpt.CheckpointManager(root).all_steps() == [1]
    job.finish()
    assert distckpt.CheckpointManager(root).all_steps() == [1, 2]

    crashed = SaveJob(f"{root}/step_00000003", _tiny(3), manager={"step": 3, "metrics": None})
    crashed.start(copy=True)  # never finished: the job died
    distckpt.CheckpointManager(root)
    assert "step_00000003" in _storage.open_storage(root).entries()  # young: may be running
    with _knobs.override(live_attempt_s=0.0):
        distckpt.CheckpointManager(root)
    assert "step_00000003" not in _storage.open_storage(root).entries()


def test_nan_and_missing_metrics_never_count_as_best(tmp_path):
    from distckpt._tools import scan as _scan

    losses = {1: float("nan"), 2: 0.3, 3: float("inf"), 4: None, 5: 0.9}
    mgr = distckpt.CheckpointManager(tmp_path, best_metric="loss", keep_best=1, max_to_keep=1)
    for step, loss in losses.items():
        mgr.save(step, _tiny(step), metrics=None if loss is None else {"loss": loss})
    mgr.wait_until_finished()
    assert mgr.best_step() == 2
    assert mgr.all_steps() == [2, 5]
    assert distckpt.CheckpointManager(tmp_path, best_metric="loss").best_step() == 2
    assert _scan.best_step(_scan.scan(tmp_path).steps, "loss", "min") == ("loss", 2)
    assert _scan.best_step(_scan.scan(tmp_path).steps, "loss", "max") == ("loss", 5)


@pytest.mark.parametrize("bad", [None, "low", [0.1], {"a": 1}])
def test_a_metric_that_is_not_a_number_is_refused_before_writing(tmp_path, bad):
    mgr = distckpt.CheckpointManager(tmp_path, best_metric="loss")
    with pytest.raises(TypeError, match="metric 'loss' is"):
        mgr.save(1, _tiny(1), metrics={"loss": bad})
    assert _on_disk(tmp_path) == []
    mgr.save(1, _tiny(1), metrics={"loss": 0.5})  # the manager is not poisoned
    mgr.wait_until_finished()
    assert mgr.best_step() == 1


def test_reopening_tolerates_any_metrics_record_on_disk(tmp_path):
    from distckpt._save import SaveJob

    for step, metrics in [(1, {"loss": None}), (2, {"loss": "x"}), (3, ["loss"]), (4, {"loss": 2})]:
        job = SaveJob(str(tmp_path / f"step_{step:08d}"), _tiny(step))
        job.manager = {"step": step, "metrics": metrics}  # as an older or foreign writer left it
        job.start(copy=False)
        job.finish()
    mgr = distckpt.CheckpointManager(tmp_path, best_metric="loss", keep_best=1)
    assert mgr.all_steps() == [1, 2, 3, 4] and mgr.best_step() == 4
    mgr.save(5, _tiny(5), metrics={"loss": 1.0})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [5] and mgr.best_step() == 5  # retention ran: best + latest


def test_numpy_and_jax_scalars_as_steps_and_metrics(tmp_path):
    mgr = distckpt.CheckpointManager(tmp_path, best_metric="loss", keep_best=1, max_to_keep=1)
    mgr.save(np.int64(1), _tiny(1), metrics={"loss": jnp.float32(0.25), "n": np.int32(3)})
    mgr.save(jnp.int32(2), _tiny(2), metrics={"loss": np.float64(0.5), "ok": np.bool_(True)})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 2] and mgr.best_step() == 1
    assert mgr.metrics(1) == {"loss": 0.25, "n": 3}
    assert type(mgr.metrics(1)["n"]) is int and type(mgr.metrics(2)["ok"]) is int
    assert distckpt.CheckpointManager(tmp_path).metrics(2) == {"loss": 0.5, "ok": 1}
    with pytest.raises(TypeError, match="step must be an int"):
        mgr.save(2.5, _tiny(3))
    with pytest.raises(TypeError, match="not a number"):
        mgr.save(3, _tiny(3), metrics={"loss": jnp.zeros(2)})


def test_steps_must_be_non_negative_increasing_and_the_manager_open(tmp_path):
    mgr = distckpt.CheckpointManager(tmp_path, max_to_keep=1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        mgr.save(-1, _tiny(1))
    mgr.save(5, _tiny(5))
    mgr.wait_until_finished()
    with pytest.raises(ValueError, match="steps must increase"):
        mgr.save(3, _tiny(3))
    assert mgr.all_steps() == [5]
    assert mgr.save(5, _tiny(6), overwrite=True, force=True)  # replacing the latest is allowed
    mgr.close()
    with pytest.raises(ValueError, match="closed CheckpointManager"):
        mgr.save(6, _tiny(6))
    assert _on_disk(tmp_path) == ["step_00000005"]
    assert distckpt.restore(tmp_path / "step_00000005")["x"].tolist() == [6] * 4


def test_save_refuses_an_empty_path_and_the_filesystem_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is empty"):
        distckpt.save("", _tiny(1))
    with pytest.raises(ValueError, match="is empty"):
        distckpt.save("file://", _tiny(1))
    with pytest.raises(ValueError, match="filesystem root"):
        distckpt.save("/", _tiny(1))
    with pytest.raises(ValueError, match="is empty"):
        distckpt.restore("")
    assert os.listdir(tmp_path) == []
