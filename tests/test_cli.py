"""The distckpt command on real checkpoints: ls, inspect, verify, diff, audit, gc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _sources
from distckpt._tools import diff as _diff
from distckpt._tools import gc as _gc
from distckpt._tools import scan as _scan
from distckpt.cli import main

COMMANDS = ["ls", "inspect", "verify", "diff", "audit", "convert", "gc"]
HOURS_AGO = time.time() - 2 * 3600


def _state(i: int) -> dict:
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) * i
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
            "b": jnp.full((32,), i, jnp.bfloat16),
        },
        "opt": [np.arange(5, dtype=np.int32), None],
        "rng": jax.random.key(i),
        "step": i,
    }


def _age(path, when=HOURS_AGO) -> None:
    """Backdates everything under ``path`` (a leftover nobody touched for hours)."""
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (when, when))
    os.utime(path, (when, when))


def _snapshot(directory) -> dict:
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def run_dir(tmp_path):
    """A manager directory: steps 1..3 committed, an interrupted step 4, a half-deleted step."""
    d = tmp_path / "run"
    with distckpt.CheckpointManager(d, async_save=False) as mgr:
        for i in (1, 2, 3):
            mgr.save(i, _state(i), metrics={"loss": [0.5, 0.2, 0.3][i - 1]})
    attempt = d / "step_00000004" / "attempt-00000000deadbeef"
    attempt.mkdir(parents=True)
    (attempt / "p00000.s000.bin").write_bytes(b"\0" * 100)
    half = d / ".step_00000000.deleting-0123abcd" / "attempt-1"
    half.mkdir(parents=True)
    (half / "p00000.s000.bin").write_bytes(b"\0" * 10)
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_on_every_command(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "Exit codes" in out
    for cmd in COMMANDS:
        assert cmd in out
        code, out_cmd, _ = _run(capsys, cmd, "--help")
        assert code == 0 and out_cmd.startswith(f"Usage: distckpt {cmd}")
    code, _, err = _run(capsys, "nosuchcommand")
    assert code == 2 and "No such command" in err


def test_ls_shows_steps_why_uncommitted_best_and_leftovers(run_dir, capsys):
    before = _snapshot(run_dir)
    code, out, _ = _run(capsys, "ls", run_dir)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "committed" in lines["1"] and "loss=0.5" in lines["1"]
    assert "*best" in lines["2"] and "*best" not in lines["3"]
    assert "uncommitted" in lines["4"] and "no manifest.json: 1 save attempt(s)" in lines["4"]
    assert "a save may be in progress" in lines["4"]  # written just now
    assert ".step_00000000.deleting-0123abcd" in out and "half-deleted step" in out

    code, out, _ = _run(capsys, "ls", run_dir, "--json", "--best-mode", "max")
    doc = json.loads(out)
    assert doc["best"] == {"metric": "loss", "mode": "max", "step": 1}
    steps = {s["step"]: s for s in doc["steps"]}
    assert [steps[i]["state"] for i in (1, 2, 3, 4)] == ["committed"] * 3 + ["uncommitted"]
    assert steps[2]["bytes"] == sum(steps[2]["bytes_per_process"]) > 8 * 1024
    assert steps[2]["process_count"] == 1 and steps[2]["metrics"] == {"loss": 0.2}
    assert {lo["kind"] for lo in doc["leftovers"]} == {_scan.HALF_DELETED, _scan.INTERRUPTED_SAVE}
    assert _snapshot(run_dir) == before  # read-only

    code, _, err = _run(capsys, "ls", run_dir / "nope")
    assert code == 2 and "does not exist" in err


def test_inspect_shows_tree_shardings_metadata_versions(tmp_path, capsys):
    distckpt.save(tmp_path / "c", _state(2), metadata={"run": "abc", "lr": 0.1})
    code, out, _ = _run(capsys, "inspect", tmp_path / "c")
    assert code == 0
    assert "distckpt format 3" in out and f"jax {jax.__version__}" in out
    assert '"run": "abc"' in out
    w_line = next(line for line in out.splitlines() if line.startswith("['params']['w']"))
    assert "(64, 32)" in w_line and "float32" in w_line
    assert "mesh(data=2, model=4) P('data', 'model')" in w_line and "8.0 KiB" in w_line
    assert "threefry2x32" in out

    code, out, _ = _run(capsys, "inspect", "--json", tmp_path / "c")
    doc = json.loads(out)
    leaves = {leaf["path"]: leaf for leaf in doc["leaves"]}
    w = leaves["['params']['w']"]
    assert w["shape"] == [64, 32] and w["dtype"] == "float32" and w["bytes"] == 64 * 32 * 4
    assert w["sharding"] == {
        "type": "NamedSharding",
        "mesh": {"data": 2, "model": 4},
        "spec": ["data", "model"],
    }
    assert leaves["['step']"]["value"] == 2 and leaves["['opt'][1]"]["kind"] == "none"
    assert doc["user_metadata"] == {"run": "abc", "lr": 0.1}
    assert doc["versions"]["jax"] == jax.__version__

    code, _, err = _run(capsys, "inspect", tmp_path)
    assert code == 2 and "not a distckpt checkpoint" in err


def _flip_byte(step_dir) -> str:
    data = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f.endswith(".bin")
    )[0]
    with open(data, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0x10]))
    return os.path.basename(data)


def test_verify_single_and_all_with_a_corrupt_step(run_dir, capsys):
    code, out, _ = _run(capsys, "verify", run_dir / "step_00000002")
    assert code == 0 and out.startswith("OK:")
    name = _flip_byte(run_dir / "step_00000002")

    code, _, err = _run(capsys, "verify", run_dir / "step_00000002")
    assert code == 1
    assert name in err and "crc32c" in err and "['params']['w']" in err

    code, out, err = _run(capsys, "verify", "--all", run_dir)
    assert code == 1
    assert "step 1: OK" in out and "step 3: OK" in out
    assert "step 2: FAILED" in err and name in err
    assert "step 4: not committed" in out
    assert "2 step(s) clean, 1 corrupt (2), 1 not committed" in out

    code, _, err = _run(capsys, "verify", run_dir / "step_00000004")
    assert code == 1 and "interrupted" in err
    code, _, err = _run(capsys, "verify", run_dir)
    assert code == 1 and "verify --all" in err


def test_verify_console_script(tmp_path):
    distckpt.save(tmp_path / "c", {"x": np.arange(10)})
    script = os.path.join(os.path.dirname(sys.executable), "distckpt")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(
        [script, "verify", str(tmp_path / "c")], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK:")
    bad = subprocess.run([script, "verify", str(tmp_path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "FAILED" in bad.stderr
    usage = subprocess.run([script, "diff"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_diff_structure_and_values(tmp_path, capsys):
    a = _state(1)
    b = _state(1)
    b["params"]["w"] = b["params"]["w"] + 1e-3  # close with atol
    b["opt"][0] = np.arange(6, dtype=np.int32)  # shape
    b["params"]["b"] = b["params"]["b"].astype(jnp.float32)  # dtype
    b["extra"] = np.zeros(2)
    del b["rng"]
    b["step"] = 7
    distckpt.save(tmp_path / "a", a)
    distckpt.save(tmp_path / "b", b)
    distckpt.save(tmp_path / "a2", _state(1))

    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "a2", "--values")
    assert code == 0
    assert "same leaves" in out and "0 different" in out

    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1
    assert "['rng']: only in A" in out and "['extra']: only in B" in out
    assert "['opt'][0]: shape (5,) in A, (6,) in B" in out
    assert "['params']['b']: dtype bfloat16 in A, float32 in B" in out

    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values", "--json")
    doc = json.loads(out)
    values = {v["path"]: v for v in doc["values"]}
    w = values["['params']['w']"]
    assert w["status"] == "different" and w["mismatched"] == 64 * 32
    assert w["max_abs"] == pytest.approx(1e-3, rel=1e-2)
    assert values["['step']"]["status"] == "different"

    code, out, _ = _run(
        capsys, "diff", tmp_path / "a", tmp_path / "b", "--values", "--atol", "0.01", "--json"
    )
    values = {v["path"]: v for v in json.loads(out)["values"]}
    assert values["['params']['w']"]["status"] == "close"
    assert code == 1  # the structure still differs


def test_value_diff_streams_slabs_and_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 7)).astype(np.float32)
    y = x.copy()
    y[17, 3] += 0.5
    y[250, 0] = np.nan
    x[5, 5] = y[5, 5] = np.nan  # NaN on both sides counts as equal
    distckpt.save(tmp_path / "x", {"v": x})
    distckpt.save(tmp_path / "y", {"v": y})
    with _sources.open_source(tmp_path / "x") as a, _sources.open_source(tmp_path / "y") as b:
        assert len(a.slabs(0, 64)) > 50  # forced into many slabs
        (d,) = list(_diff.values(a, b, atol=1e-6, slab_bytes=64))
    assert d.status == "different" and d.mismatched == 2 and d.max_abs == np.inf
    rel = abs(0.5) / abs(y[17, 3])
    assert d.max_rel >= rel * 0.999


def test_row_slabs_cut_on_chunk_edges():
    assert _sources.row_slabs((), 4, 10) == [None]
    assert _sources.row_slabs((0, 3), 4, 10) == [(0, 0)]
    slabs = _sources.row_slabs((10, 1), 1, 4, edges=[5])
    assert slabs[0][0] == 0 and slabs[-1][1] == 10
    assert all(b - a <= 4 for a, b in slabs)
    assert all(b == c for (_, b), (c, _) in zip(slabs, slabs[1:], strict=False))
    assert _sources.row_slabs((8, 2), 4, 32, edges=[4]) == [(0, 4), (4, 8)]


def test_diff_against_a_python_target_spec(tmp_path, capsys):
    distckpt.save(tmp_path / "c", {"w": np.zeros((4, 3), np.float32), "step": 1})
    spec = tmp_path / "target.py"
    spec.write_text(
        "import jax, jax.numpy as jnp\n"
        "good = {'w': jax.ShapeDtypeStruct((4, 3), jnp.float32), 'step': 0}\n"
        "def bad():\n"
        "    return {'w': jax.ShapeDtypeStruct((4, 4), jnp.float32), 'lr': 0.1}\n"
    )
    code, out, _ = _run(capsys, "diff", tmp_path / "c", f"{spec}:good")
    assert code == 0 and "same leaves" in out
    code, out, _ = _run(capsys, "diff", tmp_path / "c", f"{spec}:bad")
    assert code == 1
    assert "['w']: target shape (4, 4)" in out
    assert "['lr']: in the target but not in the checkpoint" in out
    assert "['step']: in the checkpoint" in out
    code, _, err = _run(capsys, "diff", tmp_path / "c", f"{spec}:missing")
    assert code == 2 and "has no attribute 'missing'" in err


def test_audit_reports_integrity_sizes_timings_retention_and_plots(run_dir, tmp_path, capsys):
    _age(run_dir / ".step_00000000.deleting-0123abcd")
    before = _snapshot(run_dir)
    png = tmp_path / "audit.png"
    code, out, _ = _run(capsys, "audit", run_dir, "--plot", png)
    assert code == 0, out
    assert "no problems found" in out
    assert "retention: kept steps [1, 2, 3], intervals [1]" in out
    assert "1 interrupted deletion(s)" in out and "warning: stale half-deleted step" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(run_dir) == before  # only the plot was written, outside DIR

    _flip_byte(run_dir / "step_00000003")
    code, out, _ = _run(capsys, "audit", run_dir, "--json")
    assert code == 1
    doc = json.loads(out)
    rows = {r["step"]: r for r in doc["steps"]}
    assert rows[3]["integrity"] == "corrupt" and rows[1]["integrity"] == "ok"
    assert any("crc32c" in p for p in rows[3]["integrity_problems"])
    assert rows[2]["growth_bytes"] == rows[2]["bytes"] - rows[1]["bytes"]
    for r in (rows[1], rows[2], rows[3]):
        assert r["blocking_s"] >= 0 and r["write_s"] > 0 and r["commit_s"] >= 0
        assert r["imbalance"] == 1.0 and r["bytes_per_process"] == [r["bytes"]]
    assert rows[4]["state"] == "uncommitted"
    assert doc["problems"] == [
        f"step 3: corrupt (1 problem(s)); run `distckpt verify {run_dir}/step_00000003` for the details"
    ]


def test_gc_removes_only_stale_leftovers(run_dir, capsys):
    stale_attempt = run_dir / "step_00000001" / "attempt-00000000feedface"
    stale_attempt.mkdir()
    (stale_attempt / "p00000.s000.bin").write_bytes(b"x" * 7)
    foreign = run_dir / "step_00000009"
    (foreign / "attempt-1").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    _age(foreign)

    # Everything was just written: a save may hold it; nothing goes.
    code, out, _ = _run(capsys, "gc", run_dir)
    assert code == 0 and "gc: removed 0 leftover(s)" in out
    assert "a save may still hold it" in out

    for p in (
        stale_attempt,
        run_dir / "step_00000004",
        run_dir / ".step_00000000.deleting-0123abcd",
    ):
        _age(p)
    before = _snapshot(run_dir)
    code, out, _ = _run(capsys, "gc", run_dir, "--dry-run")
    assert code == 0 and "would remove 3 leftover(s)" in out
    assert _snapshot(run_dir) == before

    code, out, _ = _run(capsys, "gc", run_dir)
    assert code == 0 and "removed 3 leftover(s)" in out
    assert sorted(os.listdir(run_dir)) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
        "step_00000009",  # holds a file distckpt did not write
    ]
    assert "notes.txt" in out
    assert not stale_attempt.exists()
    for step in (1, 2, 3):
        distckpt.verify(run_dir / f"step_{step:08d}")
    with distckpt.CheckpointManager(run_dir) as mgr:
        assert mgr.all_steps() == [1, 2, 3]


def test_gc_puts_back_a_step_that_committed_after_the_scan(tmp_path):
    run = tmp_path / "run"
    distckpt.save(run / "step_00000001", {"x": np.arange(4)})
    src = run / "step_00000001"
    pending = run / "step_00000002"
    pending.mkdir()
    shutil.copytree(
        src / next(e for e in os.listdir(src) if e.startswith("attempt-")),
        pending / "attempt-00000000000000aa",
    )
    _age(pending)
    scan = _scan.scan(str(run))
    assert [lo.path for lo in scan.leftovers] == [str(pending)]
    # The save commits between gc's scan and its removal.
    doc = json.loads((src / "manifest.json").read_bytes())
    doc["attempt"] = "attempt-00000000000000aa"
    (pending / "manifest.json").write_text(json.dumps(doc))
    (outcome,) = _gc.run(scan, dry_run=False)
    assert outcome.action == "kept" and "committed" in outcome.reason
    assert sorted(os.listdir(run)) == ["step_00000001", "step_00000002"]
    assert (pending / "manifest.json").exists()


def test_gc_never_removes_an_attempt_a_running_save_holds(tmp_path, capsys):
    import fcntl

    run = tmp_path / "run"
    distckpt.save(run / "step_00000001", {"x": np.arange(4)})
    attempt = run / "step_00000002" / "attempt-00000000000000bb"
    attempt.mkdir(parents=True)
    (attempt / "p00000.s000.bin").write_bytes(b"x" * 8)
    # What a running save holds (see PosixStorage.prepare_attempt): an flock
    # on <attempt>/.lock. Old mtimes must not matter while it is held.
    fd = os.open(attempt / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        _age(run / "step_00000002")
        code, out, _ = _run(capsys, "ls", run)
        assert "a save is in progress (it holds the attempt's lock)" in out
        code, out, _ = _run(capsys, "gc", run)
        assert code == 0 and "kept: " in out and "a running save holds its lock" in out
        assert attempt.exists()
    finally:
        os.close(fd)  # the save ends (or dies): its lock goes with it
    code, out, _ = _run(capsys, "gc", run)
    assert "removed 1 leftover(s)" in out and not (run / "step_00000002").exists()
    distckpt.verify(run / "step_00000001")


def test_verify_reports_progress_by_bytes(tmp_path, capsys):
    from distckpt import _inspect

    distckpt.save(tmp_path / "c", {"a": np.arange(10 << 20, dtype=np.float32)})  # 40 MiB
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_inspect, "_PROGRESS_BYTES", 1)  # a step per read range (16 MiB)
        report = distckpt.verify(tmp_path / "c", progress=lambda d, t: calls.append((d, t)))
        assert main(["verify", str(tmp_path / "c")]) == 0
    assert calls[-1] == (report.bytes_checked, report.bytes_checked)
    assert len(calls) == 3 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    err = capsys.readouterr().err  # not a terminal: a plain line per tenth or so
    assert err.count("verifying: ") == 2 and err.endswith(" of 40 MiB\n"), err


def test_audit_shows_usage_and_the_budget_projection(tmp_path, capsys):
    with distckpt.CheckpointManager(
        tmp_path / "run", async_save=False, max_to_keep=2, storage_budget_bytes=5000
    ) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"v": np.zeros(512 * step, np.float32)})
    assert main(["audit", str(tmp_path / "run"), "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["usage"]
    assert usage["bytes"] == 4 * 512 * (2 + 3)
    assert usage["next_step_bytes"] == 4 * 512 * 4  # the last size plus the growth per step
    assert usage["projected_bytes"] == 4 * 512 * (3 + 4)
    assert usage["budget"]["budget_bytes"] == 5000 and usage["budget"]["over_budget"] is True
    assert main(["audit", str(tmp_path / "run")]) == 0
    assert "(OVER BUDGET)" in capsys.readouterr().out


def _strict(text: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as strict JSON parsers do."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _value_rows(capsys, *argv) -> tuple[int, dict]:
    code, out, _ = _run(capsys, "diff", *argv, "--values", "--json")
    return code, {row["path"]: row for row in _strict(out)["values"]}


def test_diff_values_finite_against_infinite_is_always_different(tmp_path, capsys):
    inf = np.inf
    a = {
        "finite_vs_inf": np.array([1.0, 2.0], np.float32),
        "inf_vs_minus_inf": np.array([inf, 2.0], np.float64),
        "same_infinities": np.array([inf, -inf, 3.0], np.float32),
        "inf_vs_nan": np.array([inf], np.float32),
    }
    b = {
        "finite_vs_inf": np.array([inf, 2.0], np.float32),
        "inf_vs_minus_inf": np.array([-inf, 2.0], np.float64),
        "same_infinities": np.array([inf, -inf, 3.0], np.float32),
        "inf_vs_nan": np.array([np.nan], np.float32),
    }
    distckpt.save(tmp_path / "a", a)
    distckpt.save(tmp_path / "b", b)
    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values")
    assert code == 1
    assert "['finite_vs_inf']: different: 1/2 elements outside tolerance, max abs inf" in out
    assert "['inf_vs_minus_inf']: different: 1/2 elements outside tolerance" in out
    assert "['same_infinities']: equal (3 elements)" in out
    assert "values: 4 leaves compared: 1 equal, 0 close, 3 different" in out
    for tolerances in ([], ["--rtol", "1e-6"], ["--atol", "1e-3", "--rtol", "0.5"]):
        code, rows = _value_rows(capsys, tmp_path / "a", tmp_path / "b", *tolerances)
        assert code == 1, tolerances
        for name in ("finite_vs_inf", "inf_vs_minus_inf", "inf_vs_nan"):
            row = rows[f"['{name}']"]
            assert row["status"] == "different" and row["mismatched"] == 1, (tolerances, row)
            assert row["max_abs"] == "Infinity" and row["max_rel"] == "Infinity"
        assert rows["['same_infinities']"]["status"] == "equal"
        assert rows["['same_infinities']"]["max_abs"] == 0.0


def test_diff_nan_at_the_same_place_is_equal(tmp_path, capsys):
    tree = {"lr": float("nan"), "w": np.array([np.nan, 1.0, np.inf], np.float32), "n": 3}
    distckpt.save(tmp_path / "a", tree)
    distckpt.save(tmp_path / "b", tree)
    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "a")
    assert code == 0, out
    code, out, _ = _run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values")
    assert code == 0, out
    assert "['lr']: equal" in out and "['w']: equal (3 elements)" in out
    assert "values: 3 leaves compared: 3 equal, 0 close, 0 different" in out

    # NaN against a number (or at another position) still differs.
    distckpt.save(
        tmp_path / "c", {**tree, "lr": 0.1, "w": np.array([1.0, np.nan, np.inf], np.float32)}
    )
    code, rows = _value_rows(capsys, tmp_path / "a", tmp_path / "c")
    assert code == 1
    assert (
        rows["['lr']"]["status"] == "different" and rows["['lr']"]["detail"] == "nan in A, 0.1 in B"
    )
    assert rows["['w']"]["status"] == "different" and rows["['w']"]["mismatched"] == 2


def test_json_output_of_every_command_is_strict_json(tmp_path, capsys):
    d = tmp_path / "run"
    with distckpt.CheckpointManager(d, async_save=False) as mgr:
        for step, loss in ((1, float("nan")), (2, float("inf"))):
            tree = {"lr": float("nan"), "big": float("-inf"), "w": np.array([1.0, np.inf])}
            mgr.save(step, tree, metrics={"loss": loss})
    step1, step2 = d / "step_00000001", d / "step_00000002"
    distckpt.save(tmp_path / "ones", {"w": np.ones(2)})
    docs = {}
    for argv in (
        ["ls", d],
        ["inspect", step1],
        ["diff", step1, step2, "--values"],
        ["diff", tmp_path / "ones", step2, "--values"],
        ["audit", d],
        ["gc", d, "--dry-run"],
    ):
        code, out, _ = _run(capsys, *argv, "--json")
        assert code in (0, 1), (argv, out)
        docs[argv[0] if argv[0] != "diff" else f"diff{len(docs)}"] = _strict(out)
    assert [s["metrics"] for s in docs["ls"]["steps"]] == [{"loss": "NaN"}, {"loss": "Infinity"}]
    values = {leaf["path"]: leaf.get("value") for leaf in docs["inspect"]["leaves"]}
    assert values["['lr']"] == "NaN" and values["['big']"] == "-Infinity"
    rows = {r["path"]: r for r in docs["diff3"]["values"]}
    assert rows["['w']"]["max_abs"] == "Infinity" and rows["['w']"]["status"] == "different"


def test_verify_all_fails_where_nothing_is_committed(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(capsys, "verify", "--all", empty)
    assert code == 1
    assert f"nothing committed found at {empty}: it holds nothing" in err

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    (junk / "step_00000007" / "attempt-0000000011112222").mkdir(parents=True)
    code, out, err = _run(capsys, "verify", "--all", junk)
    assert code == 1
    assert "step 7: not committed" in out and "0 step(s) clean, 0 corrupt, 1 not committed" in out
    assert (
        f"nothing committed found at {junk}: it holds 1 uncommitted step(s) (7), "
        "1 other entry (notes.txt)" in err
    )


def test_a_step_with_a_damaged_manifest_is_listed_as_damaged_not_committed(run_dir, capsys):
    manifest = run_dir / "step_00000002" / "manifest.json"
    raw = manifest.read_bytes()
    # Still valid JSON, but the checksum no longer matches: restore refuses it.
    manifest.write_bytes(raw.replace(b'"loss":0.2', b'"loss":0.1'))
    with pytest.raises(distckpt.errors.CorruptCheckpointError):
        distckpt.restore(run_dir / "step_00000002")
    code, out, _ = _run(capsys, "ls", run_dir, "--json")
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert steps[2]["state"] == "damaged" and "checksum" in steps[2]["why"]
    assert json.loads(out)["best"]["step"] == 3  # a damaged step is never best
    _run(capsys, "gc", run_dir, "--min-age", "0")
    assert manifest.read_bytes() != raw and manifest.exists()  # gc never touches it
    with pytest.raises(distckpt.errors.CorruptCheckpointError, match="step 2 .* damaged"):
        distckpt.CheckpointManager(run_dir)
