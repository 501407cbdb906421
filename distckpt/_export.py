"""Export a checkpoint to one ``.npz`` or safetensors file, or to the Hugging Face
sharded safetensors layout, a slab of rows at a time.

Flat names. Each leaf's key path becomes one name: the path's keys as
strings, each escaped like a JSON pointer token (``~`` -> ``~0``, ``/`` ->
``~1``), joined with ``/``. ``{"params": {"layer_0": {"w": ...}}}`` gives
``params/layer_0/w``; ``{"opt": [x, y]}`` gives ``opt/0`` and ``opt/1``; a
checkpoint whose whole tree is one leaf gives ``__root__``. The mapping is
reversible (split on ``/``, then undo ``~1`` and ``~0``), and two leaves that
would get the same name are refused before anything is written.

Both files also carry a JSON record, ``__distckpt__`` (an npz member holding
a 0-d string array; in safetensors the ``__metadata__`` entry ``distckpt``),
with each leaf's exact key path, kind, dtype and PRNG implementation, and the
checkpoint's user metadata, so nothing of the tree is lost.

Leaves: arrays and numpy leaves are written as they are; PRNG keys as their
uint32 key data; Python bool/int/float as 0-d arrays; Python str as a 0-d
string array in npz and only in the record in safetensors; ``None`` only in
the record. In npz, dtypes numpy's file format cannot name (``bfloat16``,
``float8_*``, ``int4``, ...) are stored as their bits in an unsigned integer
of the same width; the record gives the real dtype (``arr.view(dtype)``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from distckpt import _plan, _tree
from distckpt._sources import DEFAULT_SLAB_BYTES, Source
from distckpt._sources import safetensors as _safetensors

RECORD_NAME = "__distckpt__"
ROOT_NAME = "__root__"
EXPORT_VERSION = 1

SAFETENSORS_DTYPES = _safetensors.NAMES  # numpy dtype name -> safetensors dtype name


def escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def flat_name(path: _tree.Path) -> str:
    """``params/layer_0/w`` for ``(("key", "params"), ("key", "layer_0"), ("key", "w"))``."""
    return "/".join(escape(key) for _, key in path) or ROOT_NAME


def split_name(name: str) -> list[str]:
    """The key strings of a flat name (the inverse of ``flat_name``, as strings)."""
    return [] if name == ROOT_NAME else [unescape(t) for t in name.split("/")]


def flat_names(source: Source) -> list[str]:
    """One name per leaf; raises ValueError naming both leaves on a collision."""
    seen: dict[str, str] = {}
    names = []
    for spec in source.leaves:
        name = flat_name(spec.path)
        if name in seen or name == RECORD_NAME:
            other = seen.get(name, "the export record")
            raise ValueError(
                f"{source.display}: leaves {other} and {spec.display} both map to the flat name "
                f"{name!r}; rename one of them before exporting"
            )
        seen[name] = spec.display
        names.append(name)
    return names


def _python_array(value: Any) -> np.ndarray:
    if isinstance(value, bool):
        return np.array(value, np.bool_)
    if isinstance(value, int):
        return np.array(value, np.int64)
    if isinstance(value, float):
        return np.array(value, np.float64)
    return np.array(value)  # str


def _record(source: Source, names: list[str], stored_as: dict[str, str]) -> dict:
    leaves = []
    for name, spec in zip(names, source.leaves, strict=True):
        entry: dict[str, Any] = {
            "name": name,
            "path": [list(p) for p in spec.path],
            "kind": spec.kind,
        }
        if spec.stored:
            entry.update(shape=list(spec.array_shape), dtype=spec.dtype)
        if spec.impl:
            entry["impl"] = spec.impl
        if spec.kind == _tree.PYTHON:
            entry["value"] = spec.value
        if name in stored_as:
            entry["stored_as"] = stored_as[name]
        leaves.append(entry)
    return {
        "format": "distckpt-export",
        "version": EXPORT_VERSION,
        "source": source.display,
        "source_format": source.format,
        "user_metadata": source.user_metadata,
        "leaves": leaves,
    }


def _atomic(destination: str, write: Callable[[str], None]) -> None:
    """Writes to a temporary file next to ``destination``, then renames it into place."""
    tmp = f"{destination}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, destination)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_destination(destination: str, overwrite: bool) -> None:
    """Refuses an existing ``destination`` unless ``overwrite`` (FileExistsError)."""
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(
            f"{destination} already exists; pass --overwrite to replace it or choose another path"
        )


def to_npz(
    source: Source,
    destination: str,
    *,
    overwrite: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> dict:
    """Writes every leaf into an uncompressed ``.npz`` (zip64), slab by slab.

    Returns the export record (also stored in the file as ``__distckpt__``).
    """
    check_destination(destination, overwrite)
    names = flat_names(source)
    stored_as: dict[str, str] = {}

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, (name, spec) in enumerate(zip(names, source.leaves, strict=True)):
                if spec.kind == _tree.NONE:
                    continue
                if spec.kind == _tree.PYTHON:
                    _npy_member(zf, name, _python_array(spec.value))
                else:
                    dtype = _plan.np_dtype(spec.dtype)
                    file_dtype = dtype
                    if dtype.kind == "V":  # ml_dtypes: keep the bits in a same-width uint
                        file_dtype = np.dtype(f"u{dtype.itemsize}")
                        stored_as[name] = str(file_dtype)
                    with zf.open(name + ".npy", "w", force_zip64=True) as f:
                        _npy_header(f, file_dtype, spec.array_shape)
                        for _, slab in source.iter_slabs(i, slab_bytes):
                            _write_raw(f, slab.view(file_dtype))
            record = _record(source, names, stored_as)
            _npy_member(zf, RECORD_NAME, np.array(json.dumps(record)))

    _atomic(destination, write)
    return _record(source, names, stored_as)


def _npy_header(f: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # header longer than 64 KiB (a very high-rank shape)
        np.lib.format.write_array_header_2_0(f, header)


def _npy_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)


def _write_raw(f: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    if arr.size:
        # numpy's stubs give ndarray __buffer__ only on Python >= 3.12 (mypy checks 3.11)
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]


def to_safetensors(
    source: Source,
    destination: str,
    *,
    overwrite: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> dict:
    """Writes every leaf into one safetensors file, slab by slab.

    The format: an 8-byte little-endian header length, a JSON header (per
    tensor ``dtype``, ``shape``, ``data_offsets`` into the data section, plus
    ``__metadata__``), then the tensors' little-endian bytes back to back.

    Raises:
      ValueError: a leaf has a dtype safetensors cannot name (listed, all at
        once), or two leaves share a flat name.
    """
    check_destination(destination, overwrite)
    names = flat_names(source)
    _check_dtypes(source)
    header: dict[str, Any] = {}
    plan = []  # (leaf index, little-endian dtype)
    offset = 0
    shape: tuple[int, ...]
    for i, (name, spec) in enumerate(zip(names, source.leaves, strict=True)):
        if spec.kind == _tree.PYTHON and not isinstance(spec.value, str):
            arr = _python_array(spec.value)
            dtype, shape = arr.dtype, ()
        elif spec.stored:
            dtype = _plan.np_dtype(spec.dtype).newbyteorder("<")
            shape = spec.array_shape
        else:
            continue  # None and str: only in the record
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        st_dtype = SAFETENSORS_DTYPES[dtype.newbyteorder("=").name]
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        plan.append((i, dtype))
        offset += nbytes
    record = _record(source, names, {})
    header["__metadata__"] = {"distckpt": json.dumps(record)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for i, dtype in plan:
                spec = source.leaves[i]
                if spec.kind == _tree.PYTHON:
                    _write_raw(f, _python_array(spec.value).astype(dtype))
                else:
                    for _, slab in source.iter_slabs(i, slab_bytes):
                        _write_raw(f, slab.astype(dtype, copy=False))
            f.flush()
            os.fsync(f.fileno())

    _atomic(destination, write)
    return record


HF_DEFAULT_SHARD_BYTES = 5 * 10**9  # what Hugging Face's save_pretrained uses ("5GB")


def dotted_names(source: Source) -> dict[int, str]:
    """The Hugging Face name of each stored leaf: its keys joined with ``.``.

    Raises:
      ValueError: two leaves would get the same name (a key holding ``.``),
        naming both.
    """
    seen: dict[str, str] = {}
    out = {}
    for i, spec in enumerate(source.leaves):
        if not spec.stored:
            continue
        name = ".".join(str(key) for _, key in spec.path) or ROOT_NAME
        if name in seen:
            raise ValueError(
                f"{source.display}: leaves {seen[name]} and {spec.display} both map to the "
                f"safetensors name {name!r} (keys joined with '.'); rename one of them first"
            )
        seen[name] = spec.display
        out[i] = name
    return out


def shard_plan(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own). Pure."""
    shards: list[list[int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if not shards or (size + n > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def to_hf_safetensors(
    source: Source,
    destination: str,
    *,
    max_shard_bytes: int = HF_DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    slab_bytes: int = DEFAULT_SLAB_BYTES,
) -> dict:
    """Writes the stored leaves as a Hugging Face sharded safetensors directory.

    ``destination`` gets ``model-0000k-of-0000N.safetensors`` (tensors in
    leaf order, at most ``max_shard_bytes`` of tensor data per file unless
    one tensor is larger) and ``model.safetensors.index.json`` (``weight_map``
    and ``metadata.total_size``, as Hugging Face writes them, plus
    ``metadata.distckpt``: the export record, with which ``distckpt.restore``
    gives back the exact tree). Names are the key paths joined with ``.``.
    Python values and ``None`` are in the record only. Each tensor is
    streamed a slab at a time: host memory stays about ``slab_bytes``. The
    directory is written next to ``destination`` and renamed into place.

    Returns:
      The index document.

    Raises:
      ValueError: a leaf whose dtype safetensors cannot name, or two leaves
        with one name; nothing is written.
    """
    check_destination(destination, overwrite)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be at least 1, got {max_shard_bytes}")
    _check_dtypes(source)
    names = dotted_names(source)
    order = list(names)
    sizes = [source.leaves[i].nbytes for i in order]
    shards = shard_plan(sizes, max_shard_bytes)
    files = [
        f"model-{k:05d}-of-{len(shards):05d}{_safetensors.SUFFIX}"
        for k in range(1, len(shards) + 1)
    ]
    record = _record(
        source, [names.get(i, flat_name(s.path)) for i, s in enumerate(source.leaves)], {}
    )
    weight_map = {}
    for file, members in zip(files, shards, strict=True):
        for j in members:
            weight_map[names[order[j]]] = file
    index = {
        "metadata": {"total_size": sum(sizes), _safetensors.RECORD_KEY: record},
        "weight_map": weight_map,
    }
    tmp = f"{destination}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for file, members in zip(files, shards, strict=True):
            leaves = [order[j] for j in members]
            _write_safetensors(
                source, os.path.join(tmp, file), [(i, names[i]) for i in leaves], slab_bytes
            )
        with open(os.path.join(tmp, _safetensors.INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _replace_dir(tmp: str, destination: str) -> None:
    """Puts the finished directory ``tmp`` at ``destination`` (an old one goes after)."""
    old = None
    if os.path.lexists(destination):
        old = f"{destination}.old-{os.getpid()}"
        os.replace(destination, old)
    os.replace(tmp, destination)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.unlink(old)


def _write_safetensors(
    source: Source, path: str, tensors: list[tuple[int, str]], slab_bytes: int
) -> None:
    """One plain safetensors file (no ``__metadata__``) of the given leaves, streamed."""
    header: dict[str, Any] = {}
    offset = 0
    for i, name in tensors:
        spec = source.leaves[i]
        nbytes = spec.nbytes
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[str(_plan.np_dtype(spec.array_dtype))],
            "shape": list(spec.array_shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, _ in tensors:
            dtype = _plan.np_dtype(source.leaves[i].array_dtype).newbyteorder("<")
            for _, slab in source.iter_slabs(i, slab_bytes):
                _write_raw(f, slab.astype(dtype, copy=False))
        f.flush()
        os.fsync(f.fileno())


def _check_dtypes(source: Source) -> None:
    unsupported = [
        f"{spec.display} ({spec.dtype})"
        for spec in source.leaves
        if spec.stored
        and _plan.np_dtype(spec.array_dtype).newbyteorder("=").name not in SAFETENSORS_DTYPES
    ]
    if unsupported:
        raise ValueError(
            f"{source.display}: safetensors has no dtype for {len(unsupported)} leaf(s): "
            + ", ".join(unsupported)
            + ". Export with --to npz instead, which stores any dtype."
        )


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n
