"""``restore``: match -> reshard -> plan reads -> read + verify -> assemble -> place.

Each process reads only the chunks that overlap the boxes its addressable
devices need under the *target* sharding, each chunk once, checks every
chunk's crc32c, and builds its arrays from those host buffers without a copy
where the platform allows (``_put``). No XLA collectives are used.
"""

from __future__ import annotations

import bisect
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c
import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from distckpt import (
    _codec,
    _commit,
    _knobs,
    _migrate,
    _multihost,
    _plan,
    _procstate,
    _put,
    _reshard,
    _runtime,
    _target,
    _tree,
)
from distckpt._manifest import Manifest
from distckpt._plan import ChunkRecord, LeafSpec, ReadRange
from distckpt._reshard import Box
from distckpt._storage import ALIGN, aligned_empty, open_storage
from distckpt.errors import CorruptCheckpointError, TreeMismatchError

_HOST, _ARRAY, _KEY, _VALUE = "host", "array", "key", "value"
_MAX_RANGE = 16 << 20  # largest single read; also the size of each thread's scratch buffer
_X64_OFF = "jax_enable_x64 is off"
_X64_ON = 'jax.config.update("jax_enable_x64", True)'


@dataclass
class _Want:
    """One target leaf to produce."""

    index: int  # position in the flattened target
    leaf: int  # index of the saved leaf
    mode: str  # _HOST, _ARRAY, _KEY or _VALUE
    dtype: np.dtype | None = None  # dtype to return (after an allowed cast)
    sharding: Any = None  # of the (key data) array, for _ARRAY / _KEY
    device_boxes: Sequence[tuple[Any, Box]] = ()  # (addressable device, the box it holds)
    boxes: Sequence[Box] = ()  # the distinct boxes to read, for every mode but _VALUE
    value: Any = None  # for _VALUE


