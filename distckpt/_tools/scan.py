"""What a CheckpointManager directory holds: steps, leftovers, their sizes and ages.

Read-only. Used by ``distckpt ls``, ``audit`` and ``gc``. The names are the
manager's (see docs/manager.md): ``step_XXXXXXXX`` per step,
``.step_XXXXXXXX.deleting-<id>`` for a deletion in progress; inside a step,
``attempt-<id>/`` per save attempt and ``.manifest.json.tmp-attempt-<id>``
for a commit in progress (see docs/format.md).

A leftover is *stale* when no running save holds the lock of an attempt in
it (a save flocks ``<attempt>/.lock`` from creating the attempt until it
commits or gives up) and nothing in it was modified for ``min_age_s``
seconds. The age rule covers filesystems without working locks and saves
that predate them: a save writes its files continuously and waits at most
``DISTCKPT_TIMEOUT_S`` (300 s by default) between phases, so a leftover
untouched for longer than that belongs to no live save; the default
``min_age_s`` of one hour leaves a wide margin.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from distckpt import _location, _steps, _storage
from distckpt._layout import (
    ATTEMPT_PREFIX,
    MANIFEST_NAME,
    TMP_MANIFEST_PREFIX,
    is_ours,
)
from distckpt._retention import metric_value, rank
from distckpt._sources import orbax as _orbax

DEFAULT_MIN_AGE_S = 3600.0

# kinds of leftovers
INTERRUPTED_SAVE = "uncommitted step"  # a step directory without a manifest
HALF_DELETED = "half-deleted step"  # .step_X.deleting-<id>
STALE_ATTEMPT = "unreferenced attempt"  # attempt-<id> in a committed step, not its manifest's
TMP_MANIFEST_KIND = "temporary manifest"  # .manifest.json.tmp-attempt-<id>


@dataclass
class Leftover:
    """Something a save or a deletion left behind (never a committed step)."""

    path: str
    kind: str
    bytes: int
    age_s: float  # since the newest modification of anything inside it
    stale: bool  # older than min_age_s: no live save holds it
    step: int | None = None
    removable: bool = True  # False: holds files distckpt did not write
    note: str = ""
    locked: bool = False  # a running save holds the lock of an attempt in it

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Step:
    """One ``step_XXXXXXXX`` directory."""

    step: int
    path: str
    state: str  # "committed", "uncommitted" or "damaged" (manifest.json unreadable)
    why: str = ""  # for uncommitted or damaged steps
    bytes: int = 0  # committed: the manifest's data files; otherwise bytes on disk
    manifest_bytes: int = 0
    process_count: int | None = None
    device_count: int | None = None
    created: str = ""
    metrics: dict | None = None
    save_stats: dict | None = None
    bytes_per_process: list[int] = field(default_factory=list)
    attempt: str | None = None
    storage: dict | None = None  # the manager's storage-budget projection, if it had a budget

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Scan:
    directory: str
    steps: list[Step]  # sorted by step
    leftovers: list[Leftover]
    foreign: list[str]  # entries that are not the manager's (never touched)
    min_age_s: float
    is_checkpoint: bool = False  # the directory is itself one checkpoint, not a manager's


def tree_size_and_mtime(path: str) -> tuple[int, float]:
    """Bytes of all files under ``path`` and the newest mtime of anything in it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0.0
    if not os.path.isdir(path):
        return st.st_size, st.st_mtime
    total, newest = 0, st.st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                s = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # removed while we looked
            newest = max(newest, s.st_mtime)
            if name in files:
                total += s.st_size
    return total, newest


def attempt_locked(step_dir: str, attempt: str) -> bool:
    """Whether a running save holds ``attempt``'s lock (``<attempt>/.lock``, flock).

    False when unlocked, when there is no lock file (a crashed save, or one
    from a distckpt without locks) or when the filesystem cannot tell.
    """
    try:
        return _storage.PosixStorage(step_dir).attempt_live(attempt)
    except OSError:
        return False  # e.g. a read-only mount: cannot open the lock to test it


def _leftover(
    path: str,
    kind: str,
    min_age_s: float,
    now: float,
    *,
    listing: list[str] | None = None,
    step: int | None = None,
    note: str = "",
) -> Leftover:
    """``listing``: what ``path`` holds, if the caller has listed it already."""
    size, newest = tree_size_and_mtime(path)
    age = max(0.0, now - newest)
    if kind in (INTERRUPTED_SAVE, HALF_DELETED):
        if listing is None:
            listing = _storage.PosixStorage(path).entries()
        attempts = [e for e in listing if e.startswith(ATTEMPT_PREFIX)]
        locked = any(attempt_locked(path, a) for a in attempts)
    elif kind == STALE_ATTEMPT:
        locked = attempt_locked(os.path.dirname(path), os.path.basename(path))
    else:
        locked = False
    stale = age >= min_age_s and not locked
    return Leftover(path, kind, size, age, stale, step=step, note=note, locked=locked)


