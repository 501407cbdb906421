"""The handler API data-pipeline users know, on distckpt's multi-host engine.

``CheckpointHandler`` saves and restores pytrees or ``Checkpointable``
objects into numbered steps of a directory; ``PipelineCheckpoint`` does the
same for one data pipeline. Both are thin layers over ``CheckpointManager``
(one per directory), so every call is collective in a multi-process job:
the primary lists and deletes, and every process sees the same answer.

Unlike handlers that wrap other libraries, these never fall back to another
step when the asked-for one is missing, keep dict key types, prune old
steps only after the new one is committed, and check a checksum on every
byte they read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from distckpt import _location, _procstate, _statetree
from distckpt._inspect import CheckpointInfo, is_committed, metadata
from distckpt._location import Location
from distckpt._procstate import Checkpointable
from distckpt._restore import restore as _restore
from distckpt._save import save as _save
from distckpt._target import abstract_like
from distckpt.errors import NotCommittedError
from distckpt.manager import CheckpointManager


class CheckpointHandler:
    """Saves and restores training or pipeline state under ``directory/step_*``.

    Args:
      async_checkpointing: ``save`` returns once the state is copied to host
        memory and commits in the background (default: saves block).
      timeout_s: longest wait for the slowest process at any synchronisation point.

    ``target`` may be a pytree (arrays, numpy, Python scalars and strings,
    PRNG keys) or a ``distckpt.Checkpointable``: then ``get_state()`` is
    saved, *per process* (or once, if it declares ``checkpoint_global``):
    its arrays in the data files like any leaf, the rest in the commit
    record. ``restore`` calls ``set_state`` on it and returns it; restored
    without a target, such a checkpoint gives back the state dict, arrays
    as the types ``get_state`` gave (docs/training_state.md).

    Example::

      with distckpt.CheckpointHandler() as h:
          h.save("/ckpt", state, step=100, keep=5, metadata={"epoch": 3})
          state = h.restore("/ckpt", state)            # latest, into state's layout
          h.latest_step("/ckpt"), h.get_checkpoint_steps("/ckpt")
    """

    def __init__(self, async_checkpointing: bool = False, *, timeout_s: float | None = None):
        self.async_checkpointing, self.timeout_s = async_checkpointing, timeout_s
        self._managers: dict[str, CheckpointManager] = {}

    def _manager(self, directory: Location) -> CheckpointManager:
        key = _location.parse(directory).display  # one manager per location, however spelled
        # Every call sees the directory as it is now (another handler or job
        # may have saved or deleted since): a fresh manager scans it, once
        # the previous one's background save is done (its error raised here).
        old = self._managers.pop(key, None)
        if old is not None:
            old.close()
        # Queries open a manager too, and a query must never delete: the
        # leftovers of crashed saves are left to a CheckpointManager's
        # start-up or ``distckpt gc`` (a commit cleans its own step).
        self._managers[key] = CheckpointManager(
            directory,
            async_save=self.async_checkpointing,
            timeout_s=self.timeout_s,
            clean_on_start=False,
        )
        return self._managers[key]

    def save(
        self,
        directory: Location,
        target: Any,
        step: int | None = None,
        keep: int | None = None,
        overwrite: bool = False,
        metadata: Any = None,
    ) -> str:
        """Saves ``target`` as ``step`` (or, without a step, as ``directory`` itself).

        ``keep`` keeps the latest N steps; older ones are deleted only after
        this step is committed. ``overwrite`` replaces a committed step; the
        old one stays readable until the new one commits. Returns where the
        checkpoint is (its path, or URL).
        """
        pipeline: Any = None
        tree = target
        if _is_checkpointable(target):
            # Its arrays are the checkpoint's leaves, the rest the pipeline state.
            tree, pipeline = {}, target
        if keep is not None and step is None:
            raise ValueError("keep= needs step=: it keeps the latest N numbered steps")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        if step is None:
            _save(
                directory,
                tree,
                overwrite=overwrite,
                metadata=metadata,
                pipeline=pipeline,
                timeout_s=self.timeout_s,
            )
            return _location.parse(directory).display
        mgr = self._manager(directory)
        # Retention is a frozen, validated value: this save applies its own.
        mgr.retention = dataclasses.replace(mgr.retention, max_to_keep=keep)
        mgr.save(step, tree, metadata=metadata, pipeline=pipeline, force=True, overwrite=overwrite)
        where = mgr.path(step)
        return where if isinstance(where, str) else _location.parse(where).display

    save_to_directory = save

    def restore(
        self,
        directory: Location,
        target: Any = None,
        step: int | None = None,
        *,
        force: bool = False,
    ) -> Any:
        """Restores ``step`` (default: the latest) into ``target``'s layout.

        With a pytree ``target`` the result has its structure, types,
        shapes and shardings; without one, host numpy arrays and Python
        values in the containers they were saved in (see
        ``distckpt.restore``). Without a target, a checkpoint of a
        ``Checkpointable`` gives this process's saved state (the dict
        ``get_state`` returned). A ``Checkpointable`` target gets
        ``set_state`` with that state (or with the saved tree) and is
        returned; a state that records what identifies its data
        (``sampler_repr``, ``data_source_repr``, ``shard_count``,
        ``worker_count``) is given only to a target whose ``get_state()``
        has the same values there, unless ``force=True`` (otherwise
        ``TreeMismatchError``, a ``ValueError``, naming each field). A
        missing step is an error that lists the steps there are; no other
        step is restored instead.
        """
        path = self._step_path(directory, step)
        if target is not None and not _is_checkpointable(target):
            return _restore(path, abstract_like(target), timeout_s=self.timeout_s)
        state = _statetree.restore(path, timeout_s=self.timeout_s)
        if state is None:
            state = _restore(path, timeout_s=self.timeout_s)
        if target is None:
            return state
        if not force and _procstate.has_identity(state):
            _procstate.check_identity(target.get_state(), state)
        target.set_state(state)
        return target

    def _step_path(self, directory: Location, step: int | None) -> Location:
        if step is None and is_committed(directory):
            return directory  # saved without a step
        mgr, steps = self._committed(directory)
        if step is None:
            if not steps:
                raise NotCommittedError(f"no committed checkpoints in {directory}")
            step = steps[-1]
        elif step not in steps:
            raise NotCommittedError(
                f"step {step} is not a committed checkpoint in {directory} (committed steps: "
                f"{steps or 'none'}); no other step is restored in its place"
            )
        return mgr.path(step)

    def _committed(self, directory: Location) -> tuple[CheckpointManager, list[int]]:
        """The directory's manager, its background save done, and its committed steps."""
        mgr = self._manager(directory)
        mgr.wait_until_finished()
        return mgr, mgr.all_steps()

    def get_checkpoint_steps(self, directory: Location) -> list[int]:
        """The committed steps, ascending."""
        return self._committed(directory)[1]

    def latest_step(self, directory: Location) -> int | None:
        steps = self.get_checkpoint_steps(directory)
        return steps[-1] if steps else None

    def list_checkpoints(self, directory: Location) -> list[CheckpointInfo]:
        """What each committed step holds (``distckpt.metadata`` of each), ascending."""
        mgr, steps = self._committed(directory)
        return [metadata(mgr.path(s)) for s in steps]

    def wait_until_finished(self) -> None:
        for mgr in self._managers.values():
            mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and raises their errors."""
        managers, self._managers = list(self._managers.values()), {}
        for mgr in managers:
            mgr.close()

    def __enter__(self) -> CheckpointHandler:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            for mgr in self._managers.values():
                mgr.__exit__(exc_type, *rest)
            self._managers = {}


P = TypeVar("P", bound=Checkpointable)


class PipelineCheckpoint:
    """Checkpoints one data pipeline's position under ``directory/step_*``.

    Each process's ``pipeline.get_state()`` is saved (once, if the pipeline
    declares ``checkpoint_global``); ``restore_latest`` gives each its own
    back through ``set_state``.

    Example::

      ckpt = distckpt.PipelineCheckpoint("/ckpt/data")
      ckpt.restore_latest(pipeline)        # no-op (returns None) on a fresh start
      for step, batch in enumerate(pipeline, start=1):
          ...
          if step % 100 == 0:
              ckpt.save(pipeline, step=step, metadata={"epoch": 1}, keep=3)
    """

    def __init__(
        self,
        directory: Location,
        *,
        async_checkpointing: bool = False,
        timeout_s: float | None = None,
    ):
        self.directory = directory
        self._handler = CheckpointHandler(async_checkpointing, timeout_s=timeout_s)

    def save(
        self,
        pipeline: Checkpointable,
        step: int,
        metadata: Any = None,
        keep: int | None = None,
        overwrite: bool = False,
    ) -> str:
        """Saves ``pipeline.get_state()`` as ``step``; returns the checkpoint's path."""
        _procstate.check(pipeline)
        return self._handler.save(
            self.directory, pipeline, step=step, keep=keep, overwrite=overwrite, metadata=metadata
        )

    def restore(self, pipeline: P, step: int, *, force: bool = False) -> P:
        """Restores ``step`` into ``pipeline`` (an error if it is not committed); returns it.

        ``force``: apply a state recorded for other data (see ``CheckpointHandler.restore``).
        """
        return self._handler.restore(self.directory, pipeline, step=step, force=force)

    def restore_latest(self, pipeline: Checkpointable, *, force: bool = False) -> int | None:
        """Restores the latest step into ``pipeline``; returns it, or None if there is none."""
        step = self.latest_step()
        if step is not None:
            self._handler.restore(self.directory, pipeline, step=step, force=force)
        return step

    def latest_step(self) -> int | None:
        return self._handler.latest_step(self.directory)

    def steps(self) -> list[int]:
        return self._handler.get_checkpoint_steps(self.directory)

    def close(self) -> None:
        self._handler.close()

    def __enter__(self) -> PipelineCheckpoint:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._handler.__exit__(exc_type, *rest)


def _is_checkpointable(obj: Any) -> bool:
    return isinstance(obj, _procstate.Checkpointable)
