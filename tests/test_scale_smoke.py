"""scripts/scale.py --quick runs end to end and its JSON holds every number, sanely.

Real processes (2 and 4, then 1 for the restore onto N/2) and a tiny state.
Timings are never compared with anything here: what they are is what
``scripts/scale.py`` measures (docs/scale.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# About 25 s on an idle 2-core machine, several times that when it is shared.
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

OP_FIELDS = (
    "seconds",
    "seconds_min",
    "seconds_max",
    "metadata_bytes_read_max",
    "metadata_bytes_read_total",
    "peak_rss_bytes_max",
    "rss_before_bytes_max",
    "rchar_total",
    "wchar_total",
    "round_trips_primary",
    "round_trips_other",
    "coord_bytes_primary",
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "scale.py"), "--quick", "--dir", str(out)]
        + ["--json", str(out / "scale.json"), "--plot", str(out / "scale.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "weak scaling" in done.stdout and "one-leaf" in done.stdout
    assert [p.name for p in out.iterdir() if p.name.startswith("distckpt-scale-")] == []
    return json.loads((out / "scale.json").read_text()), out


def _check_op(op, *, processes, state_bytes, kind):
    for field in OP_FIELDS:
        assert field in op, field
    assert 0 < op["seconds_min"] <= op["seconds"] <= op["seconds_max"] < 60
    assert op["reps"] == len(op["seconds_per_rep"]) == 2
    assert op["peak_rss_bytes_max"] >= op["rss_before_bytes_max"] > 50 << 20
    if processes > 1:  # a one-process job never calls the coordination service
        assert op["round_trips_primary"] > 0 and op["round_trips_other"] > 0
        phases = (
            ("save.prepare", "save.write", "save.commit")
            if kind == "save"
            else ("restore.restore",)
        )
        assert set(op["coord_primary"]) == set(phases), op["coord_primary"]
    if kind == "save":
        # every byte written once, plus the manifest (at most a few MiB here)
        assert state_bytes <= op["wchar_total"] < state_bytes + (4 << 20)
    else:
        assert op["metadata_bytes_read_max"] > 0  # every process reads the commit record
        assert state_bytes // processes <= op["rchar_max"]


def test_every_mode_and_process_count_has_every_number(result):
    data, _ = result
    assert data["errors"] == {}
    assert data["launches"] == [4, 2, 1]
    assert data["metadata_source"] and data["rss_method"]
    rows = {(r["mode"], r["processes"]): r for r in data["rows"]}
    assert set(rows) == {(m, n) for m in ("weak", "strong") for n in (2, 4)}
    for (_, n), row in rows.items():
        assert row["total_bytes"] > 0
        _check_op(row["save"], processes=n, state_bytes=row["total_bytes"], kind="save")
        _check_op(row["restore"], processes=n, state_bytes=row["total_bytes"], kind="restore")
        assert row["cross"]["processes"] == n // 2
        _check_op(row["cross"], processes=n // 2, state_bytes=row["total_bytes"], kind="restore")
    # weak: the same bytes per process; strong: the same bytes in total
    assert rows["weak", 4]["total_bytes"] > rows["weak", 2]["total_bytes"]
    assert rows["strong", 4]["total_bytes"] == rows["strong", 2]["total_bytes"]


def test_one_leaf_rows_and_targets(result):
    data, out = result
    one = {r["processes"]: r for r in data["one_leaf"]}
    assert set(one) == {2, 4}
    for r in one.values():
        assert 0 < r["floor_3_phases_s"] < 10 and 0 < r["save_s"] < 10 and 0 < r["restore_s"] < 10
        # a non-primary reads O(1) values per operation, whatever N is
        assert 0 < r["calls_per_op"]["wait_at_barrier"]
    # ... the same calls at 2 and 4 processes, but for a restore's listing:
    # the process whose vote completes the agreement count skips it
    # (docs/protocol.md, Phases), in any share of the repetitions.
    two, four = one[2]["calls_per_op"], one[4]["calls_per_op"]
    assert two.keys() == four.keys()
    for k in two:
        skipped = k in ("key_value_dir_get", "dir_entries_read")
        assert abs(two[k] - four[k]) <= (0.5 if skipped else 0), (k, two, four)
    targets = data["targets"]
    assert len(targets) == 5  # time and CPU of save and restore; the one-leaf latency
    for t in targets:
        assert t["measured"] > 0 and isinstance(t["met"], bool) and t["goal"]
    assert (out / "scale.png").stat().st_size > 10_000
