"""Save and restore with real local processes forming one JAX job (tests/mp.py)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.mp import case_value, run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_multiprocess"
W_SHAPE = (64, 48)


def _reference() -> dict:
    return {
        "w": np.arange(W_SHAPE[0] * W_SHAPE[1], dtype=np.float32).reshape(W_SHAPE),
        "rep": np.linspace(0, 1, 40, dtype=np.float32),
        "half": np.arange(16 * 8, dtype=np.int32).reshape(16, 8),
        "table": np.arange(10, dtype=np.int64),
    }


def _state():
    """The train-state-like tree every saving worker builds on a (2, 4) mesh."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("x", "y"))
    ref = _reference()

    def put(value, spec):
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda i: value[i]
        )

    return {
        "params": {"w": put(ref["w"], P("x", "y")), "rep": put(ref["rep"], P())},
        "half": put(ref["half"], P(None, "y")),  # replicated over x: two copies, stored once
        "table": ref["table"],
        "rng": jax.random.key(7),
        "step": 12,
        "name": "run-1",
    }


def _target(mesh_shape, names, specs):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh(mesh_shape, names)
    ref = _reference()
    return {
        "params": {
            "w": jax.ShapeDtypeStruct(W_SHAPE, jnp.float32, sharding=NamedSharding(mesh, specs[0])),
            "rep": jax.ShapeDtypeStruct(
                ref["rep"].shape, jnp.float32, sharding=NamedSharding(mesh, specs[1])
            ),
        },
        "half": jax.ShapeDtypeStruct(
            ref["half"].shape, jnp.int32, sharding=NamedSharding(mesh, specs[0])
        ),
        "table": np.zeros(10, np.int64),
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
        "step": 0,
        "name": "",
    }


def _check(out) -> None:
    import jax

    ref = _reference()
    for shard in out["params"]["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), ref["w"][shard.index])
    for shard in out["half"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), ref["half"][shard.index])
    for shard in out["params"]["rep"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), ref["rep"][shard.index])
    np.testing.assert_array_equal(out["table"], ref["table"])
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(out["rng"])),
        np.asarray(jax.random.key_data(jax.random.key(7))),
    )
    assert out["step"] == 12 and out["name"] == "run-1"


def _w_save(directory: str) -> dict:
    import jax

    import distckpt

    distckpt.save(directory, _state(), metadata={"step": 12}, timeout_s=30)
    return {"process": jax.process_index(), "committed": distckpt.is_committed(directory)}


def _w_restore(directory: str, mesh_shape: list, names: list, specs: list) -> int:
    import jax
    from jax.sharding import PartitionSpec as P

    import distckpt

    specs = [P(*(tuple(n) if isinstance(n, list) else n for n in s)) for s in specs]
    out = distckpt.restore(directory, _target(tuple(mesh_shape), tuple(names), specs), timeout_s=30)
    _check(out)
    assert out["params"]["w"].sharding.spec == specs[0]
    return jax.process_index()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("mp") / "ckpt")
    results = run_processes(f"{HERE}:_w_save", 2, 4, args={"directory": directory})
    assert [r.value for r in results] == [
        {"process": 0, "committed": True},
        {"process": 1, "committed": True},
    ]
    return directory


def test_save_2x4_writes_each_shard_once(saved):
    import distckpt

    info = distckpt.metadata(saved)
    assert info.process_count == 2 and info.device_count == 8
    ref = _reference()
    unique = sum(v.nbytes for v in ref.values()) + 8  # + the 2 x uint32 key data
    assert info.total_bytes == unique, "replicated data must be stored exactly once"
    files = sorted(f for _, _, fs in os.walk(saved) for f in fs)
    assert files == [
        "manifest.json",
        "p00000.idx",
        "p00000.s000.bin",
        "p00001.idx",
        "p00001.s000.bin",
    ]
    assert info.leaves["['params']['w']"].sharding == {
        "type": "NamedSharding",
        "mesh": {"x": 2, "y": 4},
        "spec": ["x", "y"],
    }
    distckpt.verify(saved)


@pytest.mark.parametrize(
    "procs,devices,mesh_shape,specs",
    [
        (1, 8, (8,), [["d", None], []]),
        (4, 2, (4, 2), [["b", "a"], ["a"]]),
        (1, 1, (1,), [[], []]),
        (2, 4, (4, 2), [[None, ["a", "b"]], ["b"]]),
    ],
    ids=["1x8", "4x2", "1x1", "2x4-other-spec"],
)
def test_restore_on_other_topologies(saved, procs, devices, mesh_shape, specs):
    names = ["d"] if len(mesh_shape) == 1 else ["a", "b"]
    results = run_processes(
        f"{HERE}:_w_restore",
        procs,
        devices,
        args={"directory": saved, "mesh_shape": list(mesh_shape), "names": names, "specs": specs},
    )
    assert sorted(r.value for r in results) == list(range(procs))


