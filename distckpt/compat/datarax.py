"""datarax's checkpoint API on distckpt's multi-host engine: switching is an import change.

Code written for datarax's checkpoint module keeps working with its imports
changed::

  from datarax.checkpoint import OrbaxCheckpointHandler, PipelineCheckpoint
  from datarax.typing import Checkpointable, CheckpointableIterator

becomes::

  from distckpt.compat.datarax import (
      Checkpointable, CheckpointableIterator, OrbaxCheckpointHandler, PipelineCheckpoint)

The names, signatures, defaults and return values are datarax's: ``save``
returns the checkpoint's path and keeps the latest step only unless told
otherwise (``keep=1``); ``restore`` restores the latest step by default,
gives back the saved state without a target, calls ``set_state`` on a
``Checkpointable`` target; ``metadata_only=True`` returns the metadata
saved with it; ``list_checkpoints`` maps steps to paths; a missing
checkpoint raises a ``ValueError`` (``CheckpointNotFoundError``, also
distckpt's ``NotCommittedError``); ``IteratorCheckpoint.restore_latest``
returns the iterator and raises ``ValueError`` when there is nothing to
restore.

Underneath every call is distckpt's: collective in a multi-process job
(every process calls it; the primary lists and deletes), a step is readable
only once committed, every byte is checksummed, older steps are pruned only
after the new one is committed, and a step that is not there is an error,
never another step. A ``Checkpointable``'s state is saved per process (once,
if it declares ``checkpoint_global``), its arrays as data.

Checkpoints datarax wrote (Orbax ``ckpt-<step>`` directories, and the
``checkpoint`` directory of a save without a step) are listed and restored
alongside distckpt's own steps; distckpt never deletes them.
docs/training_state.md ("Coming from datarax") lists what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

import jax
import numpy as np

from distckpt import _knobs, _location, _multihost, _procstate, _sources, _statetree, _tree, errors
from distckpt._inspect import is_committed
from distckpt._inspect import metadata as _metadata
from distckpt._location import Location, ParsedLocation
from distckpt._match import place, want_host
from distckpt._procstate import Checkpointable, CheckpointableIterator
from distckpt._restore import restore as _restore
from distckpt._target import abstract_like
from distckpt.handler import CheckpointHandler

__all__ = [
    "IDENTITY_FIELDS",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "Checkpointable",
    "CheckpointableIterator",
    "IteratorCheckpoint",
    "OrbaxCheckpointHandler",
    "PipelineCheckpoint",
    "validate_restore_compatibility",
]

T_co = TypeVar("T_co", covariant=True)

IDENTITY_FIELDS = _procstate.IDENTITY_FIELDS

UNSTEPPED = "checkpoint"  # where a save without a step goes, as with datarax
# datarax's step directories: ckpt-N; N and step_N (Orbax CheckpointManager layouts) too.
_ORBAX_STEP = re.compile(r"^(?:ckpt-|step_)?(\d+)$")


class CheckpointNotFoundError(errors.NotCommittedError, ValueError):
    """No checkpoint where one was asked for (no directory, no step, no steps at all).

    A ``ValueError``, as datarax raises, and distckpt's ``NotCommittedError``
    (so also a ``FileNotFoundError``).
    """


class CheckpointExistsError(errors.CheckpointExistsError, ValueError):
    """The step is already committed and ``overwrite=False``.

    A ``ValueError``, as datarax raises, and distckpt's ``CheckpointExistsError``
    (so also a ``FileExistsError``).
    """


@contextlib.contextmanager
def _datarax_errors() -> Iterator[None]:
    """Raises distckpt's not-found and exists errors as their ValueError flavours."""
    try:
        yield
    except (CheckpointNotFoundError, CheckpointExistsError):
        raise
    except errors.NotCommittedError as e:
        raise _retyped(CheckpointNotFoundError(str(e)), e) from e
    except errors.CheckpointExistsError as e:
        raise _retyped(CheckpointExistsError(str(e)), e) from e


