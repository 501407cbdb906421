"""CheckpointManager: steps, async saves, and the parts it is composed of.

One subdirectory per committed step (``step_00001000``), each an ordinary
distckpt checkpoint. Every method that touches storage is collective: every
process calls it, in the same order, as with ``save`` and ``restore``.
Which steps stay is ``_retention``'s decision, copies elsewhere are
``_backups``', the agreed stop ``_preemption``'s; this module runs saves,
keeps the step list and applies those decisions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

from distckpt import (
    _backups,
    _codec,
    _commit,
    _inspect,
    _knobs,
    _layout,
    _localtier,
    _location,
    _multihost,
    _preemption,
    _procstate,
    _read,
    _retention,
    _runtime,
    _stage,
    _steps,
    _storage,
)
from distckpt._layout import deleting_name, step_name
from distckpt._location import Location
from distckpt._preemption import PREEMPTED_EXIT_CODE as PREEMPTED_EXIT_CODE
from distckpt._preemption import forward_signal as forward_signal
from distckpt._procstate import Checkpointable
from distckpt._restore import restore as _restore
from distckpt._save import SaveJob, SaveStats
from distckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    NotCommittedError,
    TreeMismatchError,
)

log = logging.getLogger("distckpt")

__all__ = ["PREEMPTED_EXIT_CODE", "CheckpointManager", "RestoreStats", "forward_signal"]


@dataclass(frozen=True)
class RestoreStats:
    """Where the last ``CheckpointManager.restore`` on this process found its bytes."""

    step: int
    tier: Literal["local", "persistent"]
    local_bytes: int  # read from this process's local directory
    peer_bytes: int  # received from other processes' copies, through collectives
    persistent_bytes: int  # chunk bytes read from the persistent tier


class CheckpointManager:
    """Saves a training loop's state every few steps, keeps the right ones, resumes.

    Args:
      directory: a directory shared by all processes, an ``s3://`` or ``gs://``
        URL, ``memory://name`` or a TensorStore kvstore spec (see
        docs/storage.md); one subdirectory (key prefix) per step.
      max_to_keep: keep the latest N committed steps (None: no limit).
      keep_every_n_steps: also keep, forever, every step divisible by K.
      best_metric: name of a metric passed to ``save(..., metrics=)``.
      best_mode: ``"min"`` or ``"max"``: which values of ``best_metric`` are best.
      keep_best: also keep the N best steps by ``best_metric``. Steps saved
        without that metric never count as best; other rules may keep them.
      save_interval_steps: ``should_save(step)`` is true every this many steps.
      async_save: ``save`` returns once this process's shards are copied to
        host memory (or, on CPU devices, held as views the runtime keeps
        from donation); writing and committing continue in the background.
      timeout_s: longest wait for the slowest process at any synchronisation point.
      clean_on_start: the primary removes leftovers of crashed saves and
        deletions of this manager when it is constructed.
      storage_budget_bytes: warn (and record) when retention would keep more.
      backup_to, backup_every_n_steps, backup_best: copy selected committed
        steps to a second location in the background (docs/manager.md).
      compression, compression_level: ``"zstd"`` compresses every save's
        chunks (see ``distckpt.save``).
      local_directory: a host-local path (``/dev/shm/run1``, a local NVMe) for
        the local tier, each process its own: ``save`` also keeps every
        ``local_save_interval_steps``-th step there, each block on
        ``local_copies`` hosts (peers get copies through the job's
        collectives), the newest ``local_max_to_keep`` steps; ``restore()``
        without a step resumes from it when it holds a whole step newer than
        the persistent tier's latest (docs/local_tier.md). With
        ``async_save``, a local save returns once its blocks are in host
        memory (copies to peers included) and writes in the background.
      local_host: which host this process runs on, as the local tier tells
        hosts apart (default: ``DISTCKPT_HOST``, SLURM's node index, or the
        host name).

    The most recent step is always kept, whatever the rules, so a job can
    resume. With neither ``max_to_keep`` nor ``keep_best``, every step is kept.

    Example::

      with distckpt.CheckpointManager("/ckpt", max_to_keep=3) as mgr:
          start = mgr.latest_step() or 0
          if start:
              state = mgr.restore(start, target=abstract_state)
          for step in range(start + 1, num_steps + 1):
              state = train_step(state)
              if mgr.reached_preemption(step):
                  mgr.save(step, state, force=True, blocking=True)
                  sys.exit(distckpt.PREEMPTED_EXIT_CODE)
              mgr.save(step, state)   # only on save_interval_steps
    """

    def __init__(
        self,
        directory: Location,
        *,
        max_to_keep: int | None = None,
        keep_every_n_steps: int | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int | None = None,
        save_interval_steps: int = 1,
        async_save: bool = True,
        timeout_s: float | None = None,
        clean_on_start: bool = True,
        storage_budget_bytes: int | None = None,
        backup_to: Location | None = None,
        backup_every_n_steps: int | None = None,
        backup_best: bool = False,
        compression: str | None = None,
        compression_level: int = 3,
        local_directory: str | os.PathLike[str] | None = None,
        local_save_interval_steps: int | None = None,
        local_max_to_keep: int = 2,
        local_copies: int = 2,
        local_host: str | None = None,
    ):
        self.retention = _retention.Retention(
            max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best
        )
        for name, value in [
            ("save_interval_steps", save_interval_steps),
            ("storage_budget_bytes", storage_budget_bytes),
            ("local_save_interval_steps", local_save_interval_steps),
        ]:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        _codec.check(compression, compression_level)
        self._location = _location.parse(directory)
        self._spec_given = isinstance(directory, dict)
        self.directory = self._location.display
        self.save_interval_steps, self.async_save = save_interval_steps, async_save
        self.timeout_s = _knobs.get("timeout_s", timeout_s)
        self.last_save_stats: SaveStats | None = None
        self.last_restored_step: int | None = None
        self.storage_budget_bytes = storage_budget_bytes
        self.compression, self.compression_level = compression, compression_level
        self._sizes: dict[int, int] = {}  # bytes of each committed step, as learnt
        self._backup = _backups.Backups(
            _backups.BackupPolicy(backup_to, backup_every_n_steps, backup_best), self.directory
        )
        self._preemption = _preemption.Preemption()
        self._thread: threading.Thread | None = None
        self._local_thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._pool = _stage.HostPool()  # host buffers reused by consecutive async saves
        if async_save:  # ask the runtime now what the first async save will need to know
            threading.Thread(
                target=_stage.views_outlive_donation, name="distckpt-probe", daemon=True
            ).start()
        self.last_restore_stats: RestoreStats | None = None
        self._local: _localtier.LocalTier | None = None
        if local_directory is not None:
            self._local = _localtier.LocalTier(
                local_directory,
                copies=local_copies,
                keep=local_max_to_keep,
                host=local_host,
                timeout_s=self.timeout_s,
            )
        elif local_save_interval_steps is not None:
            raise ValueError("local_save_interval_steps needs local_directory")
        self.local_save_interval_steps = local_save_interval_steps or 1

        coll = _multihost.Collective("manager", self.directory, self.timeout_s)
        # The barrier of this first phase guarantees that no process is still
        # saving into the directory when the primary cleans it.
        coll.run("open", lambda: None)
        scan = (lambda: self._scan(clean_on_start)) if coll.is_primary else (lambda: None)
        scanned = coll.run("scan", scan, last=True, share=True)
        self._steps: dict[int, dict | None] = {int(k): v for k, v in scanned.items()}
        best = self.best_step()
        # The bar a step must beat to be backed up as the best.
        self._best_seen = None if best is None else self._metric(self._steps[best])

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Committed steps, sorted (the same list on every process)."""
        return sorted(self._steps)

    def latest_step(self) -> int | None:
        return max(self._steps, default=None)

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` among steps that recorded it."""
        ranked = self.retention.ranked(self._steps)
        return ranked[0] if ranked else None

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with ``step`` (read without loading arrays)."""
        self._check_step(step)
        return self._steps[step]

    def metadata(self, step: int) -> _inspect.CheckpointInfo:
        """The checkpoint description of ``step`` (reads no arrays)."""
        self._check_step(step)
        return _inspect.metadata(self.path(step))

    def should_save(self, step: int) -> bool:
        """True at every ``save_interval_steps``-th step and at the preemption step."""
        if step in self._steps:
            return False
        return step % self.save_interval_steps == 0 or step == self._preemption.step

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        tree: Any,
        *,
        metrics: dict[str, float] | None = None,
        metadata: Any = None,
        pipeline: Checkpointable | None = None,
        force: bool = False,
        blocking: bool | None = None,
        overwrite: bool = False,
    ) -> bool:
        """Saves ``tree`` as ``step`` if ``should_save(step)`` (or ``force``); collective.

        With ``async_save`` (and ``blocking`` not True) this returns once the
        shards are copied to host memory (on CPU devices, kept as views the
        runtime protects from donation); the caller may then donate or
        overwrite its arrays. A new save first waits for the previous one.
        ``pipeline`` (a ``distckpt.Checkpointable``, e.g. the data iterator)
        has its state taken before this returns, and is committed with the
        step; see ``distckpt.save``.

        Returns:
          True if a save was started, False if this step is not one to save.

        Raises:
          The error of the previous background save, if it failed (on every
          process). The next call saves normally.
          CheckpointExistsError: ``step`` is already committed (and not
          ``overwrite``: that replaces it, the old one readable until the new
          one commits).
        """
        if self._closed:
            raise ValueError(
                f"save(step={step!r}) on a closed CheckpointManager of {self.directory}; "
                "create a new manager to save again"
            )
        step = _retention.check_step(step)
        metrics = _retention.check_metrics(metrics)  # before anything is written
        local = self._local is not None and (force or step % self.local_save_interval_steps == 0)
        background = self.async_save if blocking is None else not blocking
        if not force and not self.should_save(step):
            if local:
                self.wait_until_finished()
                self._save_local(step, tree, metadata, metrics, pipeline, background)
            return local
        self.wait_until_finished()
        if local:
            self._save_local(step, tree, metadata, metrics, pipeline, background)
        if step in self._steps and not overwrite:
            raise CheckpointExistsError(
                f"step {step} is already committed in {self.directory} (steps: {self.all_steps()}); "
                "delete it first or save under another step"
            )
        latest = self.latest_step()
        if latest is not None and step < latest and step not in self._steps:
            raise ValueError(
                f"save(step={step}) in {self.directory}, whose latest step is {latest}: steps "
                "must increase (retention keeps the newest step numbers, so an older one would "
                f"be the first deleted). To go back, delete steps after {step} first "
                "(manager.delete(step)), or save into another directory."
            )
        record = {"step": step, "metrics": metrics}
        if self.storage_budget_bytes is not None:
            record["storage"] = self._project_storage(step, metrics)
        job = SaveJob(
            self.path(step),
            tree,
            metadata=metadata,
            pipeline=pipeline,
            overwrite=overwrite,
            compression=self.compression,
            compression_level=self.compression_level,
            timeout_s=self.timeout_s,
            manager=record,
        )
        with _runtime.paused_gc():
            job.start(copy=background, pool=self._pool if background else None)
        committed = (job.record or {}).get("metrics")  # the primary's, on every process
        if json.dumps(committed, sort_keys=True) != json.dumps(metrics, sort_keys=True):
            log.warning(
                "step %d: this process's metrics %s differ from the primary's %s; the "
                "primary's are recorded and rank steps on every process (all-reduce metrics "
                "before passing them to get the same value everywhere)",
                step,
                metrics,
                committed,
            )
        if background:
            self._thread = threading.Thread(
                target=self._finish,
                args=(job, step, committed),
                name=f"distckpt-save-{step}",
                daemon=True,
            )
            self._thread.start()
        else:
            self._finish(job, step, committed)
            self._raise_pending()
        return True

    def _save_local(
        self,
        step: int,
        tree: Any,
        metadata: Any,
        metrics: dict | None,
        pipeline: Any,
        background: bool,
    ) -> None:
        """The local tier's save of ``step``: host copies now, the writes in the background
        when ``background``."""
        assert self._local is not None
        with _runtime.paused_gc():
            finish = self._local.save(
                step,
                tree,
                extra={"user_metadata": metadata, "metrics": metrics},
                pipeline=pipeline,
            )

        def write() -> None:
            try:
                finish()
                log.info("saved step %d to the local tier", step)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e

        if background:
            self._local_thread = threading.Thread(
                target=write, name=f"distckpt-local-save-{step}", daemon=True
            )
            self._local_thread.start()
        else:
            write()
            self._raise_pending()

    def wait_until_finished(self) -> None:
        """Blocks until the background saves (persistent and local) are done; raises the
        error of one that failed, if any."""
        for name in ("_local_thread", "_thread"):
            thread = getattr(self, name)
            setattr(self, name, None)
            if thread is not None:
                thread.join()
        self._raise_pending()

    def close(self) -> None:
        """Waits for the background save and backups; the manager cannot save afterwards."""
        if not self._closed:
            self._closed = True
            try:
                self.wait_until_finished()
            finally:
                self._backup.close()

    @property
    def backup_errors(self) -> list[str]:
        """Backups that failed (each also logged); training is not stopped by them."""
        return list(self._backup.errors)

    def wait_for_backups(self) -> None:
        """Blocks until every backup started so far is done (primary process only)."""
        self._backup.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a background one
            try:
                self.close()
            except Exception as e:  # noqa: BLE001
                log.warning("background save also failed while handling an error: %s", e)

    def _finish(self, job: SaveJob, step: int, metrics: dict | None) -> None:
        try:
            self._finish_and_retain(job, step, metrics)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e

    def _finish_and_retain(self, job: SaveJob, step: int, metrics: dict | None) -> None:
        stats = job.finish()
        self.last_save_stats = stats
        self._steps[step] = metrics
        self._sizes[step] = stats.total_bytes
        log.info(
            "saved step %d to %s: %.3f s blocking, %.3f s writing, %.3f s commit, %d bytes",
            step,
            self.path(step),
            stats.blocking_s,
            stats.write_s,
            stats.commit_s,
            stats.total_bytes,
        )
        primary = _multihost.process_index() == 0
        self._apply_retention(primary)
        if primary and self._backup.policy.wants(step, self._new_best(step, metrics)):
            self._backup.submit(step, self.path(step))

    def _new_best(self, step: int, metrics: dict | None) -> bool:
        """Whether ``step`` beats every step saved before it (kept or not)."""
        value = self._metric(metrics)
        if value is None:
            return False
        best = self._best_seen
        if best is None or (value < best if self.retention.best_mode == "min" else value > best):
            self._best_seen = value
            return True
        return False

    def _size(self, step: int) -> int | None:
        if step not in self._sizes:
            try:
                self._sizes[step] = _inspect.metadata(self.path(step)).total_bytes
            except Exception as e:  # noqa: BLE001 - a projection must not stop a save
                log.warning("could not read the size of step %d: %s", step, e)
                return None
        return self._sizes[step]

    def _project_storage(self, step: int, metrics: dict | None) -> dict:
        """Bytes retention would keep once ``step`` is saved, against the budget; warns."""
        assert self.storage_budget_bytes is not None  # called only with a budget
        kept = sorted(self.retention.keep({**self._steps, step: metrics}))
        sizes = [self._size(s) for s in kept if s != step]
        # The new step will be about as large as the newest one whose size is known.
        estimate = self._sizes[max(self._sizes)] if self._sizes else 0
        projected = sum(x or 0 for x in sizes) + estimate
        over = projected > self.storage_budget_bytes
        if over:
            log.warning(
                "%s: keeping steps %s after saving step %d needs about %d bytes, over the "
                "storage budget of %d bytes; keep fewer steps (max_to_keep, keep_best, "
                "keep_every_n_steps) or raise the budget",
                self.directory,
                kept,
                step,
                projected,
                self.storage_budget_bytes,
            )
        return {
            "budget_bytes": self.storage_budget_bytes,
            "projected_bytes": projected,
            "kept_steps": kept,
            "over_budget": over,
        }

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    # ------------------------------------------------------------------ restore and delete

    def _apply_local_state(self, pipeline: Any, state: Any, step: int, force: bool) -> None:
        """Gives ``pipeline`` the state the local tier recovered for ``step`` (its arrays
        already back as their types) once every process's passed the identity check: a
        state for other data on any process restores none, and a step saved without
        ``pipeline=`` is a ``TreeMismatchError``, as in the persistent tier; collective."""
        coll = _multihost.Collective("restore", str(self.directory), self.timeout_s)

        def check() -> None:
            if state is None:
                raise TreeMismatchError(
                    f"restore of step {step} from the local tier: pipeline= was given but "
                    "the step holds no pipeline state (it was saved without pipeline=). "
                    "Restore without pipeline= and start the pipeline from its beginning, "
                    "or save with pipeline= so that later steps hold it."
                )
            _procstate.identity_check(pipeline, state, force=force)

        coll.run("pipeline", check, last=True)
        pipeline.set_state(state)

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        partial: bool = False,
        cast: bool = False,
        pipeline: Checkpointable | None = None,
        force_pipeline: bool = False,
        fall_back: bool = False,
    ) -> Any:
        """Restores ``step`` (default: the latest); collective. See ``distckpt.restore``.

        ``pipeline`` gets its saved state, unless that was recorded for other
        data than ``pipeline.get_state()`` says it walks (a
        ``TreeMismatchError`` naming the fields; ``force_pipeline=True``
        applies it anyway).

        ``fall_back`` (only without ``step``): if the latest step is corrupt,
        log why and restore the newest step that is intact instead. Without
        it a corrupt step is an error. ``last_restored_step`` says which
        step was restored.
        """
        self.wait_until_finished()
        if step is None and self._local is not None:
            recovered = self._local.recover(target, newer_than=self.latest_step(), partial=partial)
            if recovered is not None:
                found, tree, _, state = recovered
                if pipeline is not None:
                    self._apply_local_state(pipeline, state, found, force_pipeline)
                assert self._local.last_recovery is not None
                r = self._local.last_recovery
                self.last_restore_stats = RestoreStats(
                    found, "local", r.local_bytes, r.peer_bytes, 0
                )
                self.last_restored_step = found
                log.info(
                    "restored step %d from the local tier (%d bytes local, %d from peers)",
                    found,
                    r.local_bytes,
                    r.peer_bytes,
                )
                return tree
            log.info(
                "the local tier holds no whole step newer than the persistent tier's latest "
                "(%s); restoring from %s",
                self.latest_step(),
                self.directory,
            )
        if step is None:
            candidates = sorted(self._steps, reverse=True)
            if not candidates:
                raise NotCommittedError(f"no committed steps in {self.directory} to restore")
        else:
            self._check_step(step)
            candidates = [step]
        for i, candidate in enumerate(candidates):
            before = _read.data_bytes_read()
            try:
                tree = _restore(
                    self.path(candidate),
                    target,
                    partial=partial,
                    cast=cast,
                    pipeline=pipeline,
                    force_pipeline=force_pipeline,
                    timeout_s=self.timeout_s,
                )
            except CorruptCheckpointError as e:
                older = candidates[i + 1 :]
                if step is None and not fall_back and older:
                    e.add_note(
                        f"older committed steps: {older[:5]}; restore(fall_back=True) restores "
                        "the newest intact one instead"
                    )
                if not (fall_back and step is None and older):
                    raise
                log.warning(
                    "step %d is corrupt (%s); falling back to step %d",
                    candidate,
                    str(e).splitlines()[0],
                    older[0],
                )
                continue
            self.last_restored_step = candidate
            self.last_restore_stats = RestoreStats(
                candidate, "persistent", 0, 0, _read.data_bytes_read() - before
            )
            return tree
        raise AssertionError("unreachable")  # pragma: no cover

    def delete(self, step: int) -> None:
        """Deletes a committed step; collective (the primary deletes, all agree)."""
        self.wait_until_finished()
        coll = _multihost.Collective("delete", self.directory, self.timeout_s)

        def agree() -> int:
            self._check_step(step)  # an unknown step fails on every process alike
            return int(step)

        # Agree first: the primary deletes, every process forgets the step.
        def disagree(named: list[int]) -> None:
            _commit.refuse_if_different(
                named,
                lambda p: f"step {named[p]}",
                f"delete in {self.directory}: the processes named different steps",
                "Nothing was deleted. delete is collective: pass the same step on every process.",
            )

        coll.run("agree", agree, agree=lambda named: named, disagree=disagree)
        coll.run("delete", lambda: self._remove(step) if coll.is_primary else None, last=True)
        del self._steps[step]

    # ------------------------------------------------------------------ preemption

    def reached_preemption(self, step: int) -> bool:
        """True, on every process at the same step, once any process got a preemption notice.

        Call it at every step on every process. In a ``jax.distributed`` job
        this is JAX's preemption sync point (SIGTERM, or a signal forwarded
        with ``distckpt.forward_signal``); in a single process without it, a
        SIGTERM this manager caught.
        """
        return self._preemption.reached(step)

    # ------------------------------------------------------------------ internals

    def path(self, step: int) -> str | dict[str, Any]:
        """The location of ``step`` (whether or not it exists): a path or URL,
        or a kvstore spec if the manager was given one."""
        child = self._location.child(step_name(step))
        if child.path is not None:
            return child.path
        if self._spec_given:
            assert child.spec is not None  # the children of a spec location are specs
            return child.spec
        return child.display

    def _storage(self) -> _storage.Storage:
        return _storage.open_storage(self._location)

    def _check_step(self, step: int) -> None:
        if step not in self._steps:
            raise NotCommittedError(
                f"step {step} is not a committed step of {self.directory}; committed steps: "
                f"{self.all_steps() or 'none'}"
            )

    def _metric(self, metrics: object) -> float | None:
        name = self.retention.best_metric
        return None if name is None else _retention.metric_value(metrics, name)

    def _apply_retention(self, is_primary: bool) -> None:
        # Every process computes the same decision from the same step list;
        # only the primary touches storage, after the new step committed.
        drop = sorted(set(self._steps) - self.retention.keep(self._steps))
        if is_primary and drop and not self._backup.wait_for(set(drop), self.timeout_s):
            log.warning(
                "steps %s are still waiting for their backup after %.0f s; deleting them "
                "anyway (their backups will fail and be listed in backup_errors)",
                drop,
                self.timeout_s,
            )
        for step in drop:
            if is_primary:
                try:
                    self._remove(step)
                except (OSError, ValueError) as e:  # an unreachable object store too
                    log.warning("could not delete step %d of %s: %s", step, self.directory, e)
            del self._steps[step]

    def _remove(self, step: int) -> None:
        # POSIX: renamed aside, then removed; object stores: the manifest
        # (the commit marker) first, then the data.
        self._storage().delete_checkpoint(step_name(step), deleting_name(step_name(step)))

    def _scan(self, clean: bool) -> dict[int, dict | None]:
        """Primary: committed steps and their metrics; removes our own leftovers."""
        parent = self._storage()
        found = _steps.walk(parent)
        damaged = [s for s in found.steps if s.state == _steps.DAMAGED]
        if damaged:  # restore would refuse it: say so now, not at the first restore
            s = damaged[0]
            raise CorruptCheckpointError(
                f"step {s.step} of {self.directory} has a damaged manifest ({s.why}); "
                "restore it from a backup, or move it out of the directory",
                [f"{s.storage.display}: {s.why}" for s in damaged],
            )
        if clean:
            # Clean-up never touches what a live save holds, of this job or
            # another one sharing the directory: an attempt whose lock is held
            # (POSIX) or that started recently (object stores) is left alone,
            # with its step.
            for name, _ in found.deleting:
                if not parent.child(name).has_live_attempt():
                    parent.remove_entry(name)
            for s in found.steps:
                if s.state == _steps.UNCOMMITTED:
                    if all(_layout.is_ours(e) for e in s.inside):  # a crashed save, unless live
                        parent.remove_leftover(s.name, deleting_name(s.name))
                else:  # also on object stores, where a commit leaves others to this
                    assert s.manifest is not None  # committed: damaged steps raised above
                    s.storage.remove_dead_attempts(keep=s.manifest.attempt)
        return {s.step: s.metrics for s in found.steps if s.state == _steps.COMMITTED}
