"""The one walker of a CheckpointManager directory, through the storage layer.

The manager's start-up, ``distckpt ls``, ``gc`` and ``audit`` all see a
directory through :func:`walk`: which entries are steps (committed, with
their checked manifest; uncommitted; damaged), which are deletions in
progress, and which are foreign. A step is committed only if its manifest
reads back *and* passes the same checks as a restore (its checksum
included): a listing only proposes names. Reads only; never deletes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distckpt import _commit, _layout
from distckpt._manifest import Manifest
from distckpt._storage import Storage
from distckpt.errors import CorruptCheckpointError


class State(enum.StrEnum):
    """What a step entry is (the strings are what ``distckpt ls --json`` prints)."""

    COMMITTED = "committed"  # its manifest reads back and passes restore's checks
    UNCOMMITTED = "uncommitted"  # no manifest: a save in progress or an interrupted one
    DAMAGED = "damaged"  # a manifest that restore would refuse


COMMITTED, UNCOMMITTED, DAMAGED = State.COMMITTED, State.UNCOMMITTED, State.DAMAGED


@dataclass
class StepEntry:
    """One ``step_XXXXXXXX`` entry."""

    name: str
    step: int
    storage: Storage
    state: State
    manifest: Manifest | None = None  # committed: the checked commit record
    manifest_bytes: int = 0
    why: str = ""  # damaged: what is wrong with the manifest
    inside: list[str] = field(default_factory=list)  # uncommitted: what the entry holds

    @property
    def metrics(self) -> dict | None:
        """The metrics the manager recorded with this step (whatever is on disk; may be None)."""
        record = self.manifest.manager if self.manifest is not None else None
        metrics = record.get("metrics") if isinstance(record, dict) else None
        return metrics if isinstance(metrics, dict) else None


@dataclass
class Walk:
    steps: list[StepEntry]  # sorted by step
    deleting: list[tuple[str, int]]  # (entry name, step) of deletions in progress
    foreign: list[str]  # everything else: never ours, never touched


def read_checked(storage: Storage) -> tuple[Manifest | None, int, str]:
    """(manifest, its size, "") if committed and intact; (None, 0, why) if damaged;
    (None, 0, "") if there is no manifest."""
    raw = storage.read_manifest()
    if raw is None:
        return None, 0, ""
    try:
        return _commit.load(storage, raw), len(raw), ""
    except CorruptCheckpointError as e:
        return None, len(raw), str(e).splitlines()[0]


def entry(storage: Storage, name: str, step: int) -> StepEntry:
    """What the step directory ``name`` (at ``storage``) holds."""
    manifest, size, why = read_checked(storage)
    if manifest is not None:
        return StepEntry(name, step, storage, COMMITTED, manifest, size)
    if why:
        return StepEntry(name, step, storage, DAMAGED, manifest_bytes=size, why=why)
    return StepEntry(name, step, storage, UNCOMMITTED, inside=storage.entries())


def walk(parent: Storage) -> Walk:
    """Classifies every entry of the manager directory at ``parent``."""
    steps, deleting, foreign = [], [], []
    for name in parent.entries():
        m = _layout.DELETING_RE.match(name)
        if m:
            deleting.append((name, int(m[1])))
            continue
        m = _layout.STEP_RE.match(name)
        if not m:
            foreign.append(name)
            continue
        child = parent.child(name)
        if child.is_file():
            foreign.append(name)  # a file named like a step is not one
            continue
        steps.append(entry(child, name, int(m[1])))
    steps.sort(key=lambda s: s.step)
    return Walk(steps, deleting, foreign)
