"""Editing a saved checkpoint's chunk index, as a buggy or hostile writer could (tests only)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from pathlib import Path

import crc32c

from distckpt import _chunks, _commit, _index, _manifest
from distckpt._plan import ChunkRecord
from distckpt._storage import open_storage

Records = list[ChunkRecord]


def records(root: Path, process: int = 0) -> Records:
    """The chunk records process ``process`` wrote, as the checkpoint holds them."""
    m = _commit.load(open_storage(str(root)))
    ref = next(r for r in m.indexes or [] if r.process == process)
    raw = (root / m.attempt / ref.name).read_bytes()
    sizes = {name: info["bytes"] for name, info in m.files.items()}
    return _index.decode_index(raw, ref, _chunks.leaf_facts(m), m.grids or [], sizes)


def index_path(root: Path, process: int = 0) -> Path:
    doc = json.loads((root / "manifest.json").read_bytes())
    ref = next(r for r in doc["indexes"] if r["process"] == process)
    return root / doc["attempt"] / ref["name"]


def write_raw_index(
    root: Path, raw: bytes, process: int = 0, records: int | None = None, head: int | None = None
) -> None:
    """Replaces the index of ``process`` by ``raw`` and re-seals the commit record to match
    (size, head size and checksum, and if given, record count): only the checks behind
    the checksum stand between ``raw`` and a reader. ``head`` defaults to the head
    size ``raw``'s own header gives."""
    index_path(root, process).write_bytes(raw)
    path = root / "manifest.json"
    doc = json.loads(path.read_bytes())
    ref = next(r for r in doc["indexes"] if r["process"] == process)
    if head is None:
        try:
            head = _index.make_ref(process, ref["name"], raw).head_bytes
        except (ValueError, KeyError):  # no readable header: all of it is the head
            head = len(raw)
        head = min(head, len(raw))
    ref.update(bytes=len(raw), head_bytes=head, crc32c=crc32c.crc32c(raw[:head]))
    if records is not None:
        ref["chunks"] = records
    doc.pop("manifest_crc32c")
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))


def rewrite_index(root: Path, change: Callable[[Records], Records], process: int = 0) -> None:
    """Re-encodes process ``process``'s index with ``change(records)``, re-sealed."""
    new = change(records(root, process))
    grids = _commit.load(open_storage(str(root))).grids or []
    raw = _index.encode_records(process, new, [_cell(grids, c) for c in new])
    write_raw_index(root, raw, process, len(new))


def _cell(grids: list, c: ChunkRecord) -> int:
    """The cell rank of the grid cell holding ``c``'s start, or 0 where none does: a
    hostile writer files records wherever it likes."""
    grid = grids[c.leaf] if c.leaf < len(grids) else None
    if grid is None or len(c.box) != len(grid.shape) or grid.owners.size == 0:
        return 0
    at = tuple(
        max(0, min(bisect.bisect_right(e, lo) - 1, len(e) - 2))
        for (lo, _), e in zip(c.box, grid.edges, strict=True)
    )
    return int(grid.ranks[at])
