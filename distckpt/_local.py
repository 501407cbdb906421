"""The local tier's store: what one process keeps of one step, in its host-local directory.

A step is a directory ``step_<N>`` holding ``blocks.bin`` (the blocks back
to back) and ``local.json``, the step's description: the saved tree as the
commit record describes it (``_manifest.leaf_entry``), the layout of every
array spread over processes, and a record per block (leaf, whose block it
is, its box, where it lies, its CRC-32C), sealed with its own CRC-32C as a
commit record is. The last ``state_arrays`` leaves are not the tree's: they
are a pipeline state's arrays (``_localstate``). A process writes the step
under a temporary name and renames it into place once both files are
durable, so a step that exists is whole; a block is checked against its
CRC-32C when it is read.

Only this process ever writes or reads its directory: the store does no
coordination. See docs/local_tier.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from distckpt import _knobs, _manifest, _plan
from distckpt._plan import LeafSpec
from distckpt._reshard import Box
from distckpt._storage.interface import aligned_empty
from distckpt.errors import CorruptCheckpointError

FORMAT = "distckpt-local"
# The newest version this code reads; bump on any change a reader of the previous
# version cannot read. Version 2 adds the pipeline state's arrays as the last
# ``state_arrays`` leaves, which a version-1 reader would take for the tree's. A
# step without them is written as version 1, which every reader reads.
VERSION = 2
DATA = "blocks.bin"
DESCRIPTION = "local.json"
_STEP = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class Block:
    """One block a process keeps: ``box`` of leaf ``leaf``, which process ``owner`` holds
    in the job (itself, or the process it keeps a copy for)."""

    leaf: int
    owner: int
    box: Box
    offset: int
    nbytes: int
    crc32c: int


@dataclass(frozen=True)
class Step:
    """A local step as this process wrote it."""

    path: Path
    step: int
    process: int
    process_count: int
    leaves: list[LeafSpec]
    structure: list | None
    layouts: list[dict | None]  # per leaf: the mesh and spec of an array spread over processes
    values: dict[int, int]  # leaf -> block number, for values every process keeps its own of
    blocks: list[Block]
    extra: dict[str, Any]  # the caller's: user metadata, pipeline state, tier bookkeeping
    digest: str  # of the tree and layouts: processes that agree on it saved the same thing
    state_arrays: int = 0  # how many of the last leaves are a pipeline state's arrays

    @property
    def tree_leaves(self) -> list[LeafSpec]:
        """The saved tree's leaves (without the pipeline state's arrays)."""
        return self.leaves[: len(self.leaves) - self.state_arrays]

    def read(self, block: Block) -> np.ndarray:
        """The block's elements, checked against its CRC-32C (CorruptCheckpointError)."""
        try:
            fd = os.open(self.path / DATA, os.O_RDONLY)
        except OSError as e:
            raise self._corrupt(f"{DATA} cannot be read ({e})") from None
        try:
            return self._read(fd, block)
        finally:
            os.close(fd)

    def read_many(self, blocks: Sequence[Block]) -> list[np.ndarray]:
        """``read`` of each block, on ``io_threads`` threads (one open file)."""
        try:
            fd = os.open(self.path / DATA, os.O_RDONLY)
        except OSError as e:
            raise self._corrupt(f"{DATA} cannot be read ({e})") from None
        try:
            with ThreadPoolExecutor(_threads(len(blocks)), "distckpt-local-read") as pool:
                return list(pool.map(lambda b: self._read(fd, b), blocks))
        finally:
            os.close(fd)

    def _read(self, fd: int, block: Block) -> np.ndarray:
        spec = self.leaves[block.leaf]
        # Aligned, so that a CPU device takes the block as its buffer without a copy.
        raw = aligned_empty((block.nbytes,), np.dtype(np.uint8))
        got = 0
        try:
            while got < block.nbytes:
                n = os.preadv(fd, [raw.data[got:]], block.offset + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise self._corrupt(f"{DATA} cannot be read ({e})") from None
        if got != block.nbytes:
            raise self._corrupt(
                f"{DATA} is short: {spec.display} box {[list(r) for r in block.box]} needs "
                f"bytes {block.offset}..{block.offset + block.nbytes}"
            )
        actual = crc32c.crc32c(raw.data)
        if actual != block.crc32c:
            raise self._corrupt(
                f"{spec.display} box {[list(r) for r in block.box]} fails its crc32c (stored "
                f"{block.crc32c:#010x}, read {actual:#010x})"
            )
        shape = tuple(hi - lo for lo, hi in block.box)
        return raw.view(_plan.np_dtype(spec.array_dtype)).reshape(shape)

    def _corrupt(self, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"local step at {self.path} is damaged: {problem}. This process's copy is not "
            "used; its peers' copies or the persistent tier are.",
            [f"{self.path}: {problem}"],
        )


def write(
    directory: str | os.PathLike,
    step: int,
    *,
    process: int,
    process_count: int,
    leaves: list[LeafSpec],
    structure: list | None,
    layouts: list[dict | None],
    blocks: Iterable[tuple[int, int, Box, np.ndarray]],
    values: dict[int, np.ndarray],
    extra: dict[str, Any],
    state_arrays: int = 0,
) -> Path:
    """Writes step ``step``: ``blocks`` as ``(leaf, owner, box, data)`` and ``values``
    (leaf -> this process's whole value of a leaf every process keeps its own of);
    the last ``state_arrays`` of ``leaves`` are a pipeline state's arrays.
    Replaces an older copy of the same step. Returns the step's directory."""
    blocks_list = list(blocks)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        items = [*blocks_list, *((leaf, process, _full(a), a) for leaf, a in values.items())]
        raws = [np.ascontiguousarray(data).reshape(-1).view(np.uint8) for *_, data in items]
        offsets = np.concatenate([[0], np.cumsum([r.nbytes for r in raws], dtype=np.int64)])
        value_blocks = {leaf: n for n, (leaf, *_) in enumerate(items) if n >= len(blocks_list)}
        fd = os.open(tmp / DATA, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if len(raws):
                os.truncate(tmp / DATA, int(offsets[-1]))

            def one(n: int) -> int:  # writes block n where it lies; its CRC-32C
                _pwrite_all(fd, raws[n].data, int(offsets[n]))
                return crc32c.crc32c(raws[n].data)

            with ThreadPoolExecutor(_threads(len(raws)), "distckpt-local-write") as pool:
                crcs = list(pool.map(one, range(len(raws))))
            os.fsync(fd)
        finally:
            os.close(fd)
        records = [
            [leaf, owner, [v for r in box for v in r], int(offsets[n]), raws[n].nbytes, crcs[n]]
            for n, (leaf, owner, box, _) in enumerate(items)
        ]
        tree: dict[str, Any] = {
            "leaves": [_manifest.leaf_entry(s) for s in leaves],
            "structure": structure,
            "layouts": layouts,
        }
        if state_arrays:
            tree["state_arrays"] = state_arrays
        doc = {
            "format": FORMAT,
            "version": VERSION if state_arrays else 1,
            "step": step,
            "process": process,
            "process_count": process_count,
            **tree,
            "digest": _digest(tree),
            "values": {str(k): v for k, v in value_blocks.items()},
            "blocks": records,
            "extra": extra,
        }
        with open(tmp / DESCRIPTION, "wb") as f:
            f.write(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def steps(directory: str | os.PathLike) -> list[int]:
    """The steps written in ``directory``, oldest first (none if it does not exist)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _STEP.fullmatch(n)))


def load(directory: str | os.PathLike, step: int) -> Step:
    """Step ``step``'s description, checked (CorruptCheckpointError; FileNotFoundError
    if the step is not there)."""
    path = Path(directory) / f"step_{step}"
    return parse((path / DESCRIPTION).read_bytes(), step, path)


def parse(raw: bytes, step: int, path: Path) -> Step:
    """A step's description from the bytes of its ``local.json`` (as ``load``)."""
    try:
        _manifest.check_checksum(raw)
        doc = json.loads(raw)
        version = doc.get("version")
        if doc.get("format") != FORMAT or version not in range(1, VERSION + 1):
            raise ValueError(
                f"is {doc.get('format')!r} version {version!r} (this distckpt reads "
                f"{FORMAT!r} versions 1 to {VERSION})"
            )
        if doc["step"] != step:
            raise ValueError(f"describes step {doc['step']}")
        leaves = [_manifest.parse_leaf(e) for e in doc["leaves"]]
        blocks = [
            Block(
                leaf,
                owner,
                tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2)),
                offset,
                nbytes,
                crc,
            )
            for leaf, owner, flat, offset, nbytes, crc in doc["blocks"]
        ]
        for b in blocks:
            spec = leaves[b.leaf]
            shape = spec.array_shape
            if len(b.box) != len(shape) or any(
                not 0 <= lo <= hi <= n for (lo, hi), n in zip(b.box, shape, strict=True)
            ):
                raise ValueError(f"a block of {spec.display} lies outside it")
            if b.nbytes != int(np.prod([hi - lo for lo, hi in b.box])) * spec.itemsize:
                raise ValueError(f"a block of {spec.display} has the wrong size")
        tree = {k: doc[k] for k in ("leaves", "structure", "layouts", "state_arrays") if k in doc}
        if doc["digest"] != _digest(tree) or len(doc["layouts"]) != len(leaves):
            raise ValueError("its tree does not match its digest")
        state_arrays = doc.get("state_arrays", 0)
        if (
            isinstance(state_arrays, bool)
            or not isinstance(state_arrays, int)
            or not 0 <= state_arrays <= len(leaves)
            or (state_arrays and version < 2)
        ):
            raise ValueError(
                f"claims {state_arrays!r} pipeline state arrays (version {version}, "
                f"{len(leaves)} leaves)"
            )
        return Step(
            path=path,
            step=step,
            process=doc["process"],
            process_count=doc["process_count"],
            leaves=leaves,
            structure=doc["structure"],
            layouts=doc["layouts"],
            values={int(k): v for k, v in doc["values"].items()},
            blocks=blocks,
            extra=doc["extra"],
            digest=doc["digest"],
            state_arrays=state_arrays,
        )
    except (ValueError, KeyError, TypeError, IndexError, AssertionError) as e:
        raise CorruptCheckpointError(
            f"local step at {path} is damaged: {DESCRIPTION} {e}. This process's copy is not "
            "used; its peers' copies or the persistent tier are.",
            [f"{path}: {e}"],
        ) from None


def remove_older(directory: str | os.PathLike, keep: int) -> list[int]:
    """Removes all but the newest ``keep`` steps (and leftovers of interrupted writes).
    Returns the steps removed."""
    root = Path(directory)
    gone = steps(root)[:-keep] if keep > 0 else steps(root)
    for step in gone:
        shutil.rmtree(root / f"step_{step}", ignore_errors=True)
    if root.exists():
        for name in os.listdir(root):
            if name.startswith(".step_") and ".tmp-" in name:
                shutil.rmtree(root / name, ignore_errors=True)
    return gone


def _threads(tasks: int) -> int:
    return max(1, min(_knobs.get("io_threads"), tasks))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _full(a: np.ndarray) -> Box:
    return tuple((0, n) for n in np.shape(a))


def _digest(tree: dict) -> str:
    return hashlib.sha256(
        json.dumps(tree, separators=(",", ":"), sort_keys=True).encode()
    ).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