def read_attempt(step_dir: str) -> tuple[str | None, str]:
    """(attempt the step's checked manifest names, "") or (None, why not)."""
    manifest, _, why = _steps.read_checked(_storage.PosixStorage(step_dir))
    if manifest is not None:
        return manifest.attempt, ""
    return None, why or f"no {MANIFEST_NAME}"


def _committed_step(entry: _steps.StepEntry, path: str) -> Step:
    m = entry.manifest
    assert m is not None
    per_process = [0] * max(1, m.process_count)
    for info in m.files.values():
        p = int(info["process"])
        if p >= len(per_process):
            per_process.extend([0] * (p + 1 - len(per_process)))
        per_process[p] += int(info["bytes"])
    record = m.manager if isinstance(m.manager, dict) else {}
    return Step(
        step=entry.step,
        path=path,
        state="committed",
        bytes=sum(per_process),
        manifest_bytes=entry.manifest_bytes,
        process_count=m.process_count,
        device_count=m.device_count,
        created=m.created,
        metrics=entry.metrics,
        save_stats=m.save_stats,
        bytes_per_process=per_process,
        attempt=m.attempt,
        storage=record.get("storage") if isinstance(record.get("storage"), dict) else None,
    )


def _damaged(entry: _steps.StepEntry, path: str, size: int = 0) -> Step:
    why = f"{MANIFEST_NAME} is damaged ({entry.why})"
    return Step(entry.step, path, "damaged", why=why, bytes=size)


def _inside_step(
    path: str, attempt: str | None, min_age_s: float, now: float, step: int | None
) -> list[Leftover]:
    """Attempts and temporary manifests in a step directory that its manifest does not name."""
    out = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if entry.startswith(ATTEMPT_PREFIX) and entry != attempt:
            out.append(_leftover(full, STALE_ATTEMPT, min_age_s, now, step=step))
        elif entry.startswith(TMP_MANIFEST_PREFIX) and entry != f"{TMP_MANIFEST_PREFIX}{attempt}":
            out.append(_leftover(full, TMP_MANIFEST_KIND, min_age_s, now, step=step))
    return out


def scan_orbax(directory: _location.Location) -> Scan | None:
    """An Orbax CheckpointManager directory as a scan (``distckpt ls``); None if it is not one.

    Steps only: an Orbax save that did not finish is listed as uncommitted,
    and nothing is a leftover for ``gc`` (Orbax cleans up its own).
    """
    if not isinstance(directory, (str, os.PathLike)):
        return None
    top = os.path.abspath(os.fspath(directory))
    found = _orbax.manager_steps(top)
    if found is None:
        return None
    steps = []
    for s in found:
        size, _ = tree_size_and_mtime(s.path)
        created = ""
        if s.created_ns:
            created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s.created_ns / 1e9))
        steps.append(
            Step(
                step=s.step,
                path=s.path,
                state="committed" if s.committed else "uncommitted",
                why=""
                if s.committed
                else "an Orbax save that did not finish (temporary directory)",
                bytes=size,
                created=created,
                metrics=s.metrics,
                process_count=s.process_count,
            )
        )
    return Scan(top, steps, [], [], 0.0)


def scan(
    directory: _location.Location,
    *,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    now: float | None = None,
) -> Scan:
    """Looks at a manager directory (or a single checkpoint directory); writes nothing.

    Steps and manifests are read through the engine's one walker
    (``_steps.walk``), so a step is listed as committed exactly when a
    restore would accept its manifest. On a filesystem, sizes, ages and
    locks come from the files themselves.

    Raises:
      FileNotFoundError / NotADirectoryError: ``directory`` is not a directory.
    """
    now = time.time() if now is None else now
    loc = _location.parse(directory)
    if loc.spec is not None:
        return _scan_kv(loc, min_age_s)  # s3://, gs://, memory://, a kvstore spec
    top = loc.path
    assert top is not None  # parse() gives a spec or a path
    if not os.path.isdir(top):
        what = "does not exist" if not os.path.exists(top) else "is not a directory"
        raise FileNotFoundError(
            f"{top} {what}; pass a CheckpointManager directory (it holds step_XXXXXXXX "
            "subdirectories) or a checkpoint directory"
        )
    root = _storage.PosixStorage(top)
    if os.path.exists(os.path.join(top, MANIFEST_NAME)):
        return _scan_checkpoint(root, min_age_s, now)
    found = _steps.walk(root)
    steps, leftovers, foreign = [], [], list(found.foreign)
    for name, number in found.deleting:
        path = os.path.join(top, name)
        if not os.path.isdir(path):
            foreign.append(name)
            continue
        leftovers.append(
            _leftover(
                path,
                HALF_DELETED,
                min_age_s,
                now,
                step=number,
                note="a deletion by retention or delete() that did not finish",
            )
        )
    for entry in found.steps:
        path = os.path.join(top, entry.name)
        if entry.state == _steps.DAMAGED:
            size, _ = tree_size_and_mtime(path)
            steps.append(_damaged(entry, path, size))
            continue
        if entry.state == _steps.COMMITTED:
            s = _committed_step(entry, path)
            steps.append(s)
            leftovers += _inside_step(path, s.attempt, min_age_s, now, entry.step)
            continue
        inside = entry.inside
        ours = [e for e in inside if is_ours(e)]  # no manifest here, so: attempts, temp manifests
        left = _leftover(path, INTERRUPTED_SAVE, min_age_s, now, listing=inside, step=entry.step)
        others = sorted(set(inside) - set(ours))
        if others:
            left.removable = False
            left.note = f"also holds files distckpt did not write: {', '.join(others[:5])}"
        if not ours:
            why = "empty" if not inside else f"no {MANIFEST_NAME} and no save attempt"
        else:
            when = f"last written {format_age(left.age_s)} ago"
            if left.locked:
                state = "a save is in progress (it holds the attempt's lock)"
            elif left.stale:
                state = "an interrupted save"
            else:
                state = "a save may be in progress"
            why = f"no {MANIFEST_NAME}: {len(ours)} save attempt(s), {when}; {state}"
        left.note = left.note or why
        steps.append(Step(entry.step, path, "uncommitted", why=why, bytes=left.bytes))
        leftovers.append(left)
    foreign.sort()
    return Scan(top, steps, leftovers, foreign, min_age_s)


