"""``restore``: match -> reshard -> plan reads -> read + verify -> assemble -> place.

Each process reads only the chunks that overlap the boxes its addressable
devices need under the *target* sharding, each chunk once, checks every
chunk's crc32c, and builds its arrays from those host buffers without a copy
where the platform allows (``_put``). The one XLA collective is the gather of
leaves replicated across processes, read in parts by ``_share``'s plan and
gathered once every process has read its part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distckpt import (
    _chunks,
    _commit,
    _knobs,
    _migrate,
    _multihost,
    _plan,
    _procstate,
    _read,
    _runtime,
    _share,
    _sources,
    _statearrays,
    _tree,
)
from distckpt._location import Location
from distckpt._manifest import Manifest
from distckpt._match import Mode, Want, batches, match, mismatch, place, want_host
from distckpt._plan import ChunkRecord
from distckpt._reshard import Box
from distckpt._source_restore import restore_source
from distckpt._storage import open_storage
from distckpt.errors import CorruptCheckpointError, TreeMismatchError


def restore(
    directory: Location,
    target: Any = None,
    *,
    partial: bool = False,
    cast: bool = False,
    rename: _migrate.Rename | None = None,
    drop: Iterable[str] | None = None,
    init: Any = None,
    pipeline: _procstate.Checkpointable | None = None,
    force_pipeline: bool = False,
    share: bool | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Restores a checkpoint, resharded onto ``target``; collective in a multi-process job.

    Args:
      directory: where the checkpoint was saved (a path, an ``s3://``,
        ``gs://`` or ``memory://`` URL, or a TensorStore kvstore spec); or a
        local Orbax checkpoint (a PyTree directory or a CheckpointManager
        step directory), a ``.safetensors`` file, or a directory of
        safetensors shards with its ``model.safetensors.index.json``
        (docs/formats.md: how names map to paths, what is read).
      target: a pytree saying what to return at each leaf:
        ``jax.ShapeDtypeStruct`` with ``.sharding`` (or a ``jax.Array``): a
        ``jax.Array`` with that shape, dtype and sharding, whatever mesh it
        was saved from; a numpy array: the full value on the host; a Python
        int/float/bool/str: the saved Python value; ``None``: nothing (the
        subtree under it is skipped). ``target=None`` returns every leaf as a
        host numpy array (Python values as saved) in the saved containers:
        dicts in their order, lists, tuples, empty ones, namedtuples (their
        class if already imported), other nodes as dicts of their fields
        (docs/training_state.md). Checkpoints written before distckpt
        recorded containers, and Orbax ones, give plain dicts and lists.
      partial: allow ``target`` to be a subtree of what was saved.
      cast: allow dtypes (and Python number types) to differ; values are
        converted. Without it a dtype difference is an error.
      rename, drop, init: restore into a tree whose key paths changed (see
        docs/training_state.md, "Layout migration"): ``rename`` maps saved
        paths (``a/b/c``; a dict of regular expressions to replacements, or a
        function) to target paths; ``drop`` lists patterns of saved paths to
        leave out; ``init`` gives the values of target leaves the checkpoint
        lacks (a tree like part of the target, or a function of the path).
        A difference none of them covers is an error listing every path,
        with a suggested ``rename``.
      pipeline: a ``distckpt.Checkpointable`` saved with ``save(...,
        pipeline=)``: its ``set_state`` is called with this process's saved
        state. Per-process state needs the process count it was saved with;
        global state (``checkpoint_global = True``) goes to every process.
        Its arrays come back as the types ``get_state`` gave (``jax.Array``
        on this process's first device, numpy, PRNG keys). If the saved
        state records what data it walks (``sampler_repr``,
        ``data_source_repr``, ``shard_count``, ``worker_count``) and
        ``pipeline.get_state()`` has other values, nothing is restored: a
        ``TreeMismatchError`` (also a ``ValueError``) names the fields.
      force_pipeline: give ``pipeline`` the saved state even if it was
        recorded for other data.
      share: read each byte of a leaf replicated across processes (a mesh
        axis its spec leaves unused spans processes: data-parallel replicas)
        from storage once, on one process, and gather it through the job's
        collectives (docs/protocol.md, "Read once, then share"). ``None``
        (default): ``DISTCKPT_RESTORE_SHARE``, automatic (leaves where that
        saves each process at least 4 MiB of reads); ``True``: every such leaf;
        ``False``: every process reads all it needs.
      timeout_s: longest wait for the slowest process (default 300 s or
        ``DISTCKPT_TIMEOUT_S``).

    Returns:
      A tree of ``target``'s structure (or the saved one for ``target=None``).

    Raises:
      NotCommittedError: nothing committed at ``directory``.
      TreeMismatchError: lists every missing, extra, reshaped or retyped leaf.
      CorruptCheckpointError: a checksum failed, or a file is missing or
        truncated; names the leaf and the file. Wrong data is never returned.

    Example::

      mesh = jax.make_mesh((2, 4), ("x", "y"))
      want = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32,
                                         sharding=NamedSharding(mesh, P("y", "x")))}
      state = distckpt.restore("/ckpt/step_1", want, partial=True)
    """
    kind = _sources.format_of(directory)
    if kind != _sources.DISTCKPT:  # Orbax, safetensors: read directly (docs/formats.md)
        if pipeline is not None:
            raise TreeMismatchError(
                f"restore of {directory}: pipeline= was given but this is a {kind} "
                "checkpoint, which holds no distckpt pipeline state; restore without pipeline="
            )
        return restore_source(
            directory,
            target,
            partial=partial,
            cast=cast,
            migration=_migrate.Migration.build(rename, drop, init),
            timeout_s=timeout_s,
        )
    if pipeline is not None:
        _procstate.check(pipeline)
    storage = open_storage(directory)
    coll = _multihost.Collective("restore", storage.display, _knobs.get("timeout_s", timeout_s))
    result: dict[str, Any] = {}

    def work() -> dict:
        share_plan = None
        raw = storage.read_manifest()
        manifest = _commit.load(storage, raw)
        assert raw is not None  # else load() raised NotCommittedError
        # The pipeline state's arrays, if any, are the last leaves: not the tree's.
        arrays = _procstate.array_leaves(
            manifest.process_state, [spec.path for spec in manifest.leaves], storage.display
        )
        tree_leaves = manifest.leaves[: len(manifest.leaves) - arrays]
        if pipeline is not None:
            raw_state = _procstate.saved_state(
                manifest.process_state, coll.pid, coll.count, storage.display
            )
            # Refused before any read, on every process alike (the phase's error).
            state = _procstate.decode(raw_state)
            _procstate.identity_check(pipeline, state, force=force_pipeline)
            if arrays:
                state = _pipeline_arrays(storage, manifest, state, arrays)
            result["state"] = state
        if target is None and arrays and "arrays" not in (manifest.process_state or {}):
            # A Checkpointable the handler saved before the state's arrays were data:
            # its tree was those arrays alone (their record of containers, too).
            result["tree"] = {}
        elif target is None:
            wants = [want_host(i, i, spec) for i, spec in enumerate(tree_leaves)]
            values = _execute(storage, manifest, wants, len(wants))
            result["tree"] = rebuild(manifest, values, storage.display, len(tree_leaves))
        else:
            migration = _migrate.Migration.build(rename, drop, init)
            result["gather"] = _restore_into(
                storage, manifest, target, partial, cast, migration, share, len(tree_leaves)
            )
            share_plan = result["gather"].digest
        return {
            "commit": _commit.identity(manifest, raw),
            "where": storage.display,
            "share": share_plan,
        }

    with _runtime.paused_gc():
        # Every process read its values from the commit record it found; they
        # form one global array only if that record is the same everywhere.
        coll.run(
            "restore",
            work,
            last=True,
            agree=lambda opened: [opened["commit"], opened["share"]],
            disagree=_disagree,
        )
        if "gather" in result:  # all read their parts and agree: the collectives, if any
            result["tree"] = result["gather"].tree()
    if pipeline is not None:  # only once the arrays are in: no half-restored state
        pipeline.set_state(result["state"])
    return result["tree"]


