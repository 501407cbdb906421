"""The manifest: what a committed checkpoint holds, as JSON. See docs/format.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import crc32c

from distckpt import _tree
from distckpt._plan import ChunkRecord, LeafSpec
from distckpt.errors import CorruptCheckpointError

FORMAT_NAME = "distckpt"
FORMAT_VERSION = 2  # the newest version this code reads; bump on any change a reader
# of the previous version cannot read. Version 2 added per-leaf compression; a
# checkpoint without it is still written as version 1, readable by 1's readers.
from distckpt._layout import MANIFEST_NAME as MANIFEST_NAME  # noqa: E402 - re-exported


@dataclass
class Manifest:
    attempt: str
    leaves: list[LeafSpec]
    chunks: list[list[ChunkRecord]]  # per leaf, in leaf order
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

    @property
    def written_version(self) -> int:
        """The oldest format version that can hold this manifest."""
        return 2 if any(spec.compression for spec in self.leaves) else 1

    def to_json(self) -> bytes:
        file_names = sorted(self.files)
        file_index = {name: i for i, name in enumerate(file_names)}
        leaves = []
        for spec, chunks in zip(self.leaves, self.chunks, strict=True):
            entry: dict[str, Any] = {"path": [list(p) for p in spec.path], "kind": spec.kind}
            if spec.kind in (_tree.ARRAY, _tree.NUMPY, _tree.PRNG_KEY):
                entry["shape"] = list(spec.array_shape)
                entry["dtype"] = spec.dtype
                entry["sharding"] = spec.sharding
                entry["chunks"] = [
                    [file_index[c.file], c.offset, c.nbytes, c.crc32c, [list(r) for r in c.box]]
                    for c in chunks
                ]
            if spec.kind == _tree.PRNG_KEY:
                entry["impl"] = spec.impl
            if spec.compression is not None:
                entry["compression"] = spec.compression
            if spec.kind == _tree.PYTHON:
                entry["value"] = spec.value
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
            _check_checksum(raw)
            files = {
                f["name"]: {"process": f["process"], "bytes": f["bytes"]} for f in doc["files"]
            }
            names = [f["name"] for f in doc["files"]]
            leaves, chunks = [], []
            for i, e in enumerate(doc["leaves"]):
                path = tuple((kind, key) for kind, key in e["path"])
                leaves.append(
                    LeafSpec(
                        path=path,
                        display=_tree.display(path),
                        kind=e["kind"],
                        shape=tuple(e["shape"]) if "shape" in e else None,
                        dtype=e.get("dtype"),
                        sharding=e.get("sharding"),
                        value=e.get("value"),
                        impl=e.get("impl"),
                        compression=e.get("compression") if version >= 2 else None,
                    )
                )
                chunks.append(
                    [
                        ChunkRecord(i, names[f], off, n, crc, tuple(tuple(r) for r in box))
                        for f, off, n, crc, box in e.get("chunks", [])
                    ]
                )
            return cls(
                attempt=doc["attempt"],
                leaves=leaves,
                chunks=chunks,
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


def _check_checksum(raw: bytes) -> None:
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
