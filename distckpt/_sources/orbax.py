"""Orbax checkpoints as a source: detected, and read leaf by leaf through TensorStore.

Reads the layout that orbax-checkpoint's ``StandardCheckpointer`` and
``PyTreeCheckpointer`` write (``_METADATA`` with ``tree_metadata``, one
zarr array per leaf, in an OCDBT kvstore or one directory per leaf). Reading
needs only TensorStore; writing (``distckpt convert --to orbax``) needs
orbax-checkpoint (``pip install 'distckpt[orbax]'``), imported only then.

``distckpt.restore`` reads one in a job of any size, each process only the
boxes its devices hold (``_source_restore``). Leaves are read with
TensorStore's zarr drivers, so an Orbax layout that is not zarr (older
msgpack-only checkpoints) is refused with a message saying so. Data that
TensorStore cannot read (a truncated or missing file) is a
``CorruptCheckpointError`` naming the leaf.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from distckpt import _reshard, _tree
from distckpt._layout import MANIFEST_NAME
from distckpt._plan import LeafSpec
from distckpt._sources.base import Rows, Source, rows_box
from distckpt.errors import CorruptCheckpointError, NotCommittedError, UnsupportedCheckpointError

METADATA_NAME = "_METADATA"
# TensorStore status codes that mean stored bytes are missing or damaged
# (rather than a layout it cannot read).
_DAMAGED = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND")
_SEQUENCE_KEY, _DICT_KEY = 1, 2  # orbax's KeyType values in tree_metadata


def find_root(path: str) -> str | None:
    """The Orbax PyTree directory at ``path``, or None if it is not one.

    ``path`` itself (``_METADATA`` and no distckpt ``manifest.json``), or an
    Orbax CheckpointManager step directory holding exactly one item
    directory (such as ``default/``) that is one.
    """
    if "://" in path:
        return None
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return None
    if os.path.isfile(os.path.join(path, METADATA_NAME)):
        return os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
        items = [
            e
            for e in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, e, METADATA_NAME))
        ]
        if len(items) == 1:
            return os.path.abspath(os.path.join(path, items[0]))
    return None


_STEP_NAME = re.compile(r"(?:.*_)?(\d+)")  # "<n>", or "<prefix>_<n>" (step_prefix)
_TMP_MARK = ".orbax-checkpoint-tmp"  # an Orbax save in progress (or interrupted)


@dataclass
class ManagerStep:
    """One step directory of an Orbax CheckpointManager (``distckpt ls``)."""

    step: int
    path: str
    committed: bool  # False: Orbax's temporary directory of an unfinished save
    items: list[str]
    created_ns: int | None = None  # _CHECKPOINT_METADATA's commit_timestamp_nsecs
    metrics: dict | None = None
    process_count: int | None = None  # processes that wrote it (OCDBT sub-databases)


def manager_steps(path: str) -> list[ManagerStep] | None:
    """The steps of the Orbax CheckpointManager directory ``path``, sorted; None if it
    is not one (no subdirectory is an Orbax step: ``_CHECKPOINT_METADATA``, or a
    temporary directory of a save in progress)."""
    if "://" in path or not os.path.isdir(path) or find_root(path) is not None:
        return None
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return None
    steps = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        name, _, tmp = entry.partition(_TMP_MARK)
        m = _STEP_NAME.fullmatch(name)
        if m is None or not os.path.isdir(full):
            continue
        meta_path = os.path.join(full, "_CHECKPOINT_METADATA")
        if not tmp and not os.path.isfile(meta_path):
            continue
        meta = _read_json(meta_path)
        meta = meta if isinstance(meta, dict) else {}
        items = sorted(e for e in os.listdir(full) if os.path.isdir(os.path.join(full, e)))
        metrics = meta.get("metrics") or _read_json(os.path.join(full, "metrics", "metrics"))
        writers = [
            e
            for item in items
            for e in os.listdir(os.path.join(full, item))
            if e.startswith("ocdbt.process_")
        ]
        steps.append(
            ManagerStep(
                int(m.group(1)),
                full,
                committed=not tmp,
                items=items,
                created_ns=meta.get("commit_timestamp_nsecs"),
                metrics=metrics if isinstance(metrics, dict) and metrics else None,
                process_count=len(set(writers)) or None,
            )
        )
    if not any(s.committed for s in steps):
        return None
    return sorted(steps, key=lambda s: (s.step, s.committed))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def import_orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "writing Orbax checkpoints needs orbax-checkpoint, which is not installed: "
            "pip install 'distckpt[orbax]'"
        ) from e
    return ocp


def _path_of(key_metadata: list[dict]) -> _tree.Path:
    parts: list[tuple[str, Any]] = []
    for k in key_metadata:
        key = k["key"]
        if k.get("key_type") == _SEQUENCE_KEY:
            parts.append(("idx", int(key)))
        else:
            parts.append(("key", str(key)))
    return tuple(parts)


def _sharding_of(raw: str | None) -> dict | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    kind = doc.get("sharding_type")
    if kind == "NamedSharding":
        mesh = dict(zip(doc.get("axis_names", []), doc.get("shape", []), strict=False))
        spec = [list(p) if isinstance(p, list) else p for p in doc.get("partition_spec", [])]
        return {"type": "NamedSharding", "mesh": mesh, "spec": spec}
    return {"type": kind or "unknown"}


class OrbaxSource(Source):
    """An Orbax PyTree checkpoint, read one leaf (or slab of rows) at a time."""

    format = "orbax"
    # TensorStore reads whole chunks, which a multi-process save cuts along its
    # shards: reading each box on its own decodes just its chunks (as Orbax
    # does), without the copies out of a merged block.
    merge_boxes = False

    def __init__(self, root: str):
        self.root = self.display = root
        meta_path = os.path.join(root, METADATA_NAME)
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
            self.identity = hashlib.sha256(raw).hexdigest()
            doc = json.loads(raw)
            tree = doc["tree_metadata"]
        except (OSError, ValueError, KeyError) as e:
            raise NotCommittedError(
                f"{meta_path} is not a readable Orbax PyTree metadata file ({type(e).__name__}: "
                f"{e}); distckpt reads Orbax checkpoints written by StandardCheckpointer or "
                "PyTreeCheckpointer with orbax-checkpoint 0.5 or newer"
            ) from e
        self.use_ocdbt = bool(doc.get("use_ocdbt", True))
        self.use_zarr3 = bool(doc.get("use_zarr3", False))
        self.user_metadata = doc.get("custom_metadata")
        shardings = self._json_file("_sharding") or {}
        ext = {}  # param name -> ext_metadata (the PRNG implementation of key leaves)
        am_dir = os.path.join(root, "array_metadatas")
        for name in sorted(os.listdir(am_dir)) if os.path.isdir(am_dir) else []:
            doc_am = self._json_file(os.path.join("array_metadatas", name)) or {}
            for entry in doc_am.get("array_metadatas", []):
                am = entry.get("array_metadata", {})
                ext[am.get("param_name")] = am.get("ext_metadata") or {}
        self.names: list[str | None] = []
        self._stores: dict[int, Any] = {}
        leaves = []
        for entry in tree.values():
            path = _path_of(entry["key_metadata"])
            vm = entry.get("value_metadata", {})
            vtype = vm.get("value_type")
            name = ".".join(str(k) for _, k in path)  # orbax's param name
            disp = _tree.display(path)
            if vtype == "None":
                leaves.append(LeafSpec(path, disp, _tree.NONE))
                self.names.append(None)
                continue
            if vm.get("skip_deserialize"):
                continue  # an empty container: no leaf
            self.names.append(name)
            store = self._open(len(leaves), name)
            dtype = str(np.dtype(store.dtype.numpy_dtype))
            shape = tuple(int(n) for n in store.shape)
            if vtype == "scalar":
                value = store.read().result()[()]
                value = bool(value) if dtype == "bool" else value.item()
                leaves.append(LeafSpec(path, disp, _tree.PYTHON, value=value))
                self._stores.pop(len(leaves) - 1, None)
                continue
            sharding = _sharding_of(shardings.get(base64.b64encode(name.encode()).decode())) or {
                "type": "host"
            }
            impl = ext.get(name, {}).get("random_key_impl")
            kind = (
                _tree.PRNG_KEY if impl else (_tree.NUMPY if vtype == "np.ndarray" else _tree.ARRAY)
            )
            leaves.append(LeafSpec(path, disp, kind, shape, dtype, sharding, impl=impl))
        self.leaves = leaves
        # StandardCheckpointer keeps its custom_metadata here (in the step
        # directory, the parent, for a CheckpointManager's item).
        ckpt_meta = self._json_file("_CHECKPOINT_METADATA") or self._json_file(
            os.path.join(os.pardir, "_CHECKPOINT_METADATA")
        )
        ckpt_meta = ckpt_meta if isinstance(ckpt_meta, dict) else {}
        if self.user_metadata is None and ckpt_meta.get("custom_metadata"):
            self.user_metadata = ckpt_meta["custom_metadata"]
        self.info = {
            "layout": ("ocdbt" if self.use_ocdbt else "per-leaf directories")
            + (", zarr3" if self.use_zarr3 else ", zarr"),
            "item_handlers": ckpt_meta.get("item_handlers"),
            "commit_timestamp_nsecs": ckpt_meta.get("commit_timestamp_nsecs"),
            "total_bytes": sum(s.nbytes for s in leaves),
        }

    def _json_file(self, rel: str) -> Any:
        return _read_json(os.path.join(self.root, rel))

    def _open(self, index: int, name: str) -> Any:
        import tensorstore as ts

        if index in self._stores:
            return self._stores[index]
        if self.use_ocdbt:
            kv = {"driver": "ocdbt", "base": f"file://{self.root}/", "path": name}
        else:
            kv = {"driver": "file", "path": os.path.join(self.root, name)}
        spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}
        try:
            store = ts.open(spec, open=True, read=True).result()
        except ValueError as e:
            if str(e).startswith(_DAMAGED):
                raise self._damaged(name, "open its array", e) from e
            raise UnsupportedCheckpointError(
                f"{self.root}: cannot open the Orbax array of leaf {name!r} ({e}). The checkpoint "
                "was written in a layout distckpt does not read; read it with orbax-checkpoint "
                "instead."
            ) from e
        self._stores = {index: store}  # keep one open array: memory stays per-leaf
        return store

    def read(self, index: int, rows: Rows = None) -> np.ndarray:
        spec = self.leaves[index]
        if not spec.stored:
            raise ValueError(f"{spec.display} is a {spec.kind} leaf; it has no stored data")
        return self.read_box(index, rows_box(spec.array_shape, rows))

    def read_box(self, index: int, box: _reshard.Box) -> np.ndarray:
        name = self.names[index]
        assert name is not None, "a None leaf has no array to read"
        store = self._open(index, name)
        try:
            if not box:
                return np.asarray(store.read().result())
            sl = tuple(slice(a, b) for a, b in box)
            return np.asarray(store[sl].read().result())
        except ValueError as e:
            raise self._damaged(name, f"read box {list(box)} of its array", e) from e

    def _damaged(self, name: str, what: str, e: Exception) -> CorruptCheckpointError:
        problem = f"{self.root}: leaf {name!r}: TensorStore could not {what} ({e})"
        return CorruptCheckpointError(
            f"{problem}. The checkpoint is damaged or incomplete (a data file truncated or "
            "missing); restore an earlier step or a copy. Nothing was restored from it.",
            [problem],
        )