def restore(
    directory: Any,
    target: Any = None,
    *,
    partial: bool = False,
    cast: bool = False,
    rename: Any = None,
    drop: Any = None,
    init: Any = None,
    pipeline: Any = None,
    timeout_s: float | None = None,
) -> Any:
    """Restores a checkpoint, resharded onto ``target``; collective in a multi-process job.

    Args:
      directory: where the checkpoint was saved.
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
    from distckpt import _orbax

    if _orbax.looks_like_orbax(directory):  # read an Orbax checkpoint directly (docs/cli.md)
        if pipeline is not None:
            raise TreeMismatchError(
                f"restore of {directory}: pipeline= was given but this is an Orbax "
                "checkpoint, which holds no distckpt pipeline state; restore without pipeline="
            )
        return _orbax.restore(directory, target, partial=partial, cast=cast)
    if pipeline is not None:
        _procstate.check(pipeline)
    storage = open_storage(directory)
    coll = _multihost.Collective("restore", storage.display, _knobs.get("timeout_s", timeout_s))
    result: dict[str, Any] = {}

    def work() -> dict:
        raw = storage.read_manifest()
        manifest = _commit.load(storage, raw)
        if pipeline is not None:
            result["state"] = _procstate.saved_state(
                manifest.process_state, coll.pid, coll.count, storage.display
            )
        if target is None:
            wants = [want_host(i, i, spec) for i, spec in enumerate(manifest.leaves)]
            values = _execute(storage, manifest, wants, len(wants))
            result["tree"] = rebuild(manifest, values, storage.display)
        else:
            migration = _migrate.Migration.build(rename, drop, init)
            result["tree"] = _restore_into(storage, manifest, target, partial, cast, migration)
        return {"commit": _commit.identity(manifest, raw), "where": storage.display}

    with _runtime.paused_gc():
        opened = coll.run("restore", work, last=True)
    # Every process read its values from the commit record it found; they
    # form one global array only if that record is the same everywhere.
    _commit.check_same_checkpoint(opened, "restore")
    if result.get("state") is not None:  # only once the arrays are in: no half-restored state
        _procstate.restore_into(pipeline, result["state"])
    return result["tree"]


def _restore_into(
    storage: Any,
    manifest: Manifest,
    target: Any,
    partial: bool,
    cast: bool,
    migration: _migrate.Migration | None = None,
) -> Any:
    items, treedef = _tree.flatten(target)
    hints: list[str] = []
    wants, problems = match(
        manifest.leaves, items, partial=partial, cast=cast, migration=migration, hints=hints
    )
    if problems:
        raise TreeMismatchError(
            f"the restore target does not match the checkpoint at {storage.display} "
            f"({len(problems)} difference(s)):\n  " + "\n  ".join(problems + hints),
            problems,
        )
    values = _execute(storage, manifest, wants, len(items))
    return jax.tree_util.tree_unflatten(treedef, values)


def rebuild(manifest: Manifest, values: Sequence[Any], where: str) -> Any:
    """The saved tree around ``values`` (one per saved leaf): what ``restore(dir)`` returns.

    With the manifest's ``structure`` record, containers come back as saved;
    a checkpoint written before the record existed gives plain dicts and lists.
    """
    items = [(spec.path, v) for spec, v in zip(manifest.leaves, values, strict=True)]
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


def want_host(index: int, leaf: int, spec: LeafSpec, dtype: np.dtype | None = None) -> _Want:
    if spec.kind == _tree.PYTHON:
        return _Want(index, leaf, _VALUE, value=spec.value)
    if spec.kind == _tree.NONE:
        return _Want(index, leaf, _VALUE, value=None)
    mode = _KEY if spec.kind == _tree.PRNG_KEY else _HOST
    return _Want(
        index,
        leaf,
        mode,
        dtype=dtype or _plan.np_dtype(spec.dtype),
        boxes=(_reshard.full_box(spec.shape),),
    )


def _key_impl_name(dtype: Any) -> str | None:
    # Key dtypes carry their implementation; jax has no public accessor for a
    # dtype (jax.random.key_impl wants an array), so read its name.
    impl = getattr(dtype, "_impl", None)
    return getattr(impl, "name", None)


def _key_data_sharding(sharding: Any, ndim: int, extra: int) -> Any:
    """The sharding of a key array's data: the key's sharding, trailing dims unsplit."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec, *([None] * extra)))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise TypeError(
        f"restoring typed PRNG keys onto a {type(sharding).__name__} is not supported; "
        "use a NamedSharding or a single device"
    )


def match(
    leaves: Sequence[LeafSpec],
    items: Sequence[tuple[_tree.Path, Any]],
    *,
    partial: bool,
    cast: bool,
    migration: _migrate.Migration | None = None,
    hints: list[str] | None = None,
) -> tuple[list[_Want], list[str]]:
    """Pairs target leaves with the saved ``leaves``; returns (wants, every problem found).

    ``hints``, if given, receives a suggested ``rename`` for the problems.
    """
    saved, problems = {}, []
    for i, s in enumerate(leaves):
        key = _tree.match_key(s.path)
        new = migration.renamed(key) if migration else key
        if new in saved:
            other = leaves[saved[new]].display
            problems.append(f"rename maps both {other} and {s.display} to {_migrate.slash(new)}")
        saved[new] = i
    wants, used, skipped, missing = [], set(), [], {}
    for index, (path, t) in enumerate(items):
        key, disp = _tree.match_key(path), _tree.display(path)
        if t is None:
            skipped.append(key)
            continue
        leaf = saved.get(key)
        if leaf is None:
            has, value = migration.initial(key) if migration else (False, None)
            if has:
                wants.append(_Want(index, -1, _VALUE, value=value))
                continue
            problems.append(f"{disp}: in the target but not in the checkpoint")
            missing[_migrate.slash(key)] = _shape_dtype(t)
            continue
        used.add(key)
        spec = leaves[leaf]
        want, problem = _match_leaf(index, leaf, spec, t, disp, cast)
        if problem:
            problems.append(problem)
        else:
            wants.append(want)
    unused = {}
    for key, leaf in saved.items():
        if key in used or any(key[: len(p)] == p for p in skipped):
            continue
        spec = leaves[leaf]
        unused[_migrate.slash(_tree.match_key(spec.path))] = (
            tuple(spec.shape) if spec.shape is not None else None,
            spec.dtype,
        )
        if partial or (migration and migration.dropped(_tree.match_key(spec.path))):
            continue
        problems.append(
            f"{spec.display}: in the checkpoint ({spec.describe()}) but not in the target "
            "(pass partial=True to leave it out, or drop= to leave out just these)"
        )
    pairs = _migrate.suggestions(missing, unused)
    if pairs and hints is not None:
        hints.append(
            "if these are renames, restore(..., rename={" + ", ".join(pairs) + "}) "
            "maps them; new leaves can come from init=, removed ones go with drop="
        )
    return wants, problems


