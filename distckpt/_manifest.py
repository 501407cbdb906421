"""The manifest: what a committed checkpoint holds, as JSON. See docs/format.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import crc32c

from distckpt import _tree
from distckpt._index import Grid, IndexRef, OwnerTable
from distckpt._plan import ChunkRecord, LeafSpec
from distckpt.errors import CorruptCheckpointError

FORMAT_NAME = "distckpt"
FORMAT_VERSION = 4  # the newest version this code reads; bump on any change a reader
# of the previous version cannot read. Version 2 added per-leaf compression;
# version 3 moved chunk records out of the manifest into per-process indexes
# (_index), leaving a shard grid per leaf; version 4 stores the arrays of the
# pipeline state as leaves after the tree's (``process_state.arrays``), which a
# version-3 reader would hand back as part of the tree. Saves write version 3, or 4
# when the pipeline state has arrays; a copy of an older checkpoint keeps its
# version (1 without compression, else 2).
from distckpt._layout import MANIFEST_NAME as MANIFEST_NAME  # noqa: E402 - re-exported


@dataclass
class Manifest:
    attempt: str
    leaves: list[LeafSpec]
    # Per leaf, in leaf order (versions 1 and 2); None in version 3, whose
    # records are in the indexes (read them through _chunks.ChunkTable).
    chunks: list[list[ChunkRecord]] | None
    files: dict[str, dict[str, int]]  # name -> {"process": p, "bytes": n}
    process_count: int
    device_count: int
    user_metadata: Any = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    save_stats: dict | None = None  # SaveStats.to_json() of the save that wrote it
    manager: dict | None = None  # CheckpointManager's record: step, metrics
    # Data-pipeline states: {"mode": "per-process" | "global", "states": [json, ...]}
    process_state: dict | None = None
    # The saved tree's containers (_tree.walk, docs/format.md); None in a checkpoint
    # written before the record existed. Ignored by older readers: no version bump.
    structure: list | None = None
    # Version 3: each stored leaf's shard grid (None for other leaves), and
    # every writing process's chunk index.
    grids: list[Grid | None] | None = None
    indexes: list[IndexRef] | None = None

    @property
    def written_version(self) -> int:
        """The oldest format version that can hold this manifest."""
        if (self.process_state or {}).get("arrays"):
            return 4
        if self.indexes is not None:
            return 3
        return 2 if any(spec.compression for spec in self.leaves) else 1

    def to_json(self) -> bytes:
        file_names = sorted(self.files)
        file_index = {name: i for i, name in enumerate(file_names)}
        leaves = []
        owner_tables: dict[tuple, int] = {}  # leaves saved alike share one owner table
        owner_json: list[list[int]] = []
        for i, spec in enumerate(self.leaves):
            entry = leaf_entry(spec)
            if spec.stored:
                if self.chunks is not None:
                    entry["chunks"] = [
                        [file_index[c.file], c.offset, c.nbytes, c.crc32c, [list(r) for r in c.box]]
                        for c in self.chunks[i]
                    ]
                else:
                    assert self.grids is not None  # version 3 has a grid per stored leaf
                    grid = self.grids[i]
                    assert grid is not None, f"{spec.display}: a stored leaf has no grid"
                    key = grid.owner_key()
                    if key not in owner_tables:
                        owner_tables[key] = len(owner_json)
                        owner_json.append(grid.owners.reshape(-1).tolist())
                    entry["grid"] = {"edges": grid.edges_json(), "owners": owner_tables[key]}
            leaves.append(entry)
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.written_version,
            "attempt": self.attempt,
            "created": self.created,
            "versions": self.versions,
            "process_count": self.process_count,
            "device_count": self.device_count,
            "user_metadata": self.user_metadata,
            "save_stats": self.save_stats,
            "manager": self.manager,
            "process_state": self.process_state,
            "files": [{"name": n, **self.files[n]} for n in file_names],
            "leaves": leaves,
        }
        if self.structure is not None:
            doc["structure"] = self.structure
        if self.indexes is not None:
            doc["owners"] = owner_json
            doc["indexes"] = [ref.to_json() for ref in self.indexes]
        return seal(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT_NAME:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
            version = doc["format_version"]
            if version > FORMAT_VERSION:
                raise _NewerFormat(version)
            check_checksum(raw)
            files = {
                f["name"]: {"process": f["process"], "bytes": f["bytes"]} for f in doc["files"]
            }
            names = [f["name"] for f in doc["files"]]
            indexed = version >= 3
            tables = [OwnerTable.from_json(t) for t in doc["owners"]] if indexed else []
            alike: dict[tuple, Grid] = {}
            leaves, chunks, grids = [], [], []
            for i, e in enumerate(doc["leaves"]):
                leaves.append(parse_leaf(e, compression=version >= 2))
                if indexed:
                    grids.append(_grid(leaves[-1], e, tables, alike))
                    continue
                chunks.append(
                    [
                        ChunkRecord(i, names[f], off, n, crc, tuple(tuple(r) for r in box))
                        for f, off, n, crc, box in e.get("chunks", [])
                    ]
                )
            return cls(
                attempt=doc["attempt"],
                leaves=leaves,
                chunks=None if indexed else chunks,
                grids=grids if indexed else None,
                indexes=[IndexRef.from_json(r) for r in doc["indexes"]] if indexed else None,
                files=files,
                process_count=doc["process_count"],
                device_count=doc["device_count"],
                user_metadata=doc.get("user_metadata"),
                created=doc.get("created", ""),
                versions=doc.get("versions", {}),
                format_version=version,
                save_stats=doc.get("save_stats"),
                manager=doc.get("manager"),
                process_state=doc.get("process_state"),
                structure=_structure(doc.get("structure")),
            )
        except _NewerFormat as e:
            raise CorruptCheckpointError(
                f"{where} was written in distckpt format version {e.args[0]}, newer than "
                f"this distckpt reads (up to {FORMAT_VERSION}). Upgrade distckpt to read it."
            ) from None
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise CorruptCheckpointError(
                f"{where} is not a readable distckpt manifest ({type(e).__name__}: {e}). "
                "The checkpoint's metadata is damaged; restore an older step or a backup.",
                [f"{where}: {e}"],
            ) from e


def leaf_entry(spec: LeafSpec) -> dict[str, Any]:
    """A leaf's description in a commit record, but where its data lies."""
    entry: dict[str, Any] = {"path": [list(p) for p in spec.path], "kind": spec.kind}
    if spec.stored:
        entry["shape"] = list(spec.array_shape)
        entry["dtype"] = spec.dtype
        entry["sharding"] = spec.sharding
    if spec.kind == _tree.PRNG_KEY:
        entry["impl"] = spec.impl
    if spec.compression is not None:
        entry["compression"] = spec.compression
    if spec.kind == _tree.PYTHON:
        entry["value"] = spec.value
    return entry


