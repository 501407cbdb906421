"""``restore`` of a checkpoint of another format (Orbax, safetensors), in a job of any size.

The same matching and placing as a distckpt restore, over a
:class:`~distckpt._sources.Source`. Per process, in one phase of a
``_multihost.Collective``:

1. (every process) open the source: read its metadata (Orbax's
   ``_METADATA``, the safetensors headers), checked;
2. (every process) match the target; the boxes its addressable devices
   need are read through the source (TensorStore for Orbax, ``pread`` of
   byte ranges for safetensors), in batches of bounded size, and placed;
3. (every process) the phase's barrier: all agree they read the same
   checkpoint (the source's ``identity``, a digest of what step 1 read),
   and an error on any process is raised on every process, as the same
   type, naming the process; a process that does not arrive within
   ``timeout_s`` is a ``BarrierTimeoutError`` everywhere.

No XLA collective: each process builds its own shards.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from distckpt import _knobs, _multihost, _plan, _reshard, _runtime, _sources, _tree
from distckpt._location import Location
from distckpt._match import Mode, Want, batches, match, mismatch, place, want_host
from distckpt._migrate import Migration
from distckpt._reshard import Box
from distckpt._storage import aligned_empty
from distckpt.errors import InconsistentProcessesError, TreeMismatchError

_TITLES = {"orbax": "Orbax"}  # format names as people write them


def restore_source(
    directory: Location,
    target: Any,
    *,
    partial: bool,
    cast: bool,
    migration: Migration | None,
    timeout_s: float | None,
) -> Any:
    """``distckpt.restore`` of the Orbax or safetensors checkpoint at ``directory``."""
    where = str(directory)
    coll = _multihost.Collective("restore", where, _knobs.get("timeout_s", timeout_s))
    result: dict[str, Any] = {}

    def work() -> dict:
        with _sources.open_source(directory) as source:
            result["tree"] = read_into(
                source, target, partial=partial, cast=cast, migration=migration
            )
            return {
                "format": source.format,
                "identity": source.identity,
                "where": source.display,
                "process": coll.pid,
            }

    with _runtime.paused_gc():
        coll.run(
            "restore",
            work,
            last=True,
            agree=lambda p: [p.get("format"), p.get("identity")],
            disagree=_disagree,
        )
    return result["tree"]


def _disagree(everyone: list[Any]) -> None:
    lines = [
        f"process {p}: {(d or {}).get('format')} checkpoint {(d or {}).get('where')} "
        f"(digest {str((d or {}).get('identity'))[:12]})"
        for p, d in enumerate(everyone)
    ]
    raise InconsistentProcessesError(
        "restore: the processes did not read the same checkpoint; each must see the same "
        "files (a shared file system, or identical copies):\n  " + "\n  ".join(lines)
    )


def read_into(
    source: _sources.Source,
    target: Any,
    *,
    partial: bool = False,
    cast: bool = False,
    migration: Migration | None = None,
) -> Any:
    """This process's part of ``restore`` from ``source``: match, read its boxes, place.

    Raises:
      TreeMismatchError: every difference between ``target`` and the source.
    """
    what = f"{_TITLES.get(source.format, source.format)} checkpoint"
    if target is None:
        _check_nests(source)
        wants = [want_host(i, i, spec) for i, spec in enumerate(source.leaves)]
        count = len(wants)
    else:
        items, treedef = _tree.flatten(target)
        hints: list[str] = []
        wants, problems = match(
            source.leaves, items, partial=partial, cast=cast, migration=migration, hints=hints
        )
        if problems:
            raise mismatch(source.display, problems, hints, what=what)
        count = len(items)
    values: list[Any] = [None] * count
    threads = _knobs.get("io_threads")
    with ThreadPoolExecutor(threads, thread_name_prefix="distckpt-read") as pool:
        for batch in batches(wants, source.leaves, _budget(threads)):
            reads = plan_reads(batch, merge=source.merge_boxes)
            blocks: dict[tuple[int, Box], np.ndarray] = {}
            for (leaf, outer, inner), block in zip(
                reads, pool.map(lambda r: source.read_box(r[0], r[1]), reads), strict=True
            ):
                for box in inner:
                    blocks[(leaf, box)] = block if box == outer else _cut(block, outer, box)
            place(batch, source.leaves, blocks, values)
    if target is None:
        return _tree.unflatten_plain(
            [(spec.path, v) for spec, v in zip(source.leaves, values, strict=True)]
        )
    return jax.tree_util.tree_unflatten(treedef, values)


def plan_reads(wants: list[Want], merge: bool = True) -> list[tuple[int, Box, list[Box]]]:
    """What to read for ``wants``: (leaf, box to read, the boxes cut from it). Pure.

    With ``merge``, the distinct boxes a process needs of one leaf (one per
    device, or fewer) are read as their bounding box, once, when they fill
    at least half of it: the shards of a process's devices usually tile one block,
    which is then read in one pass rather than one pass per device (a
    source reads whole pages or chunks, so small boxes read apart would
    each read much the same bytes). Otherwise each box is read alone.
    """
    boxes: dict[int, list[Box]] = {}
    for w in wants:
        if w.mode != Mode.VALUE:
            boxes.setdefault(w.leaf, [])
            boxes[w.leaf].extend(b for b in w.boxes if b not in boxes[w.leaf])
    out: list[tuple[int, Box, list[Box]]] = []
    for leaf, need in boxes.items():
        outer = _bounding(need)
        if (
            merge
            and len(need) > 1
            and 2 * sum(_reshard.box_size(b) for b in need) >= _reshard.box_size(outer)
        ):
            out.append((leaf, outer, need))
        else:
            out.extend((leaf, b, [b]) for b in need)
    return out


def _bounding(boxes: list[Box]) -> Box:
    return tuple(
        (min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(len(boxes[0]))
    )


def _cut(block: np.ndarray, outer: Box, box: Box) -> np.ndarray:
    """``box`` of a block read for ``outer``, as its own aligned array (devices take it as is)."""
    out = aligned_empty(_reshard.box_shape(box), block.dtype)
    out[...] = block[tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, outer, strict=True))]
    return out


def _budget(threads: int) -> int:
    configured = _knobs.get("read_batch_bytes")
    if configured is not None:
        return int(configured)
    return _plan.restore_batch_bytes(
        _knobs.get("memory_bytes"), threads=threads, range_bytes=64 << 20
    )


def _check_nests(source: _sources.Source) -> None:
    """Refuses a target-less restore where one leaf's path is a prefix of another's.

    ``a.b`` and ``a.b.c`` in a safetensors file cannot both be in one nested
    tree: ``["a"]["b"]`` would be an array and a dict at once.
    """
    keys = {_tree.match_key(s.path): s for s in source.leaves}
    clashes = []
    for key, spec in keys.items():
        for n in range(1, len(key)):
            parent = keys.get(key[:n])
            if parent is not None:
                clashes.append(f"{parent.display} is a leaf and also holds {spec.display}")
    if clashes:
        raise TreeMismatchError(
            f"{source.display}: these names cannot form one nested tree ({len(clashes)}):\n  "
            + "\n  ".join(clashes[:20])
            + "\nA target-less restore cannot nest them; restore with a target (with "
            "rename= giving the clashing names other paths, or partial=True leaving them out)",
            clashes,
        )
