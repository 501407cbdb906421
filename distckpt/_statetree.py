"""A ``Checkpointable`` saved alone by the handler APIs: ``save(dir, {}, pipeline=obj)``.

The handler APIs (``distckpt.CheckpointHandler``, ``distckpt.compat.datarax``)
save a ``Checkpointable`` target as an empty tree with the object as
``pipeline=``: its ``get_state()`` arrays are the checkpoint's only leaves
(``_statearrays``), the rest of the state the pipeline state committed in
the manifest. Checkpoints the handlers wrote before kept the arrays in the
tree ``{"checkpointable_arrays": [...]}``; both restore here.
"""

from __future__ import annotations

from typing import Any

from distckpt import _commit, _procstate, _sources, _statearrays
from distckpt._location import Location
from distckpt._restore import restore as _restore
from distckpt._storage import open_storage


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
    paths = [spec.path for spec in manifest.leaves]
    if _procstate.array_leaves(manifest.process_state, paths, storage.display) != len(paths):
        return None  # a tree saved with pipeline=: not the state alone
    return manifest


def restore(directory: Location, *, timeout_s: float | None = None) -> dict[str, Any] | None:
    """The state a handler saved at ``directory`` for this process, its arrays as they
    were given; None if the checkpoint holds a tree, not a Checkpointable's state."""
    if _state_manifest(directory) is None:
        return None
    holder = _statearrays.Holder()
    _restore(
        directory,
        {},
        pipeline=holder,
        force_pipeline=True,  # the handler checks identities itself
        timeout_s=timeout_s,
    )
    return holder.received
