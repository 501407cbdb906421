"""The commit protocol's decisions: what is committed, and what may become so.

See docs/protocol.md for who calls what, in what order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import crc32c

from distckpt import _chunks, _codec, _index, _layout, _plan, _tree
from distckpt._index import Grid, IndexRef
from distckpt._manifest import MANIFEST_NAME, Manifest
from distckpt._plan import LeafSpec
from distckpt._storage import Preflight, Storage, named_attempt
from distckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    DistckptError,
    InconsistentProcessesError,
    NotCommittedError,
    OutOfSpaceError,
)

_KINDS = (_tree.ARRAY, _tree.NUMPY, _tree.PRNG_KEY, _tree.PYTHON, _tree.NONE)


def load(storage: Storage, raw: bytes | None = None) -> Manifest:
    """Reads the committed manifest (or checks ``raw``, its bytes read already), or
    explains why there is none."""
    if raw is None:
        raw = storage.read_manifest()
    if raw is None:
        raise not_committed(storage)
    _chunks.count_metadata(len(raw))
    where = f"{storage.display}/{MANIFEST_NAME}"
    try:
        manifest = Manifest.from_json(raw, where)
    except AttributeError as e:  # valid JSON, but not an object (``null``, ``[]``)
        raise CorruptCheckpointError(
            f"{where} is not a readable distckpt manifest (not a JSON object). The "
            "checkpoint's metadata is damaged; restore an older step or a backup.",
            [f"{where}: not a JSON object"],
        ) from e
    _check_manifest(manifest, where)
    return manifest


def identity(manifest: Manifest, raw: bytes) -> str:
    """What names one commit record, whatever path reached it: its attempt and checksum."""
    return f"{manifest.attempt}:{crc32c.crc32c(raw):08x}"


def check_same_checkpoint(opened: list[dict], op: str) -> None:
    """Refuses, on every process alike, a collective whose processes read different commits.

    ``opened`` is each process's ``{"commit": identity(...), "where": location}``.
    """
    refuse_if_different(
        [o["commit"] for o in opened],
        lambda p: f"{opened[p]['where']} (commit {opened[p]['commit']})",
        f"{op}: the processes read different checkpoints",
        f"Nothing was returned: {op} is collective and every process must name the same "
        "checkpoint. Pass the same path on every process, and choose steps from values every "
        "process shares (for metrics, all-reduce them first; a CheckpointManager ranks by the "
        "primary's).",
    )


def refuse_if_different(
    values: list[Any], describe: Callable[[int], str], head: str, advice: str
) -> None:
    """Raises ``InconsistentProcessesError`` if the processes' ``values`` differ.

    The message lists each group of processes that agree, described by its
    first process (``describe(p)``); ``.processes`` names every process that
    differs from process 0.
    """
    groups: dict[str, list[int]] = {}
    for p, value in enumerate(values):
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(p)
    if len(groups) == 1:
        return
    lines = "".join(f"\n  processes {ps}: {describe(ps[0])}" for ps in groups.values())
    err = InconsistentProcessesError(f"{head}:{lines}\n{advice}")
    err.processes = [p for ps in list(groups.values())[1:] for p in ps]
    raise err


def _count(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
    )


def _check_manifest(m: Manifest, where: str) -> None:
    """Refuses a manifest that parses but describes no checkpoint a save writes.

    Names in a manifest become paths: the attempt and file names must stay
    inside the checkpoint directory (no ``../``, no separators). Shapes,
    sizes and offsets must be non-negative integers, and each chunk must lie
    inside its file, so that a damaged or hostile manifest gives this error,
    not a read elsewhere or a giant allocation. Leaf key paths are only dict
    keys and never name files.
    """
    problems = []
    if not _count(m.format_version) or m.format_version < 1:
        problems.append(
            f"format_version {m.format_version!r} was never written (versions start at 1)"
        )
    if not isinstance(m.attempt, str) or not _layout.ATTEMPT_RE.fullmatch(m.attempt):
        problems.append(f"attempt {m.attempt!r} is not an attempt directory name (attempt-<id>)")
    for name, info in m.files.items():
        if not _plain_name(name):
            problems.append(f"data file {name!r} is not a plain file name inside the attempt")
        if not _count(info.get("bytes")):
            problems.append(f"data file {name!r} has size {info.get('bytes')!r}")
    indexed = {ref.process for ref in m.indexes or []}
    if m.indexes is not None:
        problems += _index_ref_problems(m)
    for i, spec in enumerate(m.leaves):
        chunks = m.chunks[i] if m.chunks is not None else []
        if spec.kind not in _KINDS:
            problems.append(f"{spec.display}: unknown leaf kind {spec.kind!r}")
        if not spec.stored:
            continue
        if spec.compression is not None and spec.compression not in _codec.CODECS:
            problems.append(f"{spec.display}: unknown compression {spec.compression!r}")
            continue
        shape = spec.shape
        if not isinstance(shape, tuple) or not all(_count(n) for n in shape):
            problems.append(f"{spec.display}: shape {shape!r} is not a list of sizes")
            continue
        try:
            if not isinstance(spec.dtype, str):  # np_dtype(None) is the default float
                raise TypeError(spec.dtype)
            itemsize = spec.itemsize
            if _plan.np_dtype(spec.dtype).hasobject:  # bytes would become pointers
                raise TypeError(spec.dtype)
        except (TypeError, ValueError, AttributeError):
            problems.append(f"{spec.display}: unknown dtype {spec.dtype!r}")
            continue
        if math.prod(shape) * itemsize >= 1 << 63:
            problems.append(f"{spec.display}: shape {list(shape)} is absurd ({spec.dtype})")
            continue
        if m.grids is not None:
            grid = m.grids[i]
            assert grid is not None  # _manifest parses a grid for every stored leaf
            problems += [f"{spec.display}: {p}" for p in _index.check_grid(grid, m.process_count)]
            silent = sorted(grid.writers - indexed)
            if silent and spec.nbytes:
                problems.append(
                    f"{spec.display}: written by processes {silent}, which have no index"
                )
        for c in chunks:
            box_ok = len(c.box) == len(shape) and all(
                len(r) == 2 and _count(r[0]) and _count(r[1]) and r[0] <= r[1] for r in c.box
            )
            size = m.files[c.file]["bytes"]
            if not (box_ok and _count(c.offset) and _count(c.nbytes) and _count(size)):
                problems.append(f"{spec.display}: malformed chunk record {c}")
            elif c.offset + c.nbytes > size:
                problems.append(
                    f"{spec.display}: chunk at {c.file} bytes {c.offset}..{c.offset + c.nbytes} "
                    f"lies past the end of the file ({size} bytes)"
                )
    if problems:
        raise CorruptCheckpointError(
            f"{where} does not describe a valid checkpoint ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20])
            + "\nThe checkpoint's metadata is damaged; restore an older step or a backup.",
            [f"{where}: {p}" for p in problems],
        )


def _index_ref_problems(m: Manifest) -> list[str]:
    problems = []
    seen = set()
    for ref in m.indexes or []:
        if not (_count(ref.process) and ref.process < m.process_count) or ref.process in seen:
            problems.append(f"index of process {ref.process!r} names no process of the save")
        seen.add(ref.process)
        if not _plain_name(ref.name) or ref.name != _layout.index_file(ref.process):
            problems.append(f"index file {ref.name!r} is not the index name of its process")
        if not (
            _count(ref.nbytes)
            and _count(ref.head_bytes)
            and ref.head_bytes <= ref.nbytes
            and _count(ref.crc32c)
            and _count(ref.chunks)
        ):
            problems.append(f"index {ref.name!r} has a malformed size, checksum or count")
    return problems


def not_committed(storage: Storage) -> NotCommittedError:
    where = storage.display
    if storage.is_file():
        return NotCommittedError(
            f"no checkpoint at {where}: it is a file, not a checkpoint directory. Pass the "
            "directory the checkpoint was saved to (it holds manifest.json)."
        )
    if not storage.exists():
        return NotCommittedError(
            f"no checkpoint at {where}: the path does not exist. Check the path."
        )
    entries = storage.entries()
    attempts = [e for e in entries if e.startswith(_layout.ATTEMPT_PREFIX)]
    if attempts:
        return NotCommittedError(
            f"{where} holds data of {len(attempts)} save attempt(s) ({', '.join(attempts[:3])}) "
            f"but no {MANIFEST_NAME}: a save was interrupted before it committed, so this is not "
            "a checkpoint. Restore an earlier step; the next save here cleans the leftovers."
        )
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
    return NotCommittedError(
        f"{where} is not a distckpt checkpoint (no {MANIFEST_NAME}; it holds: {shown or 'nothing'}). "
        "Wrong path? For a CheckpointManager directory, pass a step's subdirectory."
    )


def preflight(storage: Storage, *, overwrite: bool, estimated_bytes: int) -> Preflight:
    """Primary, before any data is written: overwrite policy and free space.

    Returns what was found, which the commit takes: it enforces the policy
    again, atomically (on an object store, conditional on the manifest
    generation read here).
    """
    found = storage.preflight(overwrite=overwrite)
    if not overwrite and found.manifest is not None:
        raise CheckpointExistsError(
            f"a committed checkpoint already exists at {storage.display}; pass overwrite=True to "
            "replace it (the old one stays readable until the new one commits) or choose another path."
        )
    free = storage.free_bytes()
    if free is not None and estimated_bytes > free:
        raise OutOfSpaceError(
            f"not enough free space at {storage.display}: the checkpoint needs about "
            f"{estimated_bytes} bytes and {free} are free. Nothing was written; free space "
            "(fewer kept steps) or save elsewhere."
        )
    return found


@dataclass(frozen=True)
class Report:
    """What one process tells the primary after its write phase (JSON through the
    coordination service): O(its files), never its chunk records."""

    process: int
    files: dict[str, int]  # data file name -> bytes
    index: IndexRef | None  # its chunk index; None if it wrote nothing
    plan: str  # digest of the grids it planned with (_index.plan_digest)
    planned_bytes: int  # bytes of the shards it checked against the plan and wrote
    timing: dict[str, float]

    def to_json(self) -> bytes:
        doc = {**asdict(self), "index": self.index.to_json() if self.index else None}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Report:
        doc = json.loads(raw)
        index = IndexRef.from_json(doc["index"]) if doc["index"] else None
        return cls(**{**doc, "index": index})


def build_root(
    *,
    attempt: str,
    specs: list[LeafSpec],
    grids: list[Grid | None],
    reports: list[Report],
    process_count: int,
    device_count: int,
    user_metadata: object,
    created: str,
    versions: dict[str, str],
    structure: list | None = None,
) -> Manifest:
    """Primary: the commit record, in O(processes + leaves + files).

    Coverage is proven from the plan, not by merging chunk records: every
    grid tiles its leaf and gives each cell one writer (``_index.build_grid``),
    every process planned with the same grids (their digests agree), and
    each checked that it wrote exactly its cells (``_index.check_own_writes``),
    which the bytes they report confirm.
    """
    refuse_if_different(
        [r.plan for r in reports],
        lambda p: f"plan {reports[p].plan[:12]}",
        "save: the processes planned different layouts for the same tree",
        "Nothing was committed. Every process must pass arrays with the same global "
        "shardings (the same mesh and PartitionSpec for each leaf).",
    )
    problems = [
        f"{spec.display}: {p}"
        for spec, grid in zip(specs, grids, strict=True)
        if grid is not None
        for p in _index.check_grid(grid, process_count)
    ]
    planned = sum(r.planned_bytes for r in reports)
    expected = sum(s.nbytes for s in specs)
    if planned != expected:
        by = ", ".join(f"process {r.process}: {r.planned_bytes}" for r in reports[:8])
        problems.append(
            f"the processes wrote {planned} bytes of shards ({by}), the tree holds {expected}"
        )
    if problems:
        raise DistckptError(
            "refusing to commit: the processes' writes do not cover the state exactly once:\n  "
            + "\n  ".join(problems[:20])
            + "\nThis is a bug in distckpt or a tree that differs between processes; please report it."
        )
    files = {
        name: {"process": r.process, "bytes": n} for r in reports for name, n in r.files.items()
    }
    return Manifest(
        attempt=attempt,
        leaves=specs,
        chunks=None,
        files=files,
        process_count=process_count,
        device_count=device_count,
        user_metadata=user_metadata,
        created=created,
        versions=versions,
        structure=structure,
        grids=list(grids),
        indexes=sorted((r.index for r in reports if r.index), key=lambda ref: ref.process),
    )


def discard_unless_committed(storage: Storage, attempt: str) -> None:
    """Primary, after a failed save: removes the attempt's data, unless the
    manifest already names it (the failure came after the commit point)."""
    try:
        raw = storage.read_manifest()
        if raw is not None and named_attempt(raw) == attempt:
            return
        storage.remove_attempt(attempt)
    except (OSError, ValueError):
        pass  # best effort: the next successful save removes leftovers too
    finally:
        storage.release_attempt(attempt)


def commit(storage: Storage, manifest: Manifest, preflight: Preflight) -> None:
    """Primary: makes the attempt the checkpoint, then removes older attempts."""
    # IMPORTANT: called only after every process reported that its files are
    # written and fsync'd (the barrier of the write phase).
    try:
        storage.commit_manifest(manifest.to_json(), manifest.attempt, preflight)
        # Leftovers of failed saves go; an attempt another job is still
        # writing into this directory does not (it is live).
        storage.remove_stale_attempts(manifest.attempt, preflight)
    finally:
        storage.release_attempt(manifest.attempt)