def _retyped(new: errors.DistckptError, old: errors.DistckptError) -> errors.DistckptError:
    new.processes = list(old.processes)
    return new


def validate_restore_compatibility(
    current_state: dict[str, Any], saved_state: dict[str, Any]
) -> None:
    """Refuses a saved iterator state recorded for other data than the iterator's.

    Compares the ``IDENTITY_FIELDS`` present in both states (an iterator
    that records none is not checked; ``shard_index`` may differ).

    Raises:
      TreeMismatchError (a ``ValueError``): names every differing field,
        with the saved and the current value.
    """
    _procstate.check_identity(current_state, saved_state)


class OrbaxCheckpointHandler:
    """Saves and restores pytrees and ``Checkpointable`` objects under numbered steps.

    datarax's handler, on distckpt's engine. Every method is collective in
    a multi-process job: every process calls it with the same arguments.

    Args:
      async_checkpointing: ``save`` returns once the state is copied to host
        memory and commits in the background; ``wait_until_finished`` or
        ``close`` waits for it (and raises its error).
      timeout_s: longest wait for the slowest process (distckpt's; default
        ``DISTCKPT_TIMEOUT_S`` or 300 s).

    Example::

      with OrbaxCheckpointHandler() as handler:
          path = handler.save("/ckpt", state, step=100, keep=5, metadata={"epoch": 3})
          state = handler.restore("/ckpt")                  # the latest step
          handler.list_checkpoints("/ckpt")                 # {100: "/ckpt/step_00000100"}
    """

    def __init__(self, async_checkpointing: bool = False, *, timeout_s: float | None = None):
        self.async_checkpointing, self.timeout_s = async_checkpointing, timeout_s
        self._native = CheckpointHandler(async_checkpointing, timeout_s=timeout_s)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        directory: Location,
        target: Any,
        step: int | None = None,
        keep: int | None = 1,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Saves ``target`` as ``step`` of ``directory``; returns the checkpoint's path.

        Args:
          directory: a path (or an ``s3://``/``gs://`` URL).
          target: a pytree (a dict of arrays, numbers, strings, PRNG keys), a
            ``Checkpointable`` (its ``get_state()``, per process) or a
            ``flax.nnx.Module`` (its state).
          step: the step number; None saves to ``directory/checkpoint``.
          keep: keep the latest ``keep`` distckpt steps, deleting older ones
            once this one is committed; None or 0 keeps all.
          overwrite: replace a committed checkpoint of the same step;
            without it that is ``CheckpointExistsError`` (a ``ValueError``).
          metadata: JSON-serialisable data kept with the checkpoint, returned
            by ``restore(..., metadata_only=True)``.
        """
        where = _location.parse(directory)
        tree = _module_state(target)
        if keep is not None and keep <= 0:
            keep = None
        with _datarax_errors():
            if step is None:
                return self._native.save(
                    _loc(where.child(UNSTEPPED)), tree, overwrite=overwrite, metadata=metadata
                )
            return self._native.save(
                _loc(where), tree, step=step, keep=keep, overwrite=overwrite, metadata=metadata
            )

    save_to_directory = save

    # ------------------------------------------------------------------ restoring

    def restore(
        self,
        directory: Location,
        target: Any | None = None,
        step: int | None = None,
        metadata_only: bool = False,
        restore_args: Any | None = None,
        *,
        force: bool = False,
    ) -> Any:
        """Restores ``step`` of ``directory`` (default: the latest).

        Without a target: the saved state (a ``Checkpointable``'s is the dict
        its ``get_state`` returned), arrays as saved (``jax.Array``\\ s on this
        process's first device, numpy arrays, typed PRNG keys). A
        ``Checkpointable`` target gets ``set_state`` and is returned; an
        ``nnx.Module`` is updated and returned; a pytree target gives a tree
        of its structure and types. ``metadata_only=True`` returns the
        ``metadata`` saved with the checkpoint (None if there was none).
        ``restore_args`` is accepted for compatibility and ignored. A
        ``Checkpointable`` target whose state records what identifies its
        data (``IDENTITY_FIELDS``) gets only a state recorded for the same
        data, unless ``force=True`` (datarax does not check here).

        Raises:
          CheckpointNotFoundError (a ``ValueError``): no such directory, no
            such step (the steps there are listed; no other step is restored
            in its place), or no checkpoint at all.
          TreeMismatchError, CorruptCheckpointError (``ValueError``\\ s).
        """
        del restore_args
        with _datarax_errors():
            path, foreign = self._agreed(directory, step)
            if foreign:
                return _restore_datarax(path, target, metadata_only, force, self.timeout_s)
            if metadata_only:
                return _metadata(path).user_metadata
            if isinstance(target, Checkpointable):
                return self._native.restore(path, target, force=force)
            state = _statetree.restore(path, timeout_s=self.timeout_s)
            if _is_module(target):
                return _update_module(target, path, state, self.timeout_s)
            if state is not None:
                return state
            if target is None:
                return _arrays_as_jax(_restore(path, timeout_s=self.timeout_s), path)
            return _restore(path, abstract_like(target), timeout_s=self.timeout_s)

    def _agreed(self, directory: Location, step: int | None) -> tuple[Location, bool]:
        """``_resolve`` as the primary finds it, on every process; collective.

        Processes must not restore different steps (each lists the directory
        itself, and a step may be new, or missing on a process that does not
        share the filesystem): the primary chooses, every process checks
        that it finds the chosen checkpoint, and a process that does not is a
        ``NotCommittedError`` on every process. Processes asking for
        different steps are an ``InconsistentProcessesError`` on every process.
        """
        where = _location.parse(directory)
        coll = _multihost.Collective(
            "restore", where.display, _knobs.get("timeout_s", self.timeout_s)
        )
        if coll.count == 1:
            return self._resolve(directory, step)

        coll.run("find the directory", lambda: _check_directory(where, coll.pid))
        ours = self._native_steps(where)  # collective: every process, the same steps

        def choose() -> dict[str, Any]:
            out: dict[str, Any] = {"asked": step}
            if coll.is_primary:
                try:
                    path, foreign = self._resolve(directory, step, ours)
                except CheckpointNotFoundError as e:  # the same type on every process
                    raise errors.NotCommittedError(str(e)) from None
                out.update(path=path, foreign=foreign)
            return out

        def disagree(payloads: list[Any]) -> None:
            asked = {p: (d or {}).get("asked") for p, d in enumerate(payloads)}
            raise errors.InconsistentProcessesError(
                f"restore of {where.display}: the processes asked for different steps "
                f"(by process: {asked}; None is the latest). Every process must restore the "
                "same step: pass the step the primary chose, or none."
            )

        chosen = coll.run(
            "choose the step",
            choose,
            share=True,
            agree=lambda payload: payload["asked"],
            disagree=disagree,
        )
        path, foreign = chosen["path"], chosen["foreign"]
        coll.run("find the step", lambda: _check_found(path, foreign, coll.pid), last=True)
        return path, foreign

    def _agreed_latest(self, directory: Location) -> int | None:
        """``latest_step``, the same on every process (collective), or an
        ``InconsistentProcessesError`` naming each process's."""
        parsed = _location.parse(directory)
        where = parsed.display
        coll = _multihost.Collective("restore", where, _knobs.get("timeout_s", self.timeout_s))
        if coll.count > 1:  # before the listing, which is collective only where it is there
            with _datarax_errors():
                coll.run("find the directory", lambda: _check_directory(parsed, coll.pid))
        latest = self.latest_step(directory)

        def disagree(payloads: list[Any]) -> None:
            raise errors.InconsistentProcessesError(
                f"restore of {where}: the processes see different latest steps (by process: "
                f"{dict(enumerate(payloads))}); every process must see the same checkpoints. "
                "Put the directory on a filesystem every process shares, and restore once "
                "no step is being written."
            )

        with _datarax_errors():
            coll.run("latest step", lambda: latest, agree=lambda v: v, disagree=disagree, last=True)
        return latest

    def _resolve(
        self, directory: Location, step: int | None, ours: dict[int, Location] | None = None
    ) -> tuple[Location, bool]:
        """The checkpoint to restore and whether datarax wrote it (an Orbax directory);
        ``ours``: distckpt's steps there, if already listed."""
        where = _location.parse(directory)
        if where.path is not None and not os.path.isdir(where.path):
            raise CheckpointNotFoundError(f"checkpoint directory not found: {where.display}")
        if ours is None:
            ours = self._native_steps(where)
        theirs = _datarax_steps(where)
        if step is not None:
            if step in ours:
                return ours[step], False
            if step in theirs:
                return theirs[step], True
            raise CheckpointNotFoundError(
                f"step {step} is not a checkpoint in {where.display} (steps there: "
                f"{sorted(set(ours) | set(theirs)) or 'none'}); no other checkpoint is "
                "restored in its place"
            )
        steps = sorted(set(ours) | set(theirs))
        if steps:
            latest = steps[-1]
            return (ours[latest], False) if latest in ours else (theirs[latest], True)
        for candidate in (where.child(UNSTEPPED), where):
            if is_committed(_loc(candidate)):
                return _loc(candidate), False
            if candidate.path is not None and _sources.format_of(candidate.path) == _sources.ORBAX:
                return candidate.path, True
        raise CheckpointNotFoundError(
            f"no checkpoints found in {where.display} (no committed step, and no "
            f"{UNSTEPPED}/ saved without a step)"
        )

    # ------------------------------------------------------------------ listing

    def _native_steps(self, where: ParsedLocation) -> dict[int, Location]:
        """distckpt's committed steps in ``where`` and their locations (one scan)."""
        if where.path is not None and not os.path.isdir(where.path):
            return {}
        mgr, steps = self._native._committed(_loc(where))
        return {s: mgr.path(s) for s in steps}

    def get_checkpoint_steps(self, directory: Location) -> list[int]:
        """The steps there are, ascending: distckpt's committed steps and datarax's."""
        where = _location.parse(directory)
        return sorted(set(self._native_steps(where)) | set(_datarax_steps(where)))

    def latest_step(self, directory: Location) -> int | None:
        steps = self.get_checkpoint_steps(directory)
        return steps[-1] if steps else None

    def list_checkpoints(self, directory: Location) -> dict[int, str]:
        """``{step: path}`` of every step, ascending (distckpt's step where both have one)."""
        where = _location.parse(directory)
        out: dict[int, str] = dict(_datarax_steps(where))
        for s, p in self._native_steps(where).items():
            out[s] = p if isinstance(p, str) else _location.parse(p).display
        return dict(sorted(out.items()))

    def wait_until_finished(self) -> None:
        """Waits for background saves; raises their errors."""
        with _datarax_errors():
            self._native.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and raises their errors."""
        with _datarax_errors():
            self._native.close()

    def __enter__(self) -> OrbaxCheckpointHandler:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        with _datarax_errors():
            self._native.__exit__(exc_type, *rest)


class IteratorCheckpoint:
    """Saves and restores one iterator's state under ``base_dir``.

    Args:
      base_dir: where the steps go.
      handler: the ``OrbaxCheckpointHandler`` to use (default: a new one).
      async_checkpointing: for the default handler.

    The iterator's ``get_state()`` is saved per process (once, if it
    declares ``checkpoint_global``). ``restore`` refuses a state recorded
    for other data (``IDENTITY_FIELDS``) unless ``force=True``.
    """

    def __init__(
        self,
        base_dir: Location,
        handler: OrbaxCheckpointHandler | None = None,
        async_checkpointing: bool = False,
    ):
        self.base_dir = base_dir
        self.handler = handler or OrbaxCheckpointHandler(async_checkpointing=async_checkpointing)

    def save_to_directory(
        self,
        iterator: CheckpointableIterator[T_co],
        step: int | None = None,
        keep: int | None = 1,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Saves ``iterator.get_state()`` as ``step``; returns the checkpoint's path.

        Raises ValueError if the iterator has no ``get_state`` or it returns no dict.
        """
        getter = getattr(iterator, "get_state", None)
        if not callable(getter):
            raise ValueError(
                f"{type(iterator).__name__} has no get_state() method; it cannot be checkpointed"
            )
        state = getter()
        if not isinstance(state, dict):
            raise ValueError(
                f"{type(iterator).__name__}.get_state() must return a dict, got "
                f"{type(state).__name__}"
            )
        frozen = _Captured(state, _procstate.is_global(iterator))
        return self.handler.save(
            self.base_dir, frozen, step=step, keep=keep, overwrite=overwrite, metadata=metadata
        )

    save = save_to_directory  # datarax 0.1.0's name, with the same arguments in the same order

    def restore(
        self,
        iterator: CheckpointableIterator[T_co],
        step: int | None = None,
        *,
        force: bool = False,
    ) -> CheckpointableIterator[T_co]:
        """Restores ``step`` (default: the latest) into ``iterator``; returns it.

        Raises:
          ValueError: the iterator lacks ``get_state``/``set_state``; the
            checkpoint holds no state dict; there is no such checkpoint
            (``CheckpointNotFoundError``); or the saved state was recorded
            for other data (``validate_restore_compatibility``; ``force=True``
            applies it anyway).
        """
        for method in ("set_state", "get_state"):
            if not callable(getattr(iterator, method, None)):
                raise ValueError(
                    f"{type(iterator).__name__} has no {method}() method; it cannot be restored"
                )
        saved = self.handler.restore(self.base_dir, step=step)
        if not isinstance(saved, dict):
            raise ValueError(
                f"the checkpoint in {self.base_dir} holds a {type(saved).__name__}, not an "
                "iterator's state dict"
            )
        if not force:
            validate_restore_compatibility(iterator.get_state(), saved)
        iterator.set_state(saved)
        return iterator

    def restore_latest(
        self, iterator: CheckpointableIterator[T_co], *, force: bool = False
    ) -> CheckpointableIterator[T_co]:
        """Restores the latest step into ``iterator`` and returns it.

        Raises CheckpointNotFoundError (a ``ValueError``) when there is none.
        """
        latest = self.handler._agreed_latest(self.base_dir)
        if latest is None:
            raise CheckpointNotFoundError(f"no checkpoints found in {self.base_dir}")
        return self.restore(iterator, step=latest, force=force)

    def get_latest_step(self) -> int | None:
        return self.handler.latest_step(self.base_dir)

    latest_step = get_latest_step

    def list_checkpoints(self) -> dict[int, str]:
        """``{step: path}`` of every step, ascending."""
        return self.handler.list_checkpoints(self.base_dir)

    def has_checkpoint(self) -> bool:
        return self.get_latest_step() is not None

    def close(self) -> None:
        self.handler.close()

    def __enter__(self) -> IteratorCheckpoint:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.handler.__exit__(exc_type, *rest)


class PipelineCheckpoint(IteratorCheckpoint):
    """``IteratorCheckpoint`` for a whole pipeline, with saves at an interval of steps."""

    def save_to_step(
        self,
        data_stream: CheckpointableIterator[T_co],
        step: int,
        interval: int = 1000,
        keep: int | None = 5,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> str | None:
        """Saves when ``step`` is a multiple of ``interval``; returns the path, or None."""
        if step % interval != 0:
            return None
        return self.save_to_directory(
            data_stream, step=step, keep=keep, overwrite=overwrite, metadata=metadata
        )

    save_at_step = save_to_step  # datarax 0.1.0's name for it


class _Captured:
    """An iterator's state, taken once, standing for the iterator in a save."""

    def __init__(self, state: dict[str, Any], is_global: bool):
        self.state, self.checkpoint_global = state, is_global

    def get_state(self) -> dict[str, Any]:
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:  # pragma: no cover - save only
        raise AssertionError("a captured state is only saved")


# --------------------------------------------------------------------------- helpers


def _loc(where: ParsedLocation) -> Location:
    if where.path is not None:
        return where.path
    assert where.spec is not None
    return where.spec


def _is_module(obj: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")  # only if the user's code imported flax
    return nnx is not None and isinstance(obj, nnx.Module)


def _module_state(target: Any) -> Any:
    if isinstance(target, Checkpointable) or not _is_module(target):
        return target  # a module with get_state/set_state is saved through them
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(target))


def _update_module(module: Any, path: Location, state: Any, timeout_s: float | None) -> Any:
    from flax import nnx

    if state is None:
        want = abstract_like(nnx.to_pure_dict(nnx.state(module)))
        state = _restore(path, want, timeout_s=timeout_s)
    return _apply_to_module(module, state)


def _apply_to_module(module: Any, pure: Any) -> Any:
    from flax import nnx

    graph_state = nnx.state(module)
    nnx.replace_by_pure_dict(graph_state, pure)
    nnx.update(module, graph_state)
    return module


def _arrays_as_jax(tree: Any, path: Location) -> Any:
    """``tree`` (a target-less restore of ``path``) with its saved ``jax.Array`` leaves as
    ``jax.Array``\\ s on this process's first device, as datarax gives them back."""
    kinds = {p: leaf.kind for p, leaf in _metadata(path).leaves.items()}
    return _to_jax(tree, lambda display: kinds.get(display) == _tree.ARRAY)


def _to_jax(tree: Any, was_jax: Any, path: _tree.Path = ()) -> Any:
    """``tree`` with each numpy leaf whose path ``was_jax`` as a ``jax.Array``; containers
    (dict order, namedtuples) kept as they are."""
    if isinstance(tree, dict):
        return {k: _to_jax(v, was_jax, (*path, _key_part(k))) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(_to_jax(getattr(tree, f), was_jax, (*path, ("attr", f))) for f in tree._fields)
        )
    if isinstance(tree, list | tuple):
        items = [_to_jax(v, was_jax, (*path, ("idx", i))) for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    if isinstance(tree, np.ndarray) and was_jax(_tree.display(path)):
        return jax.device_put(tree, jax.local_devices()[0])
    return tree


def _key_part(key: Any) -> tuple[str, Any]:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return ("int", int(key))
    return ("key", key if isinstance(key, str) else str(key))


# --------------------------------------------------------------------------- datarax's own checkpoints


def _datarax_steps(where: ParsedLocation) -> dict[int, str]:
    """The Orbax step directories datarax wrote in ``where``: ``ckpt-N`` first, else ``N``
    or ``step_N`` (a step directory with one item inside, such as ``default/``, counts)."""
    if where.path is None or not os.path.isdir(where.path):
        return {}
    out: dict[int, str] = {}
    for name in sorted(os.listdir(where.path), key=lambda n: not n.startswith("ckpt-")):
        m = _ORBAX_STEP.match(name)
        if not m or int(m[1]) in out:
            continue
        path = os.path.join(where.path, name)
        if os.path.isdir(path) and _sources.format_of(path) == _sources.ORBAX:
            out[int(m[1])] = path
    return out


def _check_directory(where: ParsedLocation, process: int) -> None:
    if where.path is not None and not os.path.isdir(where.path):
        raise errors.NotCommittedError(
            f"checkpoint directory not found on process {process}: {where.display}"
        )


def _check_found(path: Location, foreign: bool, process: int) -> None:
    """Raises NotCommittedError unless this process finds the checkpoint the primary chose."""
    if foreign:
        found = (
            isinstance(path, str)
            and os.path.isdir(path)
            and _sources.format_of(path) == _sources.ORBAX
        )
    else:
        found = is_committed(path)
    if not found:
        shown = path if isinstance(path, str) else _location.parse(path).display
        raise errors.NotCommittedError(
            f"process {process} finds no checkpoint at {shown}, which the primary (process 0) "
            "chose to restore; every process must see the same checkpoints. Put the directory "
            "on a filesystem every process shares (or copy the step to each host), and check "
            "that no process restores while the step is still being written."
        )


def _restore_datarax(
    path: Location, target: Any, metadata_only: bool, force: bool, timeout_s: float | None
) -> Any:
    """A checkpoint datarax wrote: its state, with datarax's encodings undone.

    Each process reads it whole; in a job of several, they then check that they
    read the same contents (a checkpoint is not restored from host-local copies
    that differ); collective."""
    shown = path if isinstance(path, str) else _location.parse(path).display
    coll = _multihost.Collective("restore", shown, _knobs.get("timeout_s", timeout_s))
    read: list[Any] = []

    def read_and_digest() -> str:
        read.append(_read_orbax(path))  # an error here is raised on every process
        return _digest(read[0]) if coll.count > 1 else ""

    def disagree(payloads: list[Any]) -> None:
        groups: dict[str, list[int]] = {}
        for p, digest in enumerate(payloads):
            groups.setdefault(str(digest)[:12], []).append(p)
        raise errors.InconsistentProcessesError(
            f"restore of {shown}: the processes read different contents at this path "
            f"(processes by sha256 of what each read: {groups}). Each host has its own "
            "copy of this checkpoint, and the copies differ: put the directory on a "
            "filesystem every process shares, or copy one step to every host."
        )

    coll.run("read", read_and_digest, agree=lambda d: d, disagree=disagree, last=True)
    raw = read[0]
    state = _decode(raw)
    meta = None
    if isinstance(state, dict) and "__metadata__" in state:
        meta = state.pop("__metadata__")
    if isinstance(state, dict) and set(state) == {"__state__"}:
        state = state["__state__"]
    if metadata_only:
        return meta
    if isinstance(target, Checkpointable):
        if not force and _procstate.has_identity(state):
            _procstate.check_identity(target.get_state(), state)
        target.set_state(state)
        return target
    if _is_module(target):
        return _apply_to_module(target, state)
    return state


def _read_orbax(path: Location) -> Any:
    """Every leaf of an Orbax checkpoint, read by this process alone (a data pipeline's
    state is small; each process reads it all, which needs a filesystem they share)."""
    with _sources.open_source(path) as source:
        wants = [want_host(i, i, spec) for i, spec in enumerate(source.leaves)]
        blocks = {(w.leaf, box): source.read_box(w.leaf, box) for w in wants for box in w.boxes}
        values: list[Any] = [None] * len(wants)
        place(wants, source.leaves, blocks, values)
        device = jax.local_devices()[0]
        items = []
        for spec, value in zip(source.leaves, values, strict=True):
            if spec.kind == _tree.ARRAY and isinstance(value, np.ndarray):
                value = jax.device_put(value, device)
            items.append((spec.path, value))
    return _tree.unflatten_plain(items)


def _digest(value: Any) -> str:
    """sha256 of a tree read from an Orbax checkpoint: its structure, and each leaf's
    type, dtype, shape and bytes."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                walk(v[k])
            h.update(b"}")
        elif isinstance(v, list | tuple):
            h.update(f"{type(v).__name__}[{len(v)}".encode())
            for x in v:
                walk(x)
        elif isinstance(v, jax.Array | np.ndarray):
            a = np.ascontiguousarray(np.asarray(v))
            h.update(f"{type(v).__name__}:{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{type(v).__name__}:{v!r};".encode())

    walk(value)
    return h.hexdigest()


def _decode(value: Any) -> Any:
    """Undoes datarax's encodings: strings as character codes, PRNG keys as key data."""
    if isinstance(value, dict):
        if value.get("__string__") is True or value.get("__string__") == 1:
            return "".join(chr(int(c)) for c in np.asarray(value["char_codes"]).reshape(-1))
        if value.get("__prng_key__") is True or value.get("__prng_key__") == 1:
            data = np.asarray(value["key_data"], dtype=np.uint32)
            return jax.random.wrap_key_data(jax.device_put(data, jax.local_devices()[0]))
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    return value