def _pipeline_arrays(storage: Any, manifest: Manifest, state: Any, count: int) -> Any:
    """``state`` (with ``Ref``\\ s) with its arrays, read from the last ``count`` leaves."""
    per_process = manifest.process_state is not None and manifest.process_state["mode"] != "global"
    first = len(manifest.leaves) - count
    specs = manifest.leaves[first:]
    items = [
        (spec.path, _statearrays.want(spec.array_shape, str(spec.dtype), per_process))
        for spec in specs
    ]
    wants, problems = match(specs, items, partial=False, cast=False)
    if problems:
        raise mismatch(storage.display, problems)
    wants = [dataclasses.replace(w, leaf=w.leaf + first) for w in wants]
    values = _execute(storage, manifest, wants, len(items))
    arrays = _statearrays.own(values, per_process)
    return _statearrays.join(state, arrays, per_process)


def _disagree(everyone: list[dict]) -> None:
    _commit.check_same_checkpoint(everyone, "restore")
    _share.check_same(everyone)


def _restore_into(
    storage: Any,
    manifest: Manifest,
    target: Any,
    partial: bool,
    cast: bool,
    migration: _migrate.Migration | None = None,
    share: bool | None = None,
    tree_leaves: int | None = None,
) -> _share.Gather:
    """``tree_leaves``: how many of the manifest's leaves are the tree's (the rest
    are a pipeline state's arrays); all by default."""
    items, treedef = _tree.flatten(target)
    reads = _share.plan(items, share)  # leaves replicated across processes: read in parts
    hints: list[str] = []
    wants, problems = match(
        manifest.leaves[:tree_leaves],
        reads.items,
        partial=partial,
        cast=cast,
        migration=migration,
        hints=hints,
    )
    if problems:
        raise mismatch(storage.display, problems, hints)
    values = _execute(storage, manifest, wants, len(items))
    return _share.Gather(reads, wants, values, treedef)


