"""Editing a saved checkpoint's chunk index, as a buggy or hostile writer could (tests only)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import crc32c

from distckpt import _commit, _index, _manifest
from distckpt._plan import ChunkRecord
from distckpt._storage import open_storage

Records = list[ChunkRecord]


def records(root: Path, process: int = 0) -> Records:
    """The chunk records process ``process`` wrote, as the checkpoint holds them."""
    m = _commit.load(open_storage(str(root)))
    ref = next(r for r in m.indexes or [] if r.process == process)
    raw = (root / m.attempt / ref.name).read_bytes()
    shapes = [s.shape if s.stored else None for s in m.leaves]
    sizes = {name: info["bytes"] for name, info in m.files.items()}
    return _index.decode_index(raw, ref, shapes, sizes).all_records()


def index_path(root: Path, process: int = 0) -> Path:
    doc = json.loads((root / "manifest.json").read_bytes())
    ref = next(r for r in doc["indexes"] if r["process"] == process)
    return root / doc["attempt"] / ref["name"]


def write_raw_index(root: Path, raw: bytes, process: int = 0, records: int | None = None) -> None:
    """Replaces the index of ``process`` by ``raw`` and re-seals the commit record to match
    (size, checksum and, if given, record count): only the checks behind the checksum
    stand between ``raw`` and a reader."""
    index_path(root, process).write_bytes(raw)
    path = root / "manifest.json"
    doc = json.loads(path.read_bytes())
    ref = next(r for r in doc["indexes"] if r["process"] == process)
    ref.update(bytes=len(raw), crc32c=crc32c.crc32c(raw))
    if records is not None:
        ref["chunks"] = records
    doc.pop("manifest_crc32c")
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))


def rewrite_index(root: Path, change: Callable[[Records], Records], process: int = 0) -> None:
    """Re-encodes process ``process``'s index with ``change(records)``, re-sealed."""
    new = change(records(root, process))
    write_raw_index(root, _index.encode_index(process, new), process, len(new))