def _shape_dtype(t: Any) -> tuple:
    shape = getattr(t, "shape", None)
    dtype = getattr(t, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return (None, None)  # key data shapes differ from key shapes: no suggestion
    return (
        tuple(shape) if shape is not None else None,
        str(np.dtype(dtype)) if dtype is not None else None,
    )


def _match_leaf(
    index: int, leaf: int, spec: LeafSpec, t: Any, disp: str, cast: bool
) -> tuple[_Want | None, str | None]:
    def found() -> str:  # only on the error path: describing costs per leaf
        return f"checkpoint has {spec.describe()}"

    if isinstance(t, _tree.PYTHON_TYPES):
        if spec.kind != _tree.PYTHON:
            return None, f"{disp}: target is a Python {type(t).__name__}, {found()}"
        value = spec.value
        if type(value) is not type(t):
            numbers = (int, float)
            if cast and isinstance(value, numbers) and type(t) in numbers:
                value = type(t)(value)
            else:
                hint = " (pass cast=True to convert)" if isinstance(value, (int, float)) else ""
                return None, f"{disp}: target is a Python {type(t).__name__}, {found()}{hint}"
        return _Want(index, leaf, _VALUE, value=value), None

    if isinstance(t, (np.ndarray, np.generic)):
        shape, dtype, sharding = t.shape, np.dtype(t.dtype), None
    elif isinstance(t, (jax.Array, jax.ShapeDtypeStruct)):
        shape, dtype, sharding = tuple(t.shape), t.dtype, getattr(t, "sharding", None)
        try:
            sharding = _target.concrete(sharding, disp, "restore")
        except TreeMismatchError as e:
            return None, str(e)
    else:
        return None, (
            f"{disp}: unsupported target leaf of type {type(t).__qualname__}; use a "
            "jax.ShapeDtypeStruct, a jax.Array, a numpy array, a Python scalar or None"
        )

    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        impl = _key_impl_name(dtype)
        if spec.kind != _tree.PRNG_KEY:
            return None, f"{disp}: target is a PRNG key array ({impl}), {found()}"
        if impl != spec.impl:
            return None, f"{disp}: target keys use {impl}, {found()}"
        if tuple(spec.shape[: len(shape)]) != tuple(shape):
            return None, f"{disp}: target key shape {tuple(shape)}, {found()}"
        extra = len(spec.shape) - len(shape)
        if sharding is None:
            sharding = SingleDeviceSharding(jax.local_devices()[0])
        data_sharding = _key_data_sharding(sharding, len(shape), extra)
        return _device_want(
            index, leaf, _KEY, spec, _plan.np_dtype(spec.dtype), data_sharding
        ), None

    if not spec.stored or spec.kind == _tree.PRNG_KEY:
        return None, f"{disp}: target is an array {np.dtype(dtype)}{list(shape)}, {found()}"
    if tuple(shape) != tuple(spec.shape):
        return None, f"{disp}: target shape {tuple(shape)}, {found()}"
    saved_dtype = _plan.np_dtype(spec.dtype)
    host = isinstance(t, (np.ndarray, np.generic))
    if np.dtype(dtype) != saved_dtype and not cast:
        hint = "pass cast=True to convert"
        if not host and not _put.jax_holds(saved_dtype):
            hint = (
                f"{_X64_OFF}: to get {saved_dtype}, call {_X64_ON} first; or pass cast=True to "
                "convert (refused if a value would not fit)"
            )
        return None, f"{disp}: target dtype {np.dtype(dtype)}, {found()} ({hint})"
    if not host and not _put.jax_holds(np.dtype(dtype)):
        held = jax.dtypes.canonicalize_dtype(dtype)
        return None, (
            f"{disp}: target dtype {np.dtype(dtype)} for a jax.Array, {found()}, but {_X64_OFF} "
            f"and JAX would hold it as {held}, changing values silently. Call {_X64_ON} before "
            f"restoring, or ask for {held} in the target"
            + (" with cast=True (refused if a value would not fit)" if held != saved_dtype else "")
            + ", or restore into a numpy array"
        )
    if host:
        return want_host(index, leaf, spec, np.dtype(dtype)), None
    if sharding is None:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    return _device_want(index, leaf, _ARRAY, spec, np.dtype(dtype), sharding), None


def _device_want(
    index: int, leaf: int, mode: str, spec: LeafSpec, dtype: np.dtype, sharding: Any
) -> _Want:
    device_boxes, boxes = _device_boxes(sharding, tuple(spec.shape))
    return _Want(
        index, leaf, mode, dtype=dtype, sharding=sharding, device_boxes=device_boxes, boxes=boxes
    )


@functools.lru_cache(maxsize=4096)
def _device_boxes(
    sharding: Any, shape: tuple[int, ...]
) -> tuple[tuple[tuple[Any, Box], ...], tuple[Box, ...]]:
    """The box each addressable device holds, and the distinct ones (cached: states repeat shardings)."""
    pairs = tuple(
        (d, _reshard.box_from_index(idx, shape))
        for d, idx in sharding.addressable_devices_indices_map(shape).items()
    )
    return pairs, tuple(dict.fromkeys(box for _, box in pairs))


# --------------------------------------------------------------------------- reading


class _ChunkIndex:
    """Finds which of a leaf's chunk boxes overlap a box without scanning all of them.

    Built per chunk layout and shared (``_chunk_index``): the leaves of a
    state repeat a few layouts, so each overlap is worked out once.
    """

    def __init__(self, boxes: tuple[Box, ...]):
        self.order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][0] if boxes[i] else 0)
        self.boxes = boxes
        self.starts = [boxes[i][0][0] if boxes[i] else 0 for i in self.order]
        self.longest = max((b[0][1] - b[0][0] for b in boxes if b), default=0)
        self.memo: dict[Box, tuple[int, ...]] = {}

    def overlapping(self, box: Box) -> tuple[int, ...]:
        """Positions (in the leaf's chunk list) of the chunks holding any element of ``box``."""
        found = self.memo.get(box)
        if found is None:
            candidates = self.order
            if box and len(self.order) >= 16:
                lo = bisect.bisect_left(self.starts, box[0][0] - self.longest + 1)
                hi = bisect.bisect_left(self.starts, box[0][1])
                candidates = self.order[lo:hi]
            found = self.memo[box] = tuple(
                sorted(
                    i
                    for i in candidates
                    if not box or _reshard.intersect(self.boxes[i], box) is not None
                )
            )
        return found