def test_restore_in_this_process_1x8(saved):
    import jax
    from jax.sharding import PartitionSpec as P

    import distckpt

    assert jax.device_count() == 8
    out = distckpt.restore(saved, _target((2, 4), ("p", "q"), [P("q", "p"), P("p")]))
    _check(out)


# --------------------------------------------------------------------------- failures


def _w_kill(directory: str, victim: int, where: str) -> str:
    """Saves once cleanly, then saves again and SIGKILLs ``victim`` at ``where``."""
    import jax

    import distckpt
    from distckpt import _storage

    distckpt.save(directory, _state(), timeout_s=20)
    me = jax.process_index()
    if me == victim:
        original = {
            "before_report": _storage.PosixStorage.finish_attempt_writes,
            "before_rename": _storage.PosixStorage.commit_manifest,
            "after_rename": _storage.PosixStorage.commit_manifest,
        }[where]

        def die(self, *args):
            if where == "after_rename":
                original(self, *args)
            os.kill(os.getpid(), signal.SIGKILL)

        name = "finish_attempt_writes" if where == "before_report" else "commit_manifest"
        setattr(_storage.PosixStorage, name, die)
    distckpt.save(directory, _state(), overwrite=True, timeout_s=20)
    return "survived"


KILLS = [(1, "before_report"), (0, "before_rename"), (0, "after_rename")]


def _check_the_killed_job(directory: str, victim: int, where: str) -> None:
    """Runs the job whose ``victim`` is killed at ``where``; checks it and what it left."""
    import distckpt

    start = time.monotonic()
    results = run_processes(
        f"{HERE}:_w_kill",
        2,
        4,
        args={"directory": directory, "victim": victim, "where": where},
        check=False,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert results[victim].returncode == -signal.SIGKILL
    survivor = results[1 - victim]
    assert survivor.returncode != 0, "the survivor must not report success"
    assert elapsed < 45, f"survivors took {elapsed:.0f} s to go down"
    # Whatever happened, a committed checkpoint is there and intact: the first
    # save's (killed before the commit point) or the second's (killed after).
    info = distckpt.metadata(directory)
    distckpt.verify(directory)
    out = distckpt.restore(directory)
    np.testing.assert_array_equal(out["params"]["w"], _reference()["w"])
    # Two attempts are on disk: the first save's and the interrupted second's.
    # Which one the manifest names says which side of the commit point the
    # kill fell on.
    attempts = sorted(
        (e for e in os.listdir(directory) if e.startswith("attempt-")),
        key=lambda e: os.stat(os.path.join(directory, e)).st_mtime_ns,
    )
    assert len(attempts) == 2, attempts
    committed = _committed_attempt(directory)
    assert committed == (attempts[1] if where == "after_rename" else attempts[0])
    assert info.process_count == 2


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[str, dict, list]:
    """Every case's killed job, checked at once (a failure is kept for the case's
    test); then one job saves over every case's checkpoint in turn
    (tests/mp.py:each_case)."""
    root = str(tmp_path_factory.mktemp("killed"))
    failures: dict[str, BaseException | None] = {}
    for victim, where in KILLS:
        case = f"{victim}-{where}"
        try:
            _check_the_killed_job(os.path.join(root, case), victim, where)
            failures[case] = None
        except Exception as e:  # noqa: BLE001 - raised again by the case's test
            failures[case] = e
    cases = {
        f"{v}-{w}": [f"{HERE}:_w_save_over", {"directory": os.path.join(root, f"{v}-{w}")}]
        for v, w in KILLS
    }
    return root, failures, run_processes("tests.mp:each_case", 2, 4, args={"cases": cases})


# The killed jobs, and the one that saves over their checkpoints, run in the
# first case's set-up (hence its time limit: four jobs).
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim,where", KILLS)
def test_killed_process(killed, victim, where):
    root, failures, saved_over = killed
    case = f"{victim}-{where}"
    directory = os.path.join(root, case)
    if failures[case] is not None:  # the killed job, or what it left, is not as it must be
        raise failures[case]
    # The next save succeeds and cleans the leftovers of the interrupted one.
    for r in saved_over:
        case_value(r, case)
    leftovers = [e for e in os.listdir(directory) if e.startswith("attempt-")]
    assert leftovers == [_committed_attempt(directory)]


def _committed_attempt(directory: str) -> str:
    import json

    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)["attempt"]


def _w_save_over(directory: str) -> None:
    import distckpt

    distckpt.save(directory, _state(), overwrite=True, timeout_s=30)


