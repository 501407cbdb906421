"""The benchmark's planning and target checks, without starting any process.

Timings are never asserted here: performance is what ``scripts/bench.py`` measures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", SCRIPTS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_case_plans_operations_for_both_systems(bench, tmp_path):
    args = bench.parse_args(["--quick", "--reps", "2"])
    plan = bench.Plan(args, tmp_path)
    groups = plan.groups()
    assert [g.name for g in groups] == [
        "large-2x4",
        "large-1x8",
        "large-4x2",
        "single-1x8",
        "small-1x8",
        "train-2x4",
        "async-2x4",
    ]
    rows = [r.key for g in groups for r in g.rows]
    enabled = {(s, r) for s in plan.systems for r in rows}
    for g in groups:
        ops = g.build_ops(enabled)
        measured = {(op["system"], op["row"]) for op in ops if "system" in op}
        for row in g.rows:
            for system in plan.systems:
                assert (system, row.key) in measured or row.key.endswith("background")
    assert 301 == plan.train_leaves


def test_orbax_runs_fewer_repetitions_above_slow_leaves(bench, tmp_path):
    args = bench.parse_args(["--reps", "3", "--small-leaves", "20,20000", "--cases", "small"])
    plan = bench.Plan(args, tmp_path)
    (group,) = plan.groups()
    rows = [r.key for r in group.rows]
    ops = group.build_ops({(s, r) for s in plan.systems for r in rows})

    def reps(system, row):
        return sorted(op["rep"] for op in ops if op.get("system") == system and op["row"] == row)

    assert reps("distckpt", "ssave20000") == [0, 1, 2, 3]  # warm-up + 3
    assert reps("orbax", "ssave20000") == [3]  # --slow-reps 1, last repetition, measured
    assert reps("orbax", "srestore20") == [0, 1, 2, 3]
    assert group.extra_timeout_s > 0


def test_a_failed_save_disables_the_restores_of_its_checkpoint(bench):
    enabled = {("distckpt", r) for r in ("ssave2000", "srestore2000", "save", "r4x2")}
    errors = {}
    bench.disable("distckpt", "ssave2000", "boom", enabled, errors)
    assert enabled == {("distckpt", "save"), ("distckpt", "r4x2")}
    assert "save failed" in errors[("distckpt", "srestore2000")]


def test_targets_report_ratios_and_skip_cases_not_run(bench, tmp_path):
    plan = bench.Plan(bench.parse_args(["--quick"]), tmp_path)

    def row(key, system, seconds, **more):
        return {"row": key, "system": system, "seconds": seconds, "kind": "save", **more}

    summaries = [
        row("save", "distckpt", 1.0),
        row("save", "orbax", 2.0),
        row("save", "floor", 0.9),
        row("r4x2", "distckpt", 1.0, kind="restore", read_amplification=1.0),
        row("r4x2", "orbax", 1.5, kind="restore", read_amplification=1.9),
    ]
    targets = {t["target"]: t for t in bench.evaluate_targets(summaries, plan)}
    assert targets["save throughput / fsync'd write floor"]["measured"] == pytest.approx(0.9)
    assert targets["save throughput / fsync'd write floor"]["met"] is True
    assert targets["save: Orbax s / distckpt s"]["met"] is True
    assert targets["restore 2x4 -> 4x2: Orbax s / distckpt s"]["met"] is False
    assert targets["read amplification 2x4 -> 4x2"]["detail"] == "Orbax 1.90"
    assert not any("async" in t for t in targets)  # the async case did not run
    assert any("NOT MET" in line for line in bench.target_lines(list(targets.values())))


def test_the_memory_case_holds_save_and_restore_to_its_budget(bench, tmp_path):
    args = bench.parse_args(["--cases", "memory", "--memory-size", "1", "--memory-budget", "128"])
    plan = bench.Plan(args, tmp_path)
    (group,) = plan.groups()
    assert group.topology.processes == 1 and plan.memory_bytes == 1 << 30
    ops = group.build_ops({("distckpt", r.key) for r in group.rows})
    measured = [op for op in ops if op.get("system") == "distckpt"]
    assert {op["row"] for op in measured} == {"msave", "mcopy", "mrestore"}
    assert all(op["memory_bytes"] == 128 << 20 for op in measured)
    assert [op["row"] for op in measured if op.get("simulate_device")] == ["mcopy"] * 4

    def row(key, kind, extra, owned=512.0):
        return {
            "row": key,
            "system": "distckpt",
            "kind": kind,
            "title": key,
            "seconds": 1.0,
            "extra_rss_mib_per_process": [extra],
            "owned_mib_per_process": [owned],
        }

    summaries = [row("msave", "save", 100.0), row("mrestore", "restore", 64.0)]
    summaries += [row("mcopy", "save", 200.0), row("abackground", "async", 600.0)]
    targets = bench.evaluate_targets(summaries, plan)
    met = {t["target"].split(",")[1].split(":")[0].strip(): t["met"] for t in targets}
    # The async save's copy of what it owns (512 MiB) is its contract, not extra.
    assert met == {"msave": True, "mrestore": True, "mcopy": False, "abackground": True}


def test_the_local_tier_case_plans_distckpt_alone(bench, tmp_path):
    args = bench.parse_args(["--quick", "--reps", "2", "--cases", "local"])
    plan = bench.Plan(args, tmp_path)
    groups = plan.groups()
    assert [g.name for g in groups] == ["local-2x4", "local-4x2"]
    for g in groups:
        rows = [r.key for r in g.rows]
        ops = g.build_ops({(s, r) for s in plan.systems for r in rows})
        assert {op["system"] for op in ops} == {"distckpt"}
        kinds = [op["op"] for op in ops if op["rep"] == 0]
        assert kinds == ["local_save", "async_save", "local_recover", "restore"]
        recover = next(op for op in ops if op["op"] == "local_recover")
        assert recover["wipe"] == 1 and recover["step"] == 1
        assert all(r.systems == ("distckpt",) for r in g.rows)


def test_the_formats_case_is_extra_and_its_table_renders(bench):
    assert "formats" in bench.CASES and "formats" not in bench.DEFAULT_CASES
    result = {
        "bytes": 1 << 30,
        "files": 4,
        "reps": 3,
        "rows": [
            {
                "format": "orbax",
                "system": "distckpt",
                "seconds": 2.0,
                "read_per_process": [473 << 20, 473 << 20],
            },
            {
                "format": "safetensors",
                "system": "safetensors+device_put",
                "seconds": 4.0,
                "read_per_process": [0, 0],
            },
        ],
    }
    lines = bench.formats_lines(result)
    assert (
        "Orbax (StandardCheckpointer)" in lines[3] and "0.50" in lines[3] and "473/473" in lines[3]
    )
    assert "HF safetensors, 4 shards" in lines[4] and "0.25" in lines[4]