@functools.lru_cache(maxsize=256)
def _chunk_index(boxes: tuple[Box, ...]) -> _ChunkIndex:
    return _ChunkIndex(boxes)


def read_ranges(
    reader: Any,
    ranges: Sequence[ReadRange],
    manifest: Manifest,
    pool: ThreadPoolExecutor,
    consume: Callable[[ChunkRecord, np.ndarray], None] | None = None,
    adopt: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
) -> list[str]:
    """Reads ``ranges`` in parallel, checks every chunk's crc32c, hands good chunks to ``consume``.

    ``consume`` runs on the reading thread, so copying into place overlaps
    with other reads. A range is read into a per-thread scratch buffer
    (allocated once, so no fresh pages per read) unless it holds a chunk in
    ``adopt``, whose bytes ``consume`` keeps without copying.

    Returns:
      Every problem found (missing or truncated files, checksum failures).
    """
    local = threading.local()

    def scratch(nbytes: int) -> np.ndarray:
        buf = getattr(local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = local.buf = aligned_empty((nbytes,), np.dtype(np.uint8))
        return buf[:nbytes]

    def one(r: ReadRange) -> list[str]:
        fresh = any((c.file, c.offset) in adopt for c in r.chunks)
        try:
            buf = reader.read(r.file, r.offset, r.nbytes, out=None if fresh else scratch(r.nbytes))
        except CorruptCheckpointError as e:
            leaves = sorted({manifest.leaves[c.leaf].display for c in r.chunks})
            return [f"{p} (holds {', '.join(leaves[:4])})" for p in e.problems]
        problems = []
        for c in r.chunks:
            view = buf[c.offset - r.offset : c.offset - r.offset + c.nbytes]
            actual = crc32c.crc32c(view)
            spec = manifest.leaves[c.leaf]
            where = (
                f"{spec.display}: chunk {[list(b) for b in c.box]} in "
                f"{reader.display}/{c.file} bytes {c.offset}..{c.offset + c.nbytes}"
            )
            if actual != c.crc32c:
                problems.append(
                    f"{where} fails its crc32c (stored {c.crc32c:#010x}, read {actual:#010x})"
                )
                continue
            if spec.compression is not None:
                try:
                    view = _codec.decompress(
                        spec.compression, view, _reshard.box_size(c.box) * spec.itemsize
                    )
                except ValueError as e:
                    problems.append(f"{where}: {e}")
                    continue
            if consume is not None:
                consume(c, view)
        return problems

    return [p for bad in pool.map(one, ranges) for p in bad]


class _Assembler:
    """Builds each needed box of a batch from the chunks as they arrive."""

    def __init__(self, needs: dict[tuple[int, Box], list[ChunkRecord]], manifest: Manifest):
        self.outputs: dict[tuple[int, Box], np.ndarray] = {}
        self.consumers: dict[tuple[str, int], list[tuple[tuple[int, Box], np.dtype, bool]]] = {}
        self.adopt: set[tuple[str, int]] = set()
        for (leaf, box), chunks in needs.items():
            dtype = _plan.np_dtype(manifest.leaves[leaf].dtype)
            whole = len(chunks) == 1 and chunks[0].box == box
            if whole:  # the chunk is the box: keep its bytes, no copy
                self.adopt.add((chunks[0].file, chunks[0].offset))
            else:
                self.outputs[(leaf, box)] = aligned_empty(_reshard.box_shape(box), dtype)
            for c in chunks:
                self.consumers.setdefault((c.file, c.offset), []).append(
                    ((leaf, box), dtype, whole)
                )

    def consume(self, c: ChunkRecord, view: np.ndarray) -> None:
        for key, dtype, whole in self.consumers[(c.file, c.offset)]:
            src = view.view(dtype).reshape(_reshard.box_shape(c.box))
            if whole:
                if src.ctypes.data % ALIGN:
                    src = src.copy()  # unaligned: JAX would copy it anyway
                self.outputs[key] = src
                continue
            into, out_of = _reshard.copy_slices(c.box, key[1])
            self.outputs[key][into] = src[out_of]


def _batches(wants: list[_Want], manifest: Manifest, budget: int) -> Iterator[list[_Want]]:
    batch, size = [], 0
    for w in wants:
        nbytes = 0
        if w.mode != _VALUE:
            spec = manifest.leaves[w.leaf]
            nbytes = sum(_reshard.box_size(b) for b in w.boxes) * spec.itemsize
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(w)
        size += nbytes
    if batch:
        yield batch


def _execute(storage: Any, manifest: Manifest, wants: list[_Want], count: int) -> list[Any]:
    values: list[Any] = [None] * count
    indexes: dict[int, _ChunkIndex] = {}  # by leaf
    sizes: dict[str, int | None] = {}  # data file sizes, stat'd once
    threads = _knobs.get("io_threads")
    with (
        storage.reader(manifest.attempt) as reader,
        ThreadPoolExecutor(threads, thread_name_prefix="distckpt-read") as pool,
    ):
        for batch in _batches(wants, manifest, _knobs.get("read_batch_bytes")):
            needs: dict[tuple[int, Box], list[ChunkRecord]] = {}
            for w in batch:
                if w.mode == _VALUE:
                    continue
                spec = manifest.leaves[w.leaf]
                chunks = manifest.chunks[w.leaf]
                if w.leaf not in indexes:
                    _check_chunk_table(spec, chunks, storage.display)
                    indexes[w.leaf] = _chunk_index(tuple(c.box for c in chunks))
                for box in w.boxes:
                    needs[(w.leaf, box)] = [chunks[i] for i in indexes[w.leaf].overlapping(box)]
            ranges = _plan.plan_reads(
                (c for cs in needs.values() for c in cs), max_range_bytes=_MAX_RANGE
            )
            _check_files_hold(reader, ranges, manifest, sizes)
            assembler = _Assembler(needs, manifest)
            problems = read_ranges(
                reader, ranges, manifest, pool, assembler.consume, assembler.adopt
            )
            if problems:
                raise CorruptCheckpointError(
                    f"checkpoint at {storage.display} is corrupt; refusing to return wrong data "
                    f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:20]),
                    problems,
                )
            place(batch, manifest.leaves, assembler.outputs, values)
    return values