def _w_raise(directory: str, phase: str, victim: int) -> dict:
    """Makes ``victim`` raise inside ``phase``; returns what each process saw."""
    import jax

    import distckpt
    from distckpt import _storage

    target = {"write": "writer", "commit": "commit_manifest", "prepare": "prepare_attempt"}[phase]
    original = getattr(_storage.PosixStorage, target)
    if jax.process_index() == victim:

        def boom(self, *args, **kwargs):
            raise OSError(5, f"injected I/O error in {phase}")

        setattr(_storage.PosixStorage, target, boom)
    try:
        distckpt.save(directory, _state(), timeout_s=20)
    except distckpt.errors.DistckptError as e:
        return {
            "type": type(e).__name__,
            "message": str(e),
            "processes": getattr(e, "processes", None),
        }
    finally:
        setattr(_storage.PosixStorage, target, original)
    return {"type": None}


RAISE_CASES = [("write", 1), ("write", 0), ("commit", 0), ("prepare", 0)]


@pytest.fixture(scope="module")
def raised(tmp_path_factory) -> tuple[str, list]:
    """Every case of test_exception_on_one_process_is_raised_on_all, one after the other
    in one job (tests/mp.py:each_case; the job carries on after each failed save)."""
    root = str(tmp_path_factory.mktemp("raise"))
    cases = {
        f"{phase}-{victim}": [
            f"{HERE}:_w_raise",
            {
                "directory": os.path.join(root, f"{phase}-{victim}"),
                "phase": phase,
                "victim": victim,
            },
        ]
        for phase, victim in RAISE_CASES
    }
    return root, run_processes("tests.mp:each_case", 2, 4, args={"cases": cases}, timeout=150)


@pytest.mark.parametrize("phase,victim", RAISE_CASES)
def test_exception_on_one_process_is_raised_on_all(raised, phase, victim):
    import distckpt

    root, seen = raised
    case = f"{phase}-{victim}"
    directory = os.path.join(root, case)
    for value in (case_value(r, case) for r in seen):
        assert value["type"] == "ProcessFailure", value
        assert value["processes"] == [victim]
        assert (
            f"process {victim}: OSError: [Errno 5] injected I/O error in {phase}"
            in value["message"]
        )
    assert not distckpt.is_committed(directory)
    leftovers = os.listdir(directory) if os.path.isdir(directory) else []
    assert not [e for e in leftovers if e.startswith("attempt-")], leftovers


def _w_stall(directory: str) -> dict:
    import jax

    import distckpt
    from distckpt import _storage

    if jax.process_index() == 1:
        original = _storage.PosixStorage.finish_attempt_writes

        def slow(self, *args):
            time.sleep(4)
            return original(self, *args)

        _storage.PosixStorage.finish_attempt_writes = slow
    start = time.monotonic()
    try:
        distckpt.save(directory, _state(), timeout_s=1.5)
    except distckpt.errors.DistckptError as e:
        return {
            "type": type(e).__name__,
            "missing": getattr(e, "missing", None),
            "seconds": time.monotonic() - start,
        }
    return {"type": None}


def test_stalled_process_times_out_on_every_process(tmp_path):
    import distckpt

    directory = str(tmp_path / "ckpt")
    results = run_processes(f"{HERE}:_w_stall", 2, 4, args={"directory": directory})
    first = results[0].value
    assert first["type"] == "BarrierTimeoutError" and first["missing"] == [1], first
    assert first["seconds"] < 1.5 + 3, first
    assert results[1].value["type"] == "BarrierTimeoutError", results[1].value
    assert not distckpt.is_committed(directory)


def _w_different_trees(directory: str) -> str:
    import jax
    import jax.numpy as jnp

    import distckpt

    tree = {"a": jnp.ones(3)}
    if jax.process_index() == 1:
        tree["b"] = jnp.ones(2)
    try:
        distckpt.save(directory, tree, timeout_s=20)
    except distckpt.errors.TreeMismatchError as e:
        return str(e)
    return ""


def test_processes_with_different_trees_all_refuse(tmp_path):
    results = run_processes(
        f"{HERE}:_w_different_trees", 2, 2, args={"directory": str(tmp_path / "c")}
    )
    for r in results:
        assert "processes [1] passed a tree" in r.value


def _w_restore_same(directory: str) -> dict:
    import jax
    from jax.sharding import PartitionSpec as P

    import distckpt

    try:
        distckpt.restore(directory, _target((2, 4), ("x", "y"), [P("x", "y"), P()]), timeout_s=20)
    except distckpt.errors.CorruptCheckpointError as e:
        return {"processes": e.processes, "problems": e.problems, "process": jax.process_index()}
    return {}


def test_corruption_seen_by_one_process_fails_restore_on_all(saved, tmp_path):
    import shutil

    work = str(tmp_path / "corrupt")
    shutil.copytree(saved, work)
    attempt = _committed_attempt(work)
    victim = os.path.join(work, attempt, "p00001.s000.bin")  # only process 1 reads it back
    with open(victim, "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 0x10]))
    results = run_processes(f"{HERE}:_w_restore_same", 2, 4, args={"directory": work})
    for r in results:
        assert r.value["processes"] == [1], r.value
        assert len(r.value["problems"]) == 1 and "p00001.s000.bin" in r.value["problems"][0]
