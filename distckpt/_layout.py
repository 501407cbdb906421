"""Every name distckpt gives to something on disk (or under an object-store prefix).

One checkpoint (docs/format.md)::

    <root>/manifest.json                      the commit record
    <root>/attempt-<id>/p<proc>.s<seg>.bin    data files of one save attempt
    <root>/attempt-<id>/p<proc>.idx           that process's chunk index (format 3)
    <root>/attempt-<id>/.lock                 held by a running save (filesystems)
    <root>/attempt-<id>/.started              when a save began (object stores)
    <root>/.manifest.json.tmp-attempt-<id>    a commit in progress (filesystems)

A CheckpointManager's directory (docs/manager.md)::

    <dir>/step_<8 digits>/                    one checkpoint per committed step
    <dir>/.step_<8 digits>.deleting-<id>/     a step being deleted

Everything else in a directory is foreign: never listed as ours, never deleted.
"""

from __future__ import annotations

import re
import uuid

MANIFEST_NAME = "manifest.json"
ATTEMPT_PREFIX = "attempt-"
ATTEMPT_RE = re.compile(r"attempt-[0-9A-Za-z_-]+")
# Where a POSIX commit writes the manifest before renaming it: <prefix><attempt>.
TMP_MANIFEST_PREFIX = f".{MANIFEST_NAME}.tmp-"
# Held (flock) by the primary of a save from before its attempt directory
# appears until its commit or discard ends: clean-up must not delete an
# attempt that is still being written.
LOCK_NAME = ".lock"
# Written first into an attempt on a kvstore (no locks there): when it started.
STARTED_NAME = ".started"
# Suffix of an attempt directory while it is being created (and locked).
CREATING_SUFFIX = ".creating"

STEP_RE = re.compile(r"^step_(\d+)$")
DELETING_RE = re.compile(r"^\.step_(\d+)\.deleting-[0-9a-f]+$")


def new_attempt() -> str:
    """A fresh attempt name: ``attempt-`` and 16 hex digits of a random UUID."""
    return f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:16]}"


def data_file(process: int, segment: int) -> str:
    """The name of a process's ``segment``-th data file of one save."""
    return f"p{process:05d}.s{segment:03d}.bin"


def index_file(process: int) -> str:
    """The name of a process's chunk index in one save (format version 3)."""
    return f"p{process:05d}.idx"


def tmp_manifest(attempt: str) -> str:
    return TMP_MANIFEST_PREFIX + attempt


def is_ours(entry: str) -> bool:
    """Whether an entry inside a checkpoint directory is something a save writes."""
    return entry == MANIFEST_NAME or entry.startswith((ATTEMPT_PREFIX, TMP_MANIFEST_PREFIX))


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def deleting_name(name: str) -> str:
    """A fresh name to rename the step directory ``name`` to before removing it."""
    return f".{name}.deleting-{uuid.uuid4().hex[:8]}"