def _check_files_hold(
    reader: Any, ranges: list[ReadRange], manifest: Manifest, sizes: dict[str, int | None]
) -> None:
    """Refuses ranges past the end of their file before anything is allocated for them.

    A manifest can be self-consistent and still describe far more data than
    the files hold (a damaged or crafted one); without this check restore
    would first try to allocate it all. Missing files are left to the read,
    which names them per leaf.
    """
    if not reader.sizes_are_cheap():
        return
    problems = []
    for r in ranges:
        if r.file not in sizes:
            sizes[r.file] = reader.size(r.file)
        size = sizes[r.file]
        if size is not None and r.offset + r.nbytes > size:
            leaves = sorted({manifest.leaves[c.leaf].display for c in r.chunks})
            problems.append(
                f"{reader.display}/{r.file}: holds {size} bytes but chunks of "
                f"{', '.join(leaves)} lie at bytes {r.offset}..{r.offset + r.nbytes} "
                "(the file is truncated or the manifest is wrong)"
            )
    if problems:
        raise CorruptCheckpointError(
            f"checkpoint at {reader.display} is corrupt; refusing to return wrong data "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:20]),
            problems,
        )


def _check_chunk_table(spec: LeafSpec, chunks: list[ChunkRecord], where: str) -> None:
    """Refuses a manifest whose chunks would leave part of a leaf unfilled."""
    lines = _plan.chunk_table_problems(spec, chunks)
    if lines:
        raise CorruptCheckpointError(
            f"the manifest of {where} is damaged:\n  " + "\n  ".join(lines[:20]), lines
        )


