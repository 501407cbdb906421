"""``distckpt gc``: removes stale leftovers of saves and deletions, never a committed step.

Rules (see ``_scan`` for what *stale* means: no running save holds its
lock, and nothing in it was modified for ``--min-age``):

* only what ``_scan`` lists as a leftover, and only when it is stale and
  holds nothing but what distckpt writes;
* a step directory is first renamed aside to ``.step_X.deleting-<id>`` (the
  manager's own name for a deletion in progress, atomic), then checked
  again: if a ``manifest.json`` appeared in the meantime (a save committed
  after all), it is renamed back and kept;
* an attempt inside a committed step is removed only if the step's
  manifest, read again just before, still does not name it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from distckpt._layout import ATTEMPT_PREFIX, MANIFEST_NAME, TMP_MANIFEST_PREFIX, deleting_name
from distckpt._tools import scan as _scan


@dataclass
class Outcome:
    path: str
    kind: str
    bytes: int
    action: str  # "removed", "would remove", "kept"
    reason: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def plan(scan: _scan.Scan) -> list[Outcome]:
    """What gc would do with each leftover (pure: decides from the scan)."""
    out = []
    for left in scan.leftovers:
        if not left.removable:
            out.append(Outcome(left.path, left.kind, left.bytes, "kept", left.note))
        elif left.locked:
            out.append(
                Outcome(left.path, left.kind, left.bytes, "kept", "a running save holds its lock")
            )
        elif not left.stale:
            out.append(
                Outcome(
                    left.path,
                    left.kind,
                    left.bytes,
                    "kept",
                    f"modified {_scan.format_age(left.age_s)} ago, less than --min-age "
                    f"{_scan.format_age(scan.min_age_s)}: a save may still hold it",
                )
            )
        else:
            out.append(Outcome(left.path, left.kind, left.bytes, "would remove"))
    return out


def run(scan: _scan.Scan, *, dry_run: bool) -> list[Outcome]:
    """Executes ``plan(scan)`` unless ``dry_run``; returns what happened to each leftover."""
    outcomes = plan(scan)
    if dry_run:
        return outcomes
    for o in outcomes:
        if o.action != "would remove":
            continue
        try:
            o.action, o.reason = _remove(o)
        except OSError as e:
            o.action, o.reason = "kept", f"could not remove it: {e}"
    return outcomes


def _remove(o: Outcome) -> tuple[str, str]:
    parent, name = os.path.split(o.path)
    if o.kind == _scan.HALF_DELETED:
        shutil.rmtree(o.path, ignore_errors=True)
        return "removed", ""
    if o.kind == _scan.INTERRUPTED_SAVE:
        aside = os.path.join(parent, deleting_name(name))
        os.rename(o.path, aside)  # atomic: a save can no longer commit into it
        attempts = [e for e in os.listdir(aside) if e.startswith(ATTEMPT_PREFIX)]
        if os.path.exists(os.path.join(aside, MANIFEST_NAME)) or any(
            _scan.attempt_locked(aside, a) for a in attempts
        ):
            os.rename(aside, o.path)  # a save committed or started after all: put it back
            return "kept", "a save committed or started in it while gc looked"
        shutil.rmtree(aside, ignore_errors=True)
        return "removed", ""
    # An attempt or temporary manifest inside a committed step (or checkpoint).
    if name.startswith(ATTEMPT_PREFIX) and _scan.attempt_locked(parent, name):
        return "kept", "a running save holds its lock"
    attempt, why = _scan.read_attempt(parent)
    if attempt is None:
        return "kept", f"the step has no intact {MANIFEST_NAME} now ({why})"
    if name == attempt or name == f"{TMP_MANIFEST_PREFIX}{attempt}":
        return "kept", "the step's manifest names it now (a save committed it)"
    if os.path.isdir(o.path):
        shutil.rmtree(o.path, ignore_errors=True)
    else:
        os.unlink(o.path)
    return "removed", ""
