"""``distckpt audit``: one report over a CheckpointManager directory.

Integrity of every step (a full ``verify``), bytes per step and per process
(imbalance), growth over steps, the save timings the manager recorded in
each manifest (``save_stats``), what retention kept, and leftovers. Read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distckpt import _inspect
from distckpt._tools import scan as _scan
from distckpt.errors import DistckptError


def report(
    scan: _scan.Scan,
    *,
    verify: bool = True,
    on_step: Callable[[_scan.Step], None] | None = None,
) -> dict[str, Any]:
    """The audit as a JSON-ready dict.

    ``problems`` lists damaged or corrupt committed steps, ``warnings`` stale
    leftovers that ``distckpt gc`` would remove.
    """
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    previous: int | None = None
    for s in scan.steps:
        row: dict[str, Any] = {"step": s.step, "path": s.path, "state": s.state, "bytes": s.bytes}
        if s.state != "committed":
            row["why"] = s.why
            if s.state == "damaged":
                problems.append(f"step {s.step}: {s.why}")
            rows.append(row)
            if on_step:
                on_step(s)
            continue
        stats = s.save_stats or {}
        per = list(s.bytes_per_process)
        mean = sum(per) / len(per) if per else 0
        row.update(
            created=s.created,
            processes=s.process_count,
            bytes_per_process=per,
            imbalance=(max(per) / mean) if mean else None,
            growth_bytes=None if previous is None else s.bytes - previous,
            growth_pct=None if not previous else 100.0 * (s.bytes - previous) / previous,
            blocking_s=stats.get("blocking_s"),
            write_s=stats.get("write_s"),
            commit_s=stats.get("commit_s"),
            files=stats.get("files"),
            metrics=s.metrics,
        )
        previous = s.bytes
        if verify:
            try:
                v = _inspect.verify(s.path)
                row["integrity"] = "ok"
                row["verify_s"] = v.seconds
            except DistckptError as e:
                row["integrity"] = "corrupt"
                row["integrity_problems"] = list(getattr(e, "problems", []) or [str(e)])
                problems.append(
                    f"step {s.step}: corrupt ({len(row['integrity_problems'])} problem(s)); "
                    f"run `distckpt verify {s.path}` for the details"
                )
        else:
            row["integrity"] = "not checked"
        rows.append(row)
        if on_step:
            on_step(s)

    committed = [r for r in rows if r["state"] == "committed"]
    steps = [r["step"] for r in committed]
    gaps = sorted({b - a for a, b in zip(steps, steps[1:], strict=False)})
    half_deleted = [lo for lo in scan.leftovers if lo.kind == _scan.HALF_DELETED]
    stale = [lo for lo in scan.leftovers if lo.stale and lo.removable]
    live = [lo for lo in scan.leftovers if not lo.stale]
    warnings = []
    for lo in stale:
        warnings.append(
            f"stale {lo.kind}: {lo.path} ({_scan.format_bytes(lo.bytes)}, "
            f"{_scan.format_age(lo.age_s)} old); `distckpt gc {scan.directory}` removes it"
        )
    sizes = [r["bytes"] for r in committed]
    latest = next((s for s in reversed(scan.steps) if s.state == "committed"), None)
    return {
        "directory": scan.directory,
        "steps": rows,
        "totals": {
            "committed_steps": len(committed),
            "bytes": sum(sizes),
            "leftover_bytes": sum(lo.bytes for lo in scan.leftovers),
            "largest_step_bytes": max(sizes, default=0),
            "growth_bytes": (sizes[-1] - sizes[0]) if len(sizes) > 1 else 0,
            "max_imbalance": max(
                (r["imbalance"] for r in committed if r.get("imbalance")), default=None
            ),
        },
        "usage": _usage(sizes, latest.storage if latest is not None else None),
        "retention": {
            "kept_steps": steps,
            "intervals": gaps,
            "latest_step": steps[-1] if steps else None,
            "interrupted_deletions": [lo.path for lo in half_deleted],
            "uncommitted_steps": [s.step for s in scan.steps if s.state == "uncommitted"],
        },
        "leftovers": [lo.to_json() for lo in scan.leftovers],
        "saves_in_progress": [lo.path for lo in live],
        "foreign": scan.foreign,
        "problems": problems,  # damaged or corrupt steps: exit code 1
        "warnings": warnings,  # stale leftovers: gc removes them
    }


def plot(audit: dict[str, Any], destination: str) -> None:
    """Save timings and sizes over steps, as a PNG (matplotlib, imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from e
    rows = [r for r in audit["steps"] if r["state"] == "committed"]
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in ("blocking_s", "write_s", "commit_s"):
        top.plot(steps, [r.get(key) or 0.0 for r in rows], marker="o", label=key)
    top.set_ylabel("seconds")
    top.set_title(f"saves in {audit['directory']}")
    top.legend()
    bottom.plot(steps, [r["bytes"] / 2**20 for r in rows], marker="o", label="total")
    nproc = max((len(r["bytes_per_process"]) for r in rows), default=0)
    if nproc > 1:
        for p in range(nproc):
            bottom.plot(
                steps,
                [
                    (r["bytes_per_process"][p] if p < len(r["bytes_per_process"]) else 0) / 2**20
                    for r in rows
                ],
                linestyle="--",
                label=f"process {p}",
            )
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(destination)
    plt.close(fig)


def _usage(sizes: list[int], budget: dict | None) -> dict[str, Any]:
    """Bytes on storage now, what the next save will likely add, and the budget."""
    growth = (sizes[-1] - sizes[0]) / (len(sizes) - 1) if len(sizes) > 1 else 0
    next_step = max(0, round(sizes[-1] + growth)) if sizes else None
    return {
        "bytes": sum(sizes),
        "mean_step_bytes": round(sum(sizes) / len(sizes)) if sizes else None,
        "growth_per_step_bytes": round(growth),
        "next_step_bytes": next_step,
        # With the same number of steps kept: the oldest goes, the next one comes.
        "projected_bytes": sum(sizes[1:]) + next_step if next_step is not None else None,
        "budget": budget,  # recorded by a CheckpointManager with storage_budget_bytes
    }