def place(
    wants: Sequence[_Want], leaves: Sequence[LeafSpec], outputs: dict, values: list[Any]
) -> None:
    """Sets ``values[w.index]`` for each want from the host blocks read for it.

    ``outputs[(leaf, box)]`` holds the saved data of every box in ``w.boxes``;
    host wants get a numpy array, the others device arrays (cast as asked,
    PRNG keys wrapped).
    """
    jobs, owners = [], []
    for w in wants:
        if w.mode == _VALUE:
            values[w.index] = w.value
            continue
        spec = leaves[w.leaf]
        saved = _plan.np_dtype(spec.dtype)
        hosts = {}
        for box in w.boxes:
            hosts[box] = outputs[(w.leaf, box)]
        if w.mode != _KEY and w.dtype != saved:
            hosts = _cast(hosts, w.dtype, spec)
        if w.sharding is None:  # host value (or a key array from target=None)
            arr = hosts[_reshard.full_box(spec.shape)]
            if w.mode == _KEY:
                values[w.index] = jax.random.wrap_key_data(arr, impl=spec.impl)
            else:
                values[w.index] = arr
            continue
        jobs.append((tuple(spec.shape), w.dtype, w.sharding, w.device_boxes, hosts))
        owners.append(w)
    for w, arr in zip(owners, _put.arrays(jobs), strict=True):
        if w.mode == _KEY:
            arr = jax.random.wrap_key_data(arr, impl=leaves[w.leaf].impl)
        values[w.index] = arr