def _single(root: _storage.Storage) -> _steps.StepEntry:
    """The checkpoint at ``root`` as a step entry (its manager record's step, or 0)."""
    entry = _steps.entry(root, "", 0)
    if entry.manifest is not None and isinstance(entry.manifest.manager, dict):
        number = entry.manifest.manager.get("step")
        entry.step = number if isinstance(number, int) else 0
    return entry


def _scan_checkpoint(root: _storage.PosixStorage, min_age_s: float, now: float) -> Scan:
    directory = root.path
    entry = _single(root)
    if entry.state != _steps.COMMITTED:
        return Scan(directory, [_damaged(entry, directory)], [], [], min_age_s, is_checkpoint=True)
    step = _committed_step(entry, directory)
    leftovers = _inside_step(directory, step.attempt, min_age_s, now, None)
    return Scan(directory, [step], leftovers, [], min_age_s, is_checkpoint=True)


_KV_NOTE = (
    "on an object store gc leaves it (no locks, no ages to tell it from a save in "
    "progress); a CheckpointManager removes it when it starts, once its start mark is "
    "older than DISTCKPT_LIVE_ATTEMPT_S"
)


def _scan_kv(location: _location.ParsedLocation, min_age_s: float) -> Scan:
    """``scan`` of an object store or kvstore location, through the storage layer.

    Leftovers are reported but never marked removable: without locks or
    reliable ages, gc cannot tell them from a save in progress.
    """
    root = _storage.open_storage(location)
    where = root.display.rstrip("/")

    def inside(storage: _storage.Storage, path: str, attempt: str | None, step: int | None):
        return [
            Leftover(f"{path}/{a}", STALE_ATTEMPT, 0, 0.0, False, step, False, _KV_NOTE)
            for a in storage.attempts()
            if a != attempt
        ]

    if root.read_manifest() is not None:
        entry = _single(root)
        if entry.state != _steps.COMMITTED:
            return Scan(where, [_damaged(entry, where)], [], [], min_age_s, is_checkpoint=True)
        step = _committed_step(entry, where)
        return Scan(
            where,
            [step],
            inside(root, where, step.attempt, None),
            [],
            min_age_s,
            is_checkpoint=True,
        )
    found = _steps.walk(root)
    steps, leftovers = [], []
    for entry in found.steps:
        path = f"{where}/{entry.name}"
        if entry.state == _steps.UNCOMMITTED:
            why = f"no {MANIFEST_NAME}: an interrupted save, or a save in progress"
            steps.append(Step(entry.step, path, "uncommitted", why=why))
            leftovers.append(
                Leftover(path, INTERRUPTED_SAVE, 0, 0.0, False, entry.step, False, _KV_NOTE)
            )
        elif entry.state == _steps.DAMAGED:
            steps.append(_damaged(entry, path))
        else:
            s = _committed_step(entry, path)
            steps.append(s)
            leftovers += inside(entry.storage, path, s.attempt, entry.step)
    return Scan(where, steps, leftovers, sorted(found.foreign), min_age_s)


def format_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def best_step(steps: list[Step], metric: str | None, mode: str) -> tuple[str | None, int | None]:
    """(metric used, best committed step) the manager's way: ties go to the newer step.

    With ``metric=None``: the first metric every committed step with metrics recorded.
    """
    committed = [s for s in steps if s.state == "committed" and s.metrics]
    if metric is None:
        common = None
        for s in committed:
            assert s.metrics  # committed keeps only steps with metrics
            keys = [k for k in s.metrics if metric_value(s.metrics, k) is not None]
            common = keys if common is None else [k for k in common if k in keys]
        if not common:
            return None, None
        metric = common[0]
    ranked = rank({s.step: s.metrics for s in committed}, metric, mode)
    return metric, ranked[0] if ranked else None
