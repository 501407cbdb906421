"""A ``Checkpointable`` saved alone by the handler APIs: its arrays in the data files.

The handler APIs (``distckpt.CheckpointHandler``, ``distckpt.compat.datarax``)
save a ``Checkpointable`` target as the tree ``{ARRAYS: [a0, a1, ...]}``,
the arrays of its ``get_state()`` (``_statearrays``), with the rest of the
state, a ``_procstate.Ref`` in place of each array, as the pipeline state
committed in the manifest.
"""

from __future__ import annotations

from typing import Any

from distckpt import _commit, _multihost, _procstate, _sources, _statearrays
from distckpt._location import Location
from distckpt._restore import restore as _restore
from distckpt._storage import open_storage

ARRAYS = "checkpointable_arrays"  # the one key of the tree saved for a Checkpointable


def split(obj: Any) -> tuple[dict[str, Any], _statearrays.Holder]:
    """The tree and the ``pipeline=`` stand-in to save ``obj`` (a ``Checkpointable``) with."""
    leaves, holder = _statearrays.split(obj)
    return ({ARRAYS: leaves} if leaves else {}), holder


def is_state(directory: Location) -> bool:
    """Whether the committed checkpoint at ``directory`` holds a Checkpointable's state."""
    return _state_manifest(directory) is not None


def _state_manifest(directory: Location) -> Any:
    if _sources.format_of(directory) != _sources.DISTCKPT:
        return None  # another format (Orbax) holds no distckpt pipeline state
    storage = open_storage(directory)
    manifest = _commit.load(storage)
    if manifest.process_state is None:
        return None
    if any(spec.path[:1] != (("key", ARRAYS),) for spec in manifest.leaves):
        return None  # a tree saved with pipeline=: not the state alone
    return manifest


def restore(directory: Location, *, timeout_s: float | None = None) -> dict[str, Any] | None:
    """The state a handler saved at ``directory`` for this process, its arrays as they
    were given; None if the checkpoint holds a tree, not a Checkpointable's state."""
    manifest = _state_manifest(directory)
    if manifest is None:
        return None
    count = _multihost.process_count()
    # Refuses a per-process state saved by another process count, before any read.
    _procstate.saved_state(
        manifest.process_state, _multihost.process_index(), count, str(directory)
    )
    per_process = manifest.process_state["mode"] != "global"
    specs = sorted(manifest.leaves, key=lambda spec: spec.path[1][1])
    want = [_statearrays.want(spec.shape, spec.dtype, per_process) for spec in specs]
    holder = _statearrays.Holder()
    tree = _restore(
        directory,
        {ARRAYS: want} if want else {},
        pipeline=holder,
        force_pipeline=True,  # the handler checks identities on the joined state
        timeout_s=timeout_s,
    )
    arrays = _statearrays.own(tree.get(ARRAYS, []), per_process)
    assert holder.received is not None
    return _statearrays.join(holder.received, arrays, per_process)