def _cast(hosts: dict[Box, np.ndarray], dtype: np.dtype, spec: LeafSpec) -> dict[Box, np.ndarray]:
    """The blocks of a leaf converted to ``dtype`` (``cast=True``).

    Rounding is what a cast means; a value the conversion would change
    otherwise (an integer out of range, a finite float that overflows, a
    dropped imaginary part) is refused rather than wrapped silently.
    """
    changed, example = 0, ""
    for arr in hosts.values():
        n, what = _cast_loss(arr, dtype)
        changed, example = changed + n, example or what
    if changed:
        problem = (
            f"{spec.display}: cast=True to {dtype} would change {changed} of the saved "
            f"{spec.dtype} values (e.g. {example})"
        )
        raise TreeMismatchError(
            f"{problem}. Restore into {spec.dtype} instead (a jax.Array target needs "
            f"{_X64_ON} for 64-bit dtypes) or into a numpy array target.",
            [problem],
        )
    out = {}
    for box, arr in hosts.items():
        out[box] = aligned_empty(arr.shape, dtype)
        with warnings.catch_warnings():  # imaginary parts are all 0 (checked above)
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            out[box][...] = arr
    return out


def _number_kind(dtype: np.dtype) -> str | None:
    """b, i, f or c for bool, integer, float and complex dtypes (ml_dtypes' too), else None."""
    for kind, group in (
        ("b", np.bool_),
        ("i", np.integer),
        ("f", np.floating),
        ("c", np.complexfloating),
    ):
        if jax.dtypes.issubdtype(dtype, group):
            return kind
    return None


def _cast_loss(src: np.ndarray, dtype: np.dtype) -> tuple[int, str]:
    """How many values of ``src`` converting to ``dtype`` changes beyond rounding, and one."""
    have, want = _number_kind(src.dtype), _number_kind(dtype)
    if src.size == 0 or have is None or want is None or want == "b":
        return 0, ""
    if src.dtype.kind == "V":  # bfloat16, int4, float8_*: compare as plain numpy numbers
        src = src.astype(np.int64 if have == "i" else np.float32)
    if have == "c" and want != "c":
        bad = src.imag != 0
        if bad.any():
            return int(np.count_nonzero(bad)), f"{src[bad].flat[0]} would lose its imaginary part"
        src, have = src.real, "f"
    with np.errstate(over="ignore", invalid="ignore"):
        if want == "i":
            info = ml_dtypes.iinfo(dtype)
            if have == "f":
                bad = ~np.isfinite(src) | (src <= info.min - 1) | (src >= info.max + 1)
            else:
                bad = (src < info.min) | (src > info.max)
            what = "does not fit"
        else:
            bad = np.isfinite(src) & ~np.isfinite(src.astype(dtype))
            what = "would become infinite or NaN in"
    count = int(np.count_nonzero(bad))
    return count, (f"{src[bad].flat[0]} {what} {dtype}" if count else "")