def parse_leaf(entry: dict, *, compression: bool = True) -> LeafSpec:
    """The ``LeafSpec`` of a ``leaf_entry`` (raises KeyError, TypeError or ValueError)."""
    path = tuple((kind, key) for kind, key in entry["path"])
    return LeafSpec(
        path=path,
        display=_tree.display(path),
        kind=entry["kind"],
        shape=tuple(entry["shape"]) if "shape" in entry else None,
        dtype=entry.get("dtype"),
        sharding=entry.get("sharding"),
        value=entry.get("value"),
        impl=entry.get("impl"),
        compression=entry.get("compression") if compression else None,
    )


def _grid(
    spec: LeafSpec, entry: dict, tables: list[OwnerTable], alike: dict[tuple, Grid]
) -> Grid | None:
    """A version-3 leaf's shard grid (None for a leaf without stored data, or whose shape
    is not one: ``_commit`` refuses those)."""
    if not spec.stored:
        return None
    record = entry["grid"]
    shape = spec.shape
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        return None  # _commit refuses the shape, with the leaf's name
    owners = record["owners"]
    if not isinstance(owners, int) or not 0 <= owners < len(tables):
        raise ValueError(f"{spec.display}: grid names owner table {owners!r}, there is none")
    # Leaves saved alike share one Grid: parsed once, and checked once per index section.
    edges = record["edges"]
    key = (shape, tuple(tuple(e) if isinstance(e, list) else e for e in edges), owners)
    if key not in alike:
        try:
            alike[key] = Grid.from_json(shape, edges, tables[owners])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{spec.display}: {e}") from None
    return alike[key]


def _structure(record: Any) -> list | None:
    if record is not None and not isinstance(record, list):
        raise ValueError(f"structure is a {type(record).__name__}, expected an array")
    return record


class _NewerFormat(Exception):
    pass


_CHECKSUM = b"manifest_crc32c"


def seal(body: bytes) -> bytes:
    """A serialised manifest with its own checksum appended as its last member.

    The checksum covers every byte before it, so a flipped bit in a Python
    value, a crc or an offset is caught like one in the data.
    """
    return body[:-1] + b',"' + _CHECKSUM + b'":' + str(crc32c.crc32c(body)).encode() + b"}"


def check_checksum(raw: bytes) -> None:
    """Raises ValueError unless ``raw`` (as ``seal`` made it) matches its own checksum."""
    at = raw.rfind(b',"' + _CHECKSUM + b'":')
    if at < 0 or not raw.endswith(b"}"):
        raise ValueError(f"the manifest has no {_CHECKSUM.decode()} (truncated?)")
    stored = raw[at + len(_CHECKSUM) + 4 : -1]
    actual = crc32c.crc32c(raw[:at] + b"}")
    if not stored.isdigit() or int(stored) != actual:
        raise ValueError(
            f"the manifest's checksum does not match its content (stored {stored[:20]!r}, "
            f"computed {actual}): it was damaged after it was written"
        )
