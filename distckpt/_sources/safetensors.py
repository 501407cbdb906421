"""safetensors files as a source: one file, or a directory of shards with an index.

A safetensors file is an 8-byte little-endian header length, a JSON header
(per tensor ``dtype``, ``shape`` and ``data_offsets`` into the data section,
plus an optional ``__metadata__`` of strings), then the tensors' bytes. The
header is parsed here, not by the ``safetensors`` library: reading a box of
a tensor needs its byte offsets, which that library does not expose, and
every offset is checked against the file's size and the tensor's shape and
dtype before a byte is read, so a damaged or lying header is a
``CorruptCheckpointError``, never wrong values.

A box of a tensor is read with ``pread`` as the runs of bytes it covers
(runs closer than a page are read as one), so each process reads only the
bytes of the shards its devices hold (docs/formats.md).

Names map to tree paths by splitting at ``.``:
``model.layers.0.q_proj.weight`` is ``["model"]["layers"]["0"]["q_proj"]["weight"]``
(every part a dict key). A file or index that carries distckpt's export
record (written by ``distckpt convert --to safetensors``) gives the exact
saved paths, kinds and Python values instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from distckpt import _reshard, _tree
from distckpt._plan import LeafSpec
from distckpt._sources.base import Source
from distckpt._storage import aligned_empty
from distckpt.errors import CorruptCheckpointError, NotCommittedError, UnsupportedCheckpointError

SUFFIX = ".safetensors"
INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
RECORD_KEY = "distckpt"  # the export record: in __metadata__ (one file) or the index's metadata
MAX_HEADER_BYTES = 100 << 20  # what the safetensors format allows
_PAGE = 4096  # runs of a box closer than this are read as one range

# safetensors dtype names <-> numpy dtypes (little-endian on disk).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {str(dt): name for name, dt in DTYPES.items()}  # numpy dtype name -> safetensors name


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file, its offsets checked against the file."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int


def detect(path: str) -> str | None:
    """The safetensors file, or index file, at ``path``; None if it is neither.

    ``path`` is a ``.safetensors`` file, a directory with one
    ``*.safetensors.index.json``, or a directory holding exactly one
    ``.safetensors`` file (``model.safetensors``).
    """
    if "://" in path:
        return None
    if os.path.isfile(path):
        return os.path.abspath(path) if path.endswith((SUFFIX, INDEX_SUFFIX)) else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if INDEX_NAME in indexes:
        indexes = [INDEX_NAME]
    if len(indexes) == 1:
        return os.path.join(os.path.abspath(path), indexes[0])
    files = [n for n in names if n.endswith(SUFFIX)]
    if not indexes and len(files) == 1:
        return os.path.join(os.path.abspath(path), files[0])
    return None


def _corrupt(file: str, problem: str, action: str | None = None) -> CorruptCheckpointError:
    action = action or (
        "The file is damaged or was not written completely; fetch it again (or re-export it). "
        "Nothing was restored from it."
    )
    return CorruptCheckpointError(f"{file}: {problem}. {action}", [f"{file}: {problem}"])


def read_header(file: str) -> tuple[dict, bytes, int]:
    """The JSON header of a safetensors file, its raw bytes, and the file's size.

    Raises:
      CorruptCheckpointError: the file is too short for its header, or the
        header is not a JSON object.
      NotCommittedError: the file does not exist.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(file, f"{size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _corrupt(
                    file,
                    f"the header says it is {n} bytes long, but the file holds {size - 8} "
                    "bytes after the length field",
                )
            raw = f.read(n)
    except FileNotFoundError as e:
        raise NotCommittedError(
            f"{file}: no such safetensors file; check the path (an index names it)"
        ) from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise _corrupt(file, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(file, f"the header is a JSON {type(header).__name__}, not an object")
    return header, raw, size


def tensors_of(file: str, header: dict, header_len: int, size: int) -> dict[str, Tensor]:
    """Every tensor of a parsed header, each checked against the file; by name.

    Pure. Checks, per tensor: a known dtype, a shape of non-negative
    integers, offsets that fit the file and hold exactly shape x itemsize
    bytes; and that no two tensors share bytes.

    Raises:
      CorruptCheckpointError: names the file, the tensor, what the header
        says and what the file holds.
      UnsupportedCheckpointError: a dtype distckpt does not read.
    """
    data_start = 8 + header_len
    out: dict[str, Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _corrupt(file, f"tensor {name!r}: its header entry is not a JSON object")
        kind = entry.get("dtype")
        if kind not in DTYPES:
            if isinstance(kind, str):
                raise UnsupportedCheckpointError(
                    f"{file}: tensor {name!r} has dtype {kind}, which distckpt does not read "
                    f"(it reads {', '.join(DTYPES)}). Convert that tensor to one of those (or "
                    "remove it) with the safetensors library first."
                )
            raise _corrupt(file, f"tensor {name!r}: dtype {kind!r} is not a dtype name")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_nat(d) for d in shape)):
            raise _corrupt(file, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_nat, offsets))):
            raise _corrupt(file, f"tensor {name!r}: data_offsets {offsets!r} are not two offsets")
        dtype = DTYPES[kind]
        begin, end = offsets
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != want:
            raise _corrupt(
                file,
                f"tensor {name!r}: the header gives it bytes [{begin}, {end}) of the data "
                f"section ({end - begin} bytes), but {kind}{shape} takes {want} bytes",
            )
        if data_start + end > size:
            raise _corrupt(
                file,
                f"tensor {name!r} ends at byte {data_start + end} of the file, but the file "
                f"has {size} bytes (truncated?)",
            )
        out[name] = Tensor(name, file, dtype, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((t.begin, t.end, t.name) for t in out.values() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise _corrupt(
                file,
                f"tensors {a!r} and {b!r} overlap (the header gives {b!r} bytes from "
                f"{begin_b}, before {a!r} ends at {end_a})",
            )
    return out


def _nat(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def box_runs(shape: tuple[int, ...], itemsize: int, box: _reshard.Box) -> tuple[np.ndarray, int]:
    """The byte runs a box of a C-ordered array covers: (start offsets, run length).

    A run spans the box along the last dimension it does not cover wholly,
    and every dimension after it. Pure.
    """
    ndim = len(shape)
    k = ndim - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    strides = [itemsize] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if ndim == 0:
        return np.zeros(1, np.int64), itemsize
    run = (box[k][1] - box[k][0]) * strides[k]
    starts = np.array([box[k][0] * strides[k]], np.int64)
    for d in range(k - 1, -1, -1):
        idx = np.arange(box[d][0], box[d][1], dtype=np.int64) * strides[d]
        starts = (idx[:, None] + starts[None, :]).reshape(-1)
    return starts, run


def coalesce(starts: np.ndarray, run: int, gap: int = _PAGE) -> Iterator[tuple[int, int, int]]:
    """Groups consecutive runs into ranges: (first run, end run, byte span). Pure."""
    gaps = starts[1:] - (starts[:-1] + run)
    cuts = [0, *(np.nonzero(gaps > gap)[0] + 1).tolist(), len(starts)]
    for first, stop in zip(cuts, cuts[1:], strict=False):
        yield first, stop, int(starts[stop - 1] + run - starts[first])


class SafetensorsSource(Source):
    """A safetensors file or a sharded directory, read box by box with ``pread``."""

    format = "safetensors"

    def __init__(self, entry: str):
        """``entry``: a ``.safetensors`` file or an index file (``detect`` finds it)."""
        self.display = entry
        self.entry = entry
        index: dict | None = None
        if entry.endswith(INDEX_SUFFIX):
            index = self._read_index(entry)
            base = os.path.dirname(entry)
            weight_map = index["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            self.display = base
        else:
            files, weight_map, base = [os.path.basename(entry)], None, os.path.dirname(entry)
        digest = hashlib.sha256()
        self._sizes: dict[str, int] = {}  # file -> its size when its header was read
        tensors: dict[str, Tensor] = {}
        metadata: dict = {}
        for rel in files:
            file = os.path.join(base, rel)
            header, raw, size = read_header(file)
            self._sizes[file] = size
            found = tensors_of(file, header, len(raw), size)
            meta = header.get("__metadata__")
            if isinstance(meta, dict) and weight_map is None:
                metadata = meta
            digest.update(f"{rel}\0{size}\0".encode() + raw)
            if weight_map is None:
                tensors.update(found)
                continue
            for name, t in found.items():
                if weight_map.get(name) == rel:
                    tensors[name] = t
        if weight_map is not None:
            missing = [n for n, f in weight_map.items() if n not in tensors]
            if missing:
                shown = ", ".join(f"{n!r} (in {weight_map[n]})" for n in missing[:5])
                raise _corrupt(
                    entry,
                    f"the index names {len(missing)} tensor(s) its shard files do not hold: "
                    f"{shown}",
                    "A shard is missing or from another version of the model; fetch the "
                    "directory again.",
                )
            tensors = {n: tensors[n] for n in weight_map}
        self.identity = digest.hexdigest()
        self.tensors = list(tensors.values())
        self._by_name = tensors
        self.files = files
        record = None
        raw_record = (index or {}).get("metadata", {}).get(RECORD_KEY) if index else None
        raw_record = raw_record if raw_record is not None else metadata.get(RECORD_KEY)
        if raw_record is not None:
            try:
                record = json.loads(raw_record) if isinstance(raw_record, str) else raw_record
            except ValueError as e:
                raise _corrupt(
                    self.display, f"the distckpt export record is not JSON ({e})"
                ) from None
            if not isinstance(record, dict):
                raise _corrupt(self.display, "the distckpt export record is not a JSON object")
        self.leaves, self._tensor_of = (
            self._from_record(record, tensors) if record else self._from_names(tensors)
        )
        self.user_metadata = record.get("user_metadata") if record else metadata or None
        self.info = {
            "files": len(files),
            "tensors": len(self.tensors),
            "total_bytes": sum(t.end - t.begin for t in self.tensors),
            "names": "distckpt export record" if record else "split at '.'",
        }
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _read_index(entry: str) -> dict:
        try:
            with open(entry) as f:
                index = json.load(f)
        except ValueError as e:
            raise _corrupt(entry, f"the index is not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and os.sep not in v and v not in (".", "..")
            for v in weight_map.values()
        ):
            raise _corrupt(entry, "the index has no weight_map of tensor names to shard file names")
        if not isinstance(index.get("metadata", {}), dict):
            index["metadata"] = {}
        return index

    def _from_names(self, tensors: dict[str, Tensor]) -> tuple[list[LeafSpec], list[str | None]]:
        leaves = []
        for name, t in tensors.items():
            path = tuple(("key", part) for part in name.split("."))
            leaves.append(
                LeafSpec(path, _tree.display(path), _tree.ARRAY, t.shape, str(t.dtype), None)
            )
        return leaves, list(tensors)

    def _from_record(
        self, record: dict, tensors: dict[str, Tensor]
    ) -> tuple[list[LeafSpec], list[str | None]]:
        leaves: list[LeafSpec] = []
        names: list[str | None] = []
        try:
            for entry in record["leaves"]:
                path = tuple(
                    (kind, int(key) if kind == "idx" else key) for kind, key in entry["path"]
                )
                disp, kind, name = _tree.display(path), entry["kind"], entry["name"]
                if kind in (_tree.PYTHON, _tree.NONE):
                    leaves.append(LeafSpec(path, disp, kind, value=entry.get("value")))
                    names.append(None)
                    continue
                t = tensors.get(name)
                shape, dtype = tuple(entry["shape"]), entry["dtype"]
                if t is None or t.shape != shape or str(t.dtype) != dtype:
                    found = f"{t.dtype}{list(t.shape)}" if t else "no such tensor"
                    raise _corrupt(
                        self.display,
                        f"the distckpt export record says {name!r} is {dtype}{list(shape)}, "
                        f"the files hold {found}",
                    )
                leaves.append(
                    LeafSpec(path, disp, kind, shape, dtype, None, impl=entry.get("impl"))
                )
                names.append(name)
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(
                self.display, f"the distckpt export record is malformed ({type(e).__name__}: {e})"
            ) from None
        return leaves, names

    def tensor(self, index: int) -> Tensor:
        name = self._tensor_of[index]
        if name is None:
            spec = self.leaves[index]
            raise ValueError(f"{spec.display} is a {spec.kind} leaf; it has no stored data")
        return self._by_name[name]

    def tensor_of(self, index: int) -> tuple[str, str] | None:
        name = self._tensor_of[index]
        if name is None:
            return None
        return name, os.path.basename(self._by_name[name].file)

    def _fd(self, file: str) -> int:
        with self._lock:  # boxes are read on several threads: one descriptor per file
            return self._fds.get(file) or self._open_file(file)

    def _open_file(self, file: str) -> int:
        fd = os.open(file, os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size != self._sizes[file]:
            os.close(fd)
            raise _corrupt(
                file,
                f"the file changed while being read: {self._sizes[file]} bytes when its "
                f"header was read, {size} bytes now",
                "Something rewrote it during the restore; restore again once it is complete.",
            )
        self._fds[file] = fd
        return fd

    def read_box(self, index: int, box: _reshard.Box) -> np.ndarray:
        t = self.tensor(index)
        dtype = t.dtype.newbyteorder("<")
        out = aligned_empty(_reshard.box_shape(box), np.dtype(t.dtype))
        if out.size == 0:
            return out
        flat = out.reshape(-1).view(np.uint8)
        starts, run = box_runs(t.shape, dtype.itemsize, box)
        fd = self._fd(t.file)
        for first, stop, span in coalesce(starts, run):
            at = t.begin + int(starts[first])
            if stop - first == 1 or span == (stop - first) * run:  # contiguous: straight in
                self._pread(fd, t, flat[first * run : stop * run], at)
                continue
            scratch = np.empty(span, np.uint8)
            self._pread(fd, t, scratch, at)
            offs = starts[first:stop] - starts[first]
            into = flat[first * run : stop * run].reshape(stop - first, run)
            steps = np.diff(offs)
            if len(steps) and (steps == steps[0]).all():  # evenly spaced: one strided copy
                into[...] = np.lib.stride_tricks.as_strided(
                    scratch, (stop - first, run), (int(steps[0]), 1), writeable=False
                )
            else:
                for j, o in enumerate(offs.tolist()):
                    into[j] = scratch[o : o + run]
        return out

    def _pread(self, fd: int, t: Tensor, into: np.ndarray, at: int) -> None:
        view = memoryview(into)  # type: ignore[arg-type]
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], at + done)
            if n == 0:
                raise _corrupt(
                    t.file,
                    f"tensor {t.name!r} ends at byte {t.end}, but the file ended at byte "
                    f"{at + done} while reading it (truncated after it was opened?)",
                )
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