def rebuild(
    manifest: Manifest, values: Sequence[Any], where: str, tree_leaves: int | None = None
) -> Any:
    """The saved tree around ``values`` (one per saved leaf of the tree: the first
    ``tree_leaves``, all by default): what ``restore(dir)`` returns.

    With the manifest's ``structure`` record, containers come back as saved;
    a checkpoint written before the record existed gives plain dicts and lists.
    """
    leaves = manifest.leaves[:tree_leaves]
    items = [(spec.path, v) for spec, v in zip(leaves, values, strict=True)]
    if manifest.structure is None:
        return _tree.unflatten_plain(items)
    try:
        return _tree.rebuild(manifest.structure, items)
    except _tree.StructureError as e:
        raise CorruptCheckpointError(
            f"the manifest of {where} is damaged: its record of the saved containers does not "
            f"fit its leaves ({e}). Restore with a target (distckpt.abstract_like of your "
            "state), which does not use that record, or restore an older step.",
            [f"{where}: structure: {e}"],
        ) from None


# --------------------------------------------------------------------------- matching


def _threads() -> int:
    """Reading threads: ``io_threads``, fewer if their buffers would take over half the budget."""
    return _plan.restore_threads(
        _knobs.get("memory_bytes"), threads=_knobs.get("io_threads"), range_bytes=_read.RANGE_BYTES
    )


def _batches(wants: list[Want], manifest: Manifest, budget: int | None) -> Iterator[list[Want]]:
    """Groups ``wants`` into batches of at most ``budget`` bytes of output (a larger
    leaf goes alone); None: what ``memory_bytes`` leaves after the reading threads'
    scratch buffers (``_plan.restore_batch_bytes``)."""
    if budget is None:
        budget = _plan.restore_batch_bytes(
            _knobs.get("memory_bytes"), threads=_threads(), range_bytes=_read.RANGE_BYTES
        )
    return batches(wants, manifest.leaves, budget)


def _execute(storage: Any, manifest: Manifest, wants: list[Want], count: int) -> list[Any]:
    values: list[Any] = [None] * count
    sizes: dict[str, int | None] = {}  # data file sizes, stat'd once
    threads = _threads()
    with (
        storage.reader(manifest.attempt) as reader,
        ThreadPoolExecutor(threads, thread_name_prefix="distckpt-read") as pool,
    ):
        # Only the indexes of the processes that wrote what this process needs are read.
        table = _chunks.ChunkTable(manifest, reader, storage.display)
        table.prefetch((w.leaf, box) for w in wants if w.mode != Mode.VALUE for box in w.boxes)
        for batch in _batches(wants, manifest, _knobs.get("read_batch_bytes")):
            needs: dict[tuple[int, Box], list[ChunkRecord]] = {}
            for w in batch:
                if w.mode == Mode.VALUE:
                    continue
                for box in w.boxes:
                    needs[(w.leaf, box)] = table.overlapping(w.leaf, box)
            ranges = _plan.plan_reads(
                (c for cs in needs.values() for c in cs), max_range_bytes=_read.RANGE_BYTES
            )
            _read.check_files_hold(reader, ranges, manifest, sizes)
            assembler = _read.Assembler(needs, manifest)
            problems = _read.read_ranges(
                reader, ranges, manifest, pool, assembler.consume, assembler.adopt
            )
            if problems:
                raise _read.corrupt(storage.display, problems)
            place(batch, manifest.leaves, assembler.outputs, values)
    return values
