#!/usr/bin/env python3
"""Simulates a 1,024-host save and a 512-host restore of a 70B train state, without data.

    python scripts/scale_sim.py                 # the full simulation (about 2 minutes)
    python scripts/scale_sim.py --small         # 16 processes, a 2-layer model (seconds)
    python scripts/scale_sim.py --json out.json --sample 4 --coord 64,256,1024

A Llama-like 70B train state (bf16 params, fp32 Adam moments, FSDP x tensor
parallel shardings) is planned, committed and restored with distckpt's own
planning, commit and index code. Only storage and coordination are stand-ins:

* shardings: a pure function gives each device's box the way
  ``NamedSharding.devices_indices_map`` does (checked against JAX in
  tests/test_scale_sim.py), for meshes of 8,192 devices no machine here has;
* storage: the restore reads chunk indexes through an in-memory ``Reader``
  that serves the bytes ``_index.encode_index`` produced for them;
* coordination: one thread per simulated process runs the real
  ``_multihost.Collective`` phases against an in-memory key-value store and
  barrier, counting every client call by phase.

It reports the four numbers of issue 15 against their targets (root record
bytes, primary commit CPU time, index heads and sections read per restoring process,
coordination operations per phase) and how each was found. Method, results
and what grows with what: docs/scale_simulation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import crc32c
import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: import this checkout's distckpt
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402 - after the path fix above
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec  # noqa: E402

from distckpt import (  # noqa: E402
    _chunks,
    _commit,
    _index,
    _knobs,
    _layout,
    _multihost,
    _plan,
    _reshard,
    _runtime,
    _save,
    _stage,
    _tree,
)
from distckpt._index import Grid, IndexRef  # noqa: E402
from distckpt._manifest import Manifest  # noqa: E402
from distckpt._plan import ChunkRecord, FileWrite, LeafSpec  # noqa: E402
from distckpt._reshard import Box  # noqa: E402
from distckpt._storage import Reader, Storage  # noqa: E402
from distckpt.errors import CorruptCheckpointError  # noqa: E402

MB = 1 << 20
TARGETS = {
    "root_bytes": 16 * MB,  # the commit record
    "commit_cpu_s": 2.0,  # the primary's commit work, CPU seconds
    "metadata_bytes": 4 * MB,  # commit record and chunk indexes read by one restoring process
    "ops_per_process": 4,  # coordination-service calls per phase, per process
}

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Model:
    """A Llama-like decoder: per layer q/k/v/o, gate/up/down and two norms."""

    layers: int
    d_model: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


LLAMA_70B = Model(
    layers=80, d_model=8192, ffn=28672, heads=64, kv_heads=8, head_dim=128, vocab=128256
)
LLAMA_405B = Model(
    layers=126, d_model=16384, ffn=53248, heads=128, kv_heads=8, head_dim=128, vocab=128256
)
MODELS = {"70b": LLAMA_70B, "405b": LLAMA_405B}
TINY = Model(layers=2, d_model=512, ffn=1792, heads=8, kv_heads=2, head_dim=64, vocab=1024)

# How a weight is split, by its role. Column-parallel matrices (d_in, d_out)
# shard their input dimension over FSDP and their output over TP;
# row-parallel ones the other way round, so that a layer's activations stay
# TP-sharded between the two. The embedding (vocab, d) has its vocabulary
# over TP, the output head (d, vocab) too. Norms and scalars are replicated.
COLUMN, ROW, EMBED, HEAD, REPLICATED = "column", "row", "embed", "head", "replicated"
Spec = tuple[str | None, ...]  # PartitionSpec entries, one per leading dimension
SPECS: dict[str, Spec] = {
    COLUMN: ("fsdp", "tp"),
    ROW: ("tp", "fsdp"),
    EMBED: ("tp", "fsdp"),
    HEAD: ("fsdp", "tp"),
    REPLICATED: (),
}


@dataclass(frozen=True)
class Layout:
    """A job's topology and how it shards each role: the save's, or a restore's."""

    name: str
    processes: int
    devices_per_process: int
    mesh: tuple[tuple[str, int], ...]  # (axis name, size), devices in row-major order
    # The layers' column-parallel weights sharded like row-parallel ones, and back
    # (the vocabulary stays on TP: 128,256 does not divide over 512 FSDP shards).
    transposed: bool = False

    def __post_init__(self) -> None:
        devices = math.prod(k for _, k in self.mesh)
        if devices != self.processes * self.devices_per_process:
            raise ValueError(
                f"layout {self.name}: the mesh {dict(self.mesh)} has {devices} devices, "
                f"{self.processes} processes x {self.devices_per_process} devices have "
                f"{self.processes * self.devices_per_process}"
            )

    def spec(self, role: str) -> Spec:
        if self.transposed and role in (COLUMN, ROW):
            role = ROW if role == COLUMN else COLUMN
        return SPECS[role]

    def spec_of(self, p: Param) -> Spec:
        """A leaf's PartitionSpec entries: its role's, after its unsharded leading axes."""
        return (None,) * p.lead + self.spec(p.role)

    def describe(self) -> str:
        mesh = " x ".join(f"{a}={k}" for a, k in self.mesh)
        return f"{self.processes} x {self.devices_per_process}, mesh {mesh}" + (
            ", transposed specs" if self.transposed else ""
        )


@dataclass(frozen=True)
class Config:
    name: str
    model: Model
    save: Layout
    restores: tuple[Layout, ...]
    coord: tuple[int, ...]  # process counts of the coordination runs
    sample: int  # restoring processes read through the real ChunkTable, per layout (+ the worst)
    max_real_writers: int  # a layout whose sample needs more writers' indexes is predicted only
    check_all: bool  # check_own_writes on every process planned for real (else one per group)
    stacked: bool = False  # layers stacked into one leaf per weight (for scan), not one per layer


def _layouts(processes: int, restoring: int, dpp: int) -> tuple[Layout, tuple[Layout, ...]]:
    save = Layout("save", processes, dpp, (("fsdp", processes), ("tp", dpp)))
    half = restoring
    restores = (
        Layout(f"fsdp{half}-tp{dpp}", half, dpp, (("fsdp", half), ("tp", dpp))),
        Layout(f"fsdp{half // 2}-tp{2 * dpp}", half, dpp, (("fsdp", half // 2), ("tp", 2 * dpp))),
        Layout(f"fsdp{half}-tp{dpp}-T", half, dpp, (("fsdp", half), ("tp", dpp)), transposed=True),
    )
    return save, restores


FULL = Config(
    "full",
    LLAMA_70B,
    *_layouts(1024, 512, 8),
    coord=(64, 128, 256, 512, 1024),
    sample=4,
    max_real_writers=128,
    check_all=False,
)
SMALL = Config(
    "small",
    TINY,
    *_layouts(16, 8, 8),
    coord=(4, 8, 16),
    sample=8,
    max_real_writers=1 << 30,
    check_all=True,
)

# --------------------------------------------------------------------------- the train state


@dataclass(frozen=True)
class Param:
    """A leaf of the simulated state: shape, dtype and role (``_tree.walk`` sees a leaf)."""

    shape: tuple[int, ...]
    dtype: str
    role: str
    lead: int = 0  # leading axes no mesh axis splits (the layer axis of a stacked weight)


class ScaleByAdamState(NamedTuple):  # optax's Adam state, as optax.adam(...).init gives it
    count: Any
    mu: Any
    nu: Any


class EmptyState(NamedTuple):
    pass


def train_state(m: Model, *, stacked: bool = False) -> dict:
    """{"params", "opt_state": (Adam(count, mu, nu), Empty()), "step"}, flax-style names.

    Layers are ``layers_<i>`` subtrees, or with ``stacked`` one ``layers``
    subtree whose weights have a leading axis of ``m.layers`` (``nn.scan``).
    """
    lead = (m.layers,) if stacked else ()

    def weights(dtype: str) -> dict:
        def dense(d_in: int, d_out: int, role: str, layer: bool = True) -> dict:
            extra = lead if layer else ()
            return {"kernel": Param((*extra, d_in, d_out), dtype, role, len(extra))}

        def norm(layer: bool = True) -> dict:
            extra = lead if layer else ()
            return {"scale": Param((*extra, m.d_model), dtype, REPLICATED, len(extra))}

        tree: dict[str, Any] = {"embed": {"embedding": Param((m.vocab, m.d_model), dtype, EMBED)}}
        for i in range(1 if stacked else m.layers):
            tree["layers" if stacked else f"layers_{i}"] = {
                "attention": {
                    "query": dense(m.d_model, m.heads * m.head_dim, COLUMN),
                    "key": dense(m.d_model, m.kv_heads * m.head_dim, COLUMN),
                    "value": dense(m.d_model, m.kv_heads * m.head_dim, COLUMN),
                    "out": dense(m.heads * m.head_dim, m.d_model, ROW),
                },
                "mlp": {
                    "gate": dense(m.d_model, m.ffn, COLUMN),
                    "up": dense(m.d_model, m.ffn, COLUMN),
                    "down": dense(m.ffn, m.d_model, ROW),
                },
                "attention_norm": norm(),
                "mlp_norm": norm(),
            }
        tree["final_norm"] = norm(layer=False)
        tree["lm_head"] = dense(m.d_model, m.vocab, HEAD, layer=False)
        return tree

    scalar = Param((), "int32", REPLICATED)
    adam = ScaleByAdamState(count=scalar, mu=weights("float32"), nu=weights("float32"))
    return {"params": weights("bfloat16"), "opt_state": (adam, EmptyState()), "step": scalar}


# --------------------------------------------------------------------------- shardings without devices


def device_boxes(
    mesh: Sequence[tuple[str, int]],
    spec: Sequence[str | tuple[str, ...] | None],
    shape: Sequence[int],
) -> list[Box]:
    """Each device's box under ``NamedSharding(mesh, P(*spec))``, devices in row-major mesh order.

    What ``devices_indices_map`` gives, without devices: a dimension split
    over mesh axes ``(a, b)`` is cut into ``size(a) * size(b)`` equal blocks,
    and a device takes block ``coord(a) * size(b) + coord(b)``; an unnamed
    dimension is whole. Raises ValueError where the blocks would be unequal,
    as JAX does (``IndivisibleError``).
    """
    names = [a for a, _ in mesh]
    sizes = [k for _, k in mesh]
    coords = np.indices(sizes).reshape(len(sizes), -1).astype(np.int64)
    count = coords.shape[1]
    if not shape:
        return [()] * count
    per_dim = []
    for d, n in enumerate(shape):
        entry = spec[d] if d < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        index = np.zeros(count, np.int64)
        parts = 1
        for axis in axes:
            j = names.index(axis)
            index = index * sizes[j] + coords[j]
            parts *= sizes[j]
        if n % parts:
            raise ValueError(
                f"dimension {d} of shape {tuple(shape)} does not divide into {parts} shards "
                f"over mesh axes {axes}"
            )
        block = n // parts
        lo = index * block
        hi = lo + block
        per_dim.append(list(zip(lo.tolist(), hi.tolist(), strict=True)))
    return [tuple(b) for b in zip(*per_dim, strict=True)]


def first_writers(boxes: Sequence[Box], devices_per_process: int) -> dict[Box, int]:
    """Who writes each distinct box: the process of the first device holding it (JAX's
    ``replica_id == 0``), as ``_stage._sharding_grid`` decides on real devices."""
    out: dict[Box, int] = {}
    for device, box in enumerate(boxes):
        out.setdefault(box, device // devices_per_process)
    return out


@functools.cache
def _all_boxes(
    mesh: tuple[tuple[str, int], ...], spec: Spec, shape: tuple[int, ...]
) -> tuple[Box, ...]:
    return tuple(device_boxes(mesh, spec, shape))


@functools.cache
def _describe(mesh: tuple[tuple[str, int], ...], spec: Spec) -> dict:
    """The sharding record a save writes for a leaf, from distckpt's own describer."""
    abstract = AbstractMesh(tuple(k for _, k in mesh), tuple(a for a, _ in mesh))
    return _stage.describe_sharding(NamedSharding(abstract, PartitionSpec(*spec)))


def process_boxes(layout: Layout, spec: Spec, shape: tuple[int, ...], r: int) -> list[Box]:
    """The distinct boxes the devices of process ``r`` hold (devices ``r*dpp`` on)."""
    boxes = _all_boxes(layout.mesh, spec, shape)
    dpp = layout.devices_per_process
    return list(dict.fromkeys(boxes[r * dpp : (r + 1) * dpp]))


# --------------------------------------------------------------------------- the save


def head_size(process: int, files: Sequence[str], records: int, wide: bool, sections: int) -> int:
    """The exact size of a chunk index's head (docs/format.md: fixed width).

    ``16 + pad8(len(header)) + 20 * sections``, the header being the JSON
    ``_index.encode_index`` writes (the process number and the file names
    are in it).
    """
    header = json.dumps(
        {
            "process": process,
            "files": sorted(files),
            "records": records,
            "bounds": "<i8" if wide else "<i4",
            "sections": sections,
        },
        separators=(",", ":"),
    ).encode()
    return (
        len(_index.MAGIC)
        + 8
        + len(header)
        + (-len(header) % 8)
        + _index.SECTION.itemsize * sections
    )


def index_size(
    process: int,
    files: Sequence[str],
    records: int,
    bound_count: int,
    wide: bool,
    sections: int,
) -> int:
    """The exact size of a chunk index: its head, then its sections' records and boxes.

    ``head_size + 32 * records + (4 or 8) * bound_count``; ``bound_count`` is
    two bounds per dimension per record. How many sections the records make
    depends on their order and sizes (``_index.SECTION_BYTES``), not on the
    process: a group's members take their representative's.
    """
    body = _index.RECORD.itemsize * records + (8 if wide else 4) * bound_count
    return head_size(process, files, records, wide, sections) + body


@dataclass(frozen=True)
class Written:
    """What one simulated process wrote, as its report says, and how that was found."""

    report: _commit.Report
    records: int
    bound_count: int
    sections: int  # of its chunk index
    real: bool  # planned by _plan.plan_writes and encoded by _index.encode_index
    cpu: dict[str, float] = field(default_factory=dict)  # real ones: planning CPU seconds


class SaveSim:
    """Every process's part of one save: shards, plan, chunk index, report.

    Processes whose shards have the same shapes in the same leaves plan the
    same chunks and files (chunk shapes and file packing depend only on
    shard shapes and sizes), so one representative per such group is
    planned for real and the others' record counts, files and index sizes
    follow from it (``index_size``), as does their index's head: the same
    records per (cell, leaf) make the same sections (``head``). Any process
    can be planned and encoded for real on demand (``make_real``): the
    restore does that for every writer whose index it reads, and every real
    one is checked against the formula and what its group predicted.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        layout = cfg.save
        items, self.structure = _tree.walk(train_state(cfg.model, stacked=cfg.stacked))
        self.params: list[Param] = [cast(Param, leaf) for _, leaf in items]
        self.specs = [
            LeafSpec(
                path=path,
                display=_tree.display(path),
                kind=_tree.ARRAY,
                shape=p.shape,
                dtype=p.dtype,
                sharding=_describe(layout.mesh, layout.spec_of(p)),
            )
            for (path, _), p in zip(items, self.params, strict=True)
        ]
        # Leaves saved alike share one grid, as _stage._sharding_grid's cache shares them.
        self.keys = [(p.shape, layout.spec_of(p)) for p in self.params]
        began = time.process_time()
        self.grid_of: dict[tuple, Grid] = {}
        for shape, spec in dict.fromkeys(self.keys):
            writers = first_writers(
                _all_boxes(layout.mesh, spec, shape), layout.devices_per_process
            )
            self.grid_of[(shape, spec)] = _index.build_grid(shape, writers.items())
        self.grid_cpu = time.process_time() - began
        self.grids: list[Grid | None] = [self.grid_of[k] for k in self.keys]
        self.cells = {key: _cells_by_process(g) for key, g in self.grid_of.items()}
        began = time.process_time()
        self.digest = _index.plan_digest(self.grids)
        self.digest_cpu = time.process_time() - began
        self.written: dict[int, Written] = {}
        self._encoded: dict[int, bytes] = {}
        self._heads: dict[int, _index.IndexHead] = {}  # decoded (real) or derived
        self._groups: dict[tuple, int] = {}  # shard signature -> representative process
        self.rep_of: dict[int, int] = {}  # process -> its group's representative

    @property
    def processes(self) -> int:
        return self.cfg.save.processes

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def shards(self, p: int) -> list[tuple[int, Box, int]]:
        """``(leaf, box, itemsize)`` of every shard ``p`` writes, in leaf order (as _stage gives)."""
        return [
            (i, box, spec.itemsize)
            for i, (spec, key) in enumerate(zip(self.specs, self.keys, strict=True))
            for box in self.cells[key].get(p, ())
        ]

    def signature(self, p: int) -> tuple:
        """What makes processes' indexes alike: their cells' shapes, in rank order, per
        grid, and the width of their bounds."""
        shapes = tuple(
            tuple(_reshard.box_shape(b) for b in cells.get(p, ())) for cells in self.cells.values()
        )
        return shapes, self._max_bound(p) >= 1 << 31

    def derive_all(self) -> None:
        """Every process's report: planned for real per group, derived for the others."""
        for p in range(self.processes):
            sig = self.signature(p)
            self.rep_of[p] = self._groups.setdefault(sig, p)
            if self._groups[sig] == p:
                self.make_real([p], check=True)
            elif p not in self.written:
                self.written[p] = self._derive(p, self.written[self._groups[sig]])

    @property
    def groups(self) -> int:
        return len(self._groups)

    def _derive(self, p: int, rep: Written) -> Written:
        files = {
            _layout.data_file(p, s): n for s, n in enumerate(rep.report.files.values())
        }  # same segments and sizes, this process's names
        wide = self._max_bound(p) >= 1 << 31  # the representative's: in the signature
        size = index_size(p, list(files), rep.records, rep.bound_count, wide, rep.sections)
        head = head_size(p, list(files), rep.records, wide, rep.sections)
        # Not encoded, so no checksum: a stand-in of the same width. A reader that
        # loaded this index would find it does not match, so the restore makes
        # real every index it reads before the commit.
        crc = crc32c.crc32c(f"index of process {p}, not encoded".encode())
        index = IndexRef(p, _layout.index_file(p), size, head, crc, rep.records)
        report = _commit.Report(
            process=p,
            files=files,
            index=index,
            plan=self.digest,
            planned_bytes=rep.report.planned_bytes,
            timing=_timing(p),
        )
        return Written(report, rep.records, rep.bound_count, rep.sections, real=False)

    def head(self, p: int) -> _index.IndexHead:
        """Process ``p``'s index head: decoded from its encoded index (``_index.decode_head``)
        if it is real, else derived from its group's representative's."""
        found = self._heads.get(p)
        if found is None:
            found = self._heads[p] = self._derive_head(p)
        return found

    def _derive_head(self, p: int) -> _index.IndexHead:
        """The head ``p``'s index would have: its representative's section table (the same
        records per (cell, leaf) make the same sections, in the same order), after a
        head of its own size, and its own files. The section checksums are the
        representative's: a derived index has none of its own (see ``_derive``)."""
        rep = self._heads[self.rep_of[p]]
        w = self.written[p]
        ref = w.report.index
        assert (
            ref is not None and rep.ref.nbytes - rep.ref.head_bytes == ref.nbytes - ref.head_bytes
        )
        files = sorted(w.report.files)
        return dataclasses.replace(
            rep,
            ref=ref,
            files=files,
            file_bytes=np.asarray([w.report.files[f] for f in files], np.uint64),
            starts=rep.starts + (ref.head_bytes - rep.ref.head_bytes),
        )

    def _max_bound(self, p: int) -> int:
        return max(
            (hi for cells in self.cells.values() for box in cells.get(p, ()) for _, hi in box),
            default=0,
        )

    def make_real(self, processes: Sequence[int], *, check: bool | None = None) -> None:
        """Plans and encodes these processes' writes for real (the formula is checked).

        ``check``: also run ``_index.check_own_writes`` (about a second per
        process at full scale; by default on every group's representative,
        or on all with ``Config.check_all``).
        """
        check = self.cfg.check_all if check is None else check
        for p in processes:
            if p in self.written and self.written[p].real:
                continue
            derived = self.written.get(p)
            shards = self.shards(p)
            t0 = time.process_time()
            files = _plan.plan_writes(
                shards,
                process=p,
                chunk_bytes=_knobs.get("chunk_bytes"),
                segment_bytes=_knobs.get("segment_bytes"),
            )
            t1 = time.process_time()
            records = _records(p, files)
            raw = _index.encode_index(p, records, self.grids)
            t2 = time.process_time()
            problems = _index.check_own_writes(self.grids, shards, p) if check else []
            t3 = time.process_time()
            if problems:
                raise AssertionError(f"process {p}: check_own_writes found {problems[:3]}")
            # What _chunks.write_index records about the index it writes, and its
            # head as a reader decodes it.
            index = _index.make_ref(p, _layout.index_file(p), raw)
            head = _index.decode_head(
                raw[: index.head_bytes], index, {fw.name: fw.nbytes for fw in files}
            )
            sections = len(head.sections)
            bound_count = sum(2 * len(c.box) for c in records)
            report = _commit.Report(
                process=p,
                files={fw.name: fw.nbytes for fw in files},
                index=index,
                plan=self.digest,
                planned_bytes=sum(_reshard.box_size(b) * size for _, b, size in shards),
                timing=_timing(p),
            )
            wide = self._max_bound(p) >= 1 << 31
            formula = index_size(p, list(report.files), len(records), bound_count, wide, sections)
            formula_head = head_size(p, list(report.files), len(records), wide, sections)
            if (formula, formula_head) != (len(raw), index.head_bytes):
                raise AssertionError(
                    f"process {p}: index_size and head_size give {formula} and {formula_head}, "
                    f"encoded {len(raw)} with a head of {index.head_bytes}"
                )
            if derived is not None:
                _check_derived(p, derived, self._derive_head(p), report, head)
            self._encoded[p] = raw
            self._heads[p] = head
            cpu = {"plan_writes": t1 - t0, "encode_index": t2 - t1}
            if check:
                cpu["check_own_writes"] = t3 - t2
            self.written[p] = Written(
                report, len(records), bound_count, sections, real=True, cpu=cpu
            )

    def index_bytes(self, p: int) -> bytes:
        """Process ``p``'s encoded index (planned for real if it was not yet)."""
        if p not in self._encoded:
            self.make_real([p])
        return self._encoded[p]

    def reports(self) -> list[_commit.Report]:
        return [self.written[p].report for p in range(self.processes)]


def _check_derived(
    p: int,
    derived: Written,
    derived_head: _index.IndexHead,
    report: _commit.Report,
    head: _index.IndexHead,
) -> None:
    """Raises unless what ``p``'s group predicted of it is what planning and encoding it
    gave: files and sizes, index size, head size, record count, and the section table
    (keys, record counts, sizes, offsets) a reader uses to find its records."""
    ref, want = derived.report.index, report.index
    assert ref is not None and want is not None
    if (
        derived.report.files != report.files
        or derived.report.planned_bytes != report.planned_bytes
        or (ref.nbytes, ref.head_bytes, ref.chunks) != (want.nbytes, want.head_bytes, want.chunks)
        or derived_head.files != head.files
        or not np.array_equal(derived_head.file_bytes, head.file_bytes)
        or derived_head.bound_type != head.bound_type
        or not np.array_equal(derived_head.keys, head.keys)
        or not np.array_equal(derived_head.starts, head.starts)
        or not np.array_equal(derived_head.sections["records"], head.sections["records"])
        or not np.array_equal(derived_head.sections["nbytes"], head.sections["nbytes"])
    ):
        raise AssertionError(f"process {p}: derived from its group, but planned otherwise")


def _cells_by_process(grid: Grid) -> dict[int, list[Box]]:
    """Each writer's cells in C order (the order of its devices' shards)."""
    out: dict[int, list[Box]] = {}
    for cell in np.ndindex(*grid.owners.shape):
        out.setdefault(int(grid.owners[cell]), []).append(grid.cell_box(cell))
    return out


def _records(p: int, files: Sequence[FileWrite]) -> list[ChunkRecord]:
    """The chunk records writing ``files`` gives: offsets from the plan, a stand-in crc32c."""
    out = []
    for fw in files:
        offset = 0
        for c in fw.chunks:
            crc = (c.leaf * 2654435761 + offset * 40503 + p) & 0xFFFFFFFF
            out.append(ChunkRecord(c.leaf, fw.name, offset, c.nbytes, crc, c.box))
            offset += c.nbytes
    return out


def _timing(p: int) -> dict[str, float]:
    rng = random.Random(p)  # full-precision floats, as perf_counter differences are
    return {"stage_s": rng.uniform(0.5, 2.0), "write_s": rng.uniform(5.0, 20.0)}


# --------------------------------------------------------------------------- the commit


@dataclass(frozen=True)
class Commit:
    manifest: Manifest
    raw: bytes
    cpu: dict[str, float]  # CPU seconds: reports decoded, root built, serialised


def commit(sim: SaveSim, blobs: Sequence[bytes]) -> Commit:
    """The primary's commit work (``_save.SaveJob._commit`` without the storage write), timed.

    ``blobs``: the report each process published (``Report.to_json``). The
    primary decodes them, proves coverage and builds the root
    (``_commit.build_root``), adds the save statistics, and serialises it
    (``Manifest.to_json``, checksum included). CPU time of this thread.
    """
    save = sim.cfg.save
    with _runtime.paused_gc():  # as save() runs
        t0 = time.thread_time()
        reports = [_commit.Report.from_json(b) for b in blobs]
        t1 = time.thread_time()
        manifest = _commit.build_root(
            attempt=_layout.new_attempt(),
            specs=sim.specs,
            grids=sim.grids,
            reports=reports,
            process_count=save.processes,
            device_count=save.processes * save.devices_per_process,
            user_metadata={"run": f"scale-sim-{sim.cfg.name}"},
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            versions=_save._versions(),
            structure=sim.structure,
        )
        _, manifest.save_stats = _save.save_stats(
            manifest, [r.timing for r in reports], commit_s=0.123456789
        )
        manifest.manager = {"step": 100000, "metrics": {"loss": 1.6180339887}}
        t2 = time.thread_time()
        raw = manifest.to_json()
        t3 = time.thread_time()
    cpu = {"decode_reports": t1 - t0, "build_root": t2 - t1, "to_json": t3 - t2}
    cpu["total"] = t3 - t0
    return Commit(manifest, raw, cpu)


def root_sections(raw: bytes) -> dict[str, int]:
    """Bytes of each top-level member of the root record (as compact JSON)."""
    doc = json.loads(raw)
    return {
        k: len(json.dumps(v, separators=(",", ":")).encode()) + len(k) + 4 for k, v in doc.items()
    }


class _Where:
    """What ``_commit.load`` asks of a storage when the manifest's bytes are given: a name."""

    display = "sim://checkpoint"


# --------------------------------------------------------------------------- the restore


class IndexServer(Reader):
    """The attempt's files, in memory: serves the chunk indexes the save encoded.

    Only index files are read by ``ChunkTable``; data files are never asked
    for (the simulation has no data). Logs every read it serves.
    """

    display = "sim://checkpoint/attempt"

    def __init__(self, sim: SaveSim):
        self.sim = sim
        self.names = {_layout.index_file(p): p for p in range(sim.processes)}
        self.log: list[tuple[str, int, int]] = []  # (name, offset, bytes) of each read

    def read(
        self, name: str, offset: int, nbytes: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        if name not in self.names:
            raise CorruptCheckpointError(f"{self.display}/{name} is missing", [name])
        data = np.frombuffer(self.sim.index_bytes(self.names[name]), np.uint8)
        if offset + nbytes > data.size:
            raise CorruptCheckpointError(f"{self.display}/{name} is short", [name])
        self.log.append((name, offset, nbytes))
        part = data[offset : offset + nbytes]
        if out is not None:
            out[:nbytes] = part
            return out[:nbytes]
        return part

    def size(self, name: str) -> int | None:
        p = self.names.get(name)
        return None if p is None else len(self.sim.index_bytes(p))

    def close(self) -> None:
        pass


class RestoreSim:
    """One restore layout: what each restoring process needs, and what of the indexes
    that reads.

    A restoring process reads, of each writer whose cells its boxes overlap,
    the index's head, then the sections holding the (cell, leaf) keys of
    those cells, near ones in one read (``ChunkTable.prefetch``). What that
    reads depends on the writer's section table and on which of its cells
    the process needs, by class of alike leaves: ``needs`` gives the second,
    ``SaveSim.head`` the first, and ``_index.IndexHead.sections_for`` and
    ``_chunks._runs``, the functions ``ChunkTable`` calls, the rest.
    """

    def __init__(self, sim: SaveSim, layout: Layout):
        self.sim, self.layout = sim, layout
        self.targets = [(p.shape, layout.spec_of(p)) for p in sim.params]
        # Leaves alike in the save and in the target need the same cells.
        pairs = list(zip(sim.keys, self.targets, strict=True))
        self.classes = list(dict.fromkeys(pairs))
        number = {c: i for i, c in enumerate(self.classes)}
        self.leaves_of: list[list[int]] = [[] for _ in self.classes]
        for leaf, c in enumerate(pairs):
            self.leaves_of[number[c]].append(leaf)
        self._sections: dict[tuple[int, bytes], list[int]] = {}  # (representative, need)
        self._reads: dict[tuple[int, bytes], dict[str, int]] = {}  # (writer, need)

    def boxes(self, r: int, leaf: int) -> list[Box]:
        shape, spec = self.targets[leaf]
        return process_boxes(self.layout, spec, shape, r)

    def needs(self, r: int) -> dict[int, bytes]:
        """For each writer whose index ``r`` reads, which of its cells ``r`` needs: its
        ``(class, cell rank)`` pairs (``Grid.cells_in`` of ``r``'s boxes, the rule
        ``ChunkTable.prefetch`` follows), sorted, as bytes (a key for the caches)."""
        assert len(self.classes) < 1 << 8 and self.sim.processes < 1 << 23  # the packing below
        parts = []
        for c, (save_key, (shape, spec)) in enumerate(self.classes):
            grid = self.sim.grid_of[save_key]
            for box in process_boxes(self.layout, spec, shape, r):
                cells = _cells_in(grid, box)  # (owner, rank) rows
                parts.append((cells[:, 0] << 40) | (c << 32) | cells[:, 1])
        keys = np.unique(np.concatenate(parts))
        owners = keys >> 40
        cuts = np.flatnonzero(np.diff(owners)) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), len(keys)]
        low = keys & ((1 << 40) - 1)
        return {int(owners[a]): low[a:b].tobytes() for a, b in zip(starts, ends, strict=True)}

    def writers(self, r: int) -> set[int]:
        """The processes whose indexes ``r`` reads: the owners of its boxes' cells."""
        return set(self.needs(r))

    def index_reads(self, w: int, need: bytes) -> dict[str, int]:
        """What ``ChunkTable.prefetch`` reads of writer ``w``'s index for these cells:
        its head, then the sections holding their (cell, leaf) keys, in runs."""
        found = self._reads.get((w, need))
        if found is None:
            head = self.sim.head(w)
            numbers = self._section_numbers(self.sim.rep_of[w], need)
            sizes = head.sections["nbytes"]
            runs = _chunks._runs(numbers, head.starts, sizes)
            section_bytes = sum(
                int(head.starts[run[-1]]) + int(sizes[run[-1]]) - int(head.starts[run[0]])
                for run in runs
            )
            found = self._reads[(w, need)] = {
                "head_bytes": head.ref.head_bytes,
                "section_bytes": section_bytes,
                "sections": len(numbers),
                "records_read": int(head.sections["records"][numbers].sum()),
                "reads": 1 + len(runs),
            }
        return found

    def _section_numbers(self, rep: int, need: bytes) -> list[int]:
        """The sections holding these cells' keys, in the representative's section table
        (every member of its group has the same table: ``_check_derived``)."""
        found = self._sections.get((rep, need))
        if found is None:
            pairs = np.frombuffer(need, np.int64)
            keys = [
                (int(k & 0xFFFFFFFF), leaf)
                for k in pairs.tolist()
                for leaf in self.leaves_of[k >> 32]
            ]
            found = self._sections[(rep, need)] = self.sim.head(rep).sections_for(keys)
        return found

    def cell_bytes(self, r: int) -> tuple[int, int]:
        """(bytes of the saved shards ``r``'s boxes overlap, bytes ``r`` needs).

        Chunks lie inside shards, so the first bounds what ``r`` would read.
        """
        per_class: dict[tuple, tuple[int, int]] = {}
        for save_key, (shape, spec) in self.classes:
            grid = self.sim.grid_of[save_key]
            boxes = process_boxes(self.layout, spec, shape, r)
            cells: set[tuple[int, ...]] = set()
            for box in boxes:
                ranges = grid.cell_ranges(box)
                cells.update(itertools.product(*(range(c.start, c.stop) for c in ranges)))
            touched = sum(_reshard.box_size(grid.cell_box(c)) for c in cells)
            per_class[(save_key, (shape, spec))] = (
                touched,
                sum(_reshard.box_size(b) for b in boxes),
            )
        touched = needed = 0
        for key, target, leaf in zip(self.sim.keys, self.targets, self.sim.specs, strict=True):
            t, n = per_class[(key, target)]
            touched += t * leaf.itemsize
            needed += n * leaf.itemsize
        return touched, needed

    def predicted(self, root_bytes: int) -> list[dict]:
        """Every restoring process: its writers and what it reads of their indexes
        (metadata = root + heads + sections)."""
        out = []
        for r in range(self.layout.processes):
            needs = self.needs(r)
            row = {"process": r, "writers": len(needs)}
            total: Counter[str] = Counter()
            for w, need in needs.items():
                total.update(self.index_reads(w, need))
            row.update({k: total[k] for k in PREDICTED})
            row["index_bytes"] = row["head_bytes"] + row["section_bytes"]
            row["metadata_bytes"] = root_bytes + row["index_bytes"]
            out.append(row)
        return out

    def sample(self, predicted: list[dict], count: int) -> list[int]:
        """``count`` processes spread over the range, and the one that reads the most."""
        n = self.layout.processes
        spread = sorted({int(round(x)) for x in np.linspace(0, n - 1, min(count, n))})
        worst = max(predicted, key=lambda row: (row["metadata_bytes"], -row["process"]))
        return sorted({*spread, worst["process"]})

    def read(self, r: int, manifest: Manifest, server: IndexServer) -> dict:
        """Finds the chunk records of every box ``r`` needs with the real ``ChunkTable``,
        as restore does: ``prefetch`` of every (leaf, box), then the lookups."""
        table = _chunks.ChunkTable(manifest, server, server.display)
        wanted = [(leaf, self.boxes(r, leaf)) for leaf in range(len(self.sim.specs))]
        server.log.clear()
        before = _chunks.metadata_bytes_read()
        with _runtime.paused_gc():
            began = time.process_time()
            table.prefetch((leaf, box) for leaf, boxes in wanted for box in boxes)
            fetched = time.process_time()
            found = [[table.overlapping(leaf, box) for box in boxes] for leaf, boxes in wanted]
            cpu = time.process_time() - fetched
        index_bytes = _chunks.metadata_bytes_read() - before
        # What was found: every box covered exactly (ChunkTable refuses otherwise;
        # checked again here from the boxes), and what it would read.
        needed = chunk_bytes = records_bytes = 0
        unique: dict[tuple[str, int], ChunkRecord] = {}
        for (leaf, boxes), per_box in zip(wanted, found, strict=True):
            spec = self.sim.specs[leaf]
            for box, chunks in zip(boxes, per_box, strict=True):
                covered = sum(
                    _reshard.box_size(_reshard.intersect(c.box, box) or ()) if box else 1
                    for c in chunks
                )
                if covered != _reshard.box_size(box):
                    raise AssertionError(f"process {r}: {spec.display} box {box} not covered")
                needed += _reshard.box_size(box) * spec.itemsize
                for c in chunks:
                    unique[(c.file, c.offset)] = c
        for c in unique.values():
            chunk_bytes += c.nbytes
            width = self.sim.head(manifest.files[c.file]["process"]).bound_type.itemsize
            records_bytes += _index.RECORD.itemsize + width * 2 * len(c.box)
        heads = {
            name: n
            for name, offset, n in server.log
            if offset == 0 and n == self.sim.head(server.names[name]).ref.head_bytes
        }
        return {
            "process": r,
            "indexes_read": len(heads),
            "reads": len(server.log),
            "index_bytes": index_bytes,
            "head_bytes": sum(heads.values()),
            "section_bytes": index_bytes - sum(heads.values()),
            "index_bytes_of_found_records": records_bytes,
            "records_found": len(unique),
            "data_bytes_needed": needed,
            "chunk_bytes_to_read": chunk_bytes,
            "prefetch_cpu_s": fetched - began,
            "lookup_cpu_s": cpu,
            "writers_read": sorted({server.names[name] for name, _, _ in server.log}),
        }


# What the prediction sums over a restoring process's writers (RestoreSim.index_reads).
PREDICTED = ("head_bytes", "section_bytes", "sections", "records_read", "reads")


@functools.lru_cache(maxsize=1 << 16)
def _cells_in(grid: Grid, box: Box) -> np.ndarray:
    """``grid.cells_in(box)`` as an int64 array of (owner, rank) rows."""
    return np.asarray(grid.cells_in(box), np.int64).reshape(-1, 2)


def _index_nbytes(w: Written) -> int:
    return w.report.index.nbytes if w.report.index is not None else 0


# --------------------------------------------------------------------------- coordination


class CoordinationService:
    """JAX's coordination service, in memory: a key-value store and named barriers."""

    def __init__(self, processes: int, timeout_s: float):
        self.processes, self.timeout_s = processes, timeout_s
        self.kv: dict[str, str | bytes] = {}
        self.changed = threading.Condition()
        self._barriers: dict[str, threading.Barrier] = {}
        self.arrived: dict[str, set[int]] = {}  # barrier -> processes that reached it

    def barrier(self, name: str) -> threading.Barrier:
        with self.changed:
            if name not in self._barriers:
                self._barriers[name] = threading.Barrier(self.processes)
            return self._barriers[name]


def _runtime_error(message: str) -> Exception:
    return jax.errors.JaxRuntimeError(message)


def _size(v: str | bytes) -> int:
    return len(v.encode()) if isinstance(v, str) else len(v)


class SimClient:
    """One process's coordination-service client: the calls ``Collective`` makes, counted.

    Every call is one operation (one request to the service), attributed to
    the phase this process is in.
    """

    def __init__(self, service: CoordinationService, pid: int = 0):
        self.service, self.pid = service, pid
        self.phase = "-"
        self.calls: Counter[tuple[str, str]] = Counter()  # (phase, method)
        self.sent: Counter[str] = Counter()  # bytes of keys and values sent, by phase
        self.received: Counter[str] = Counter()  # bytes of values returned, by phase
        self.entries: Counter[str] = Counter()  # values returned by listings, by phase

    def _count(self, method: str, sent: int = 0, received: int = 0) -> None:
        self.calls[(self.phase, method)] += 1
        self.sent[self.phase] += sent
        self.received[self.phase] += received

    def _set(self, key: str, value: str | bytes, allow_overwrite: bool) -> None:
        s = self.service
        with s.changed:
            if key in s.kv and not allow_overwrite:
                raise _runtime_error(f"ALREADY_EXISTS: key {key} already exists")
            s.kv[key] = value
            s.changed.notify_all()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self._count("key_value_set", len(key) + _size(value))
        self._set(key, value, allow_overwrite)

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        self._count("key_value_set_bytes", len(key) + len(value))
        self._set(key, value, allow_overwrite)

    def key_value_increment(self, key: str, increment: int) -> int:
        s = self.service
        with s.changed:
            value = int(s.kv.get(key, "0")) + increment
            s.kv[key] = str(value)
            s.changed.notify_all()
        self._count("key_value_increment", len(key) + 8, 8)
        return value

    def key_value_try_get(self, key: str) -> str:
        with self.service.changed:
            value = self.service.kv.get(key)
        if value is None:
            self._count("key_value_try_get", len(key))
            raise _runtime_error(f"NOT_FOUND: {key} not found")
        self._count("key_value_try_get", len(key), _size(value))
        return str(value)

    def _blocking_get(self, method: str, key: str, timeout_in_ms: int) -> str | bytes:
        s = self.service
        with s.changed:
            if not s.changed.wait_for(lambda: key in s.kv, timeout_in_ms / 1000):
                raise _runtime_error(f"DEADLINE_EXCEEDED: {key} did not appear")
            value = s.kv[key]
        self._count(method, len(key), _size(value))
        return value

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        value = self._blocking_get("blocking_key_value_get", key, timeout_in_ms)
        return value.decode() if isinstance(value, bytes) else value

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        value = self._blocking_get("blocking_key_value_get_bytes", key, timeout_in_ms)
        return value.encode() if isinstance(value, str) else value

    def _listing(self, method: str, key: str) -> list[tuple[str, str | bytes]]:
        prefix = key.rstrip("/") + "/"
        with self.service.changed:
            found = [(k, v) for k, v in self.service.kv.items() if k.startswith(prefix)]
        self._count(method, len(key), sum(len(k) + _size(v) for k, v in found))
        self.entries[self.phase] += len(found)
        return found

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]:
        return [
            (k, v.decode() if isinstance(v, bytes) else v)
            for k, v in self._listing("key_value_dir_get", key)
        ]

    def key_value_dir_get_bytes(self, key: str) -> list[tuple[str, bytes]]:
        return [
            (k, v.encode() if isinstance(v, str) else v)
            for k, v in self._listing("key_value_dir_get_bytes", key)
        ]

    def key_value_delete(self, key: str) -> None:
        self._count("key_value_delete", len(key))
        base = key.rstrip("/")
        with self.service.changed:
            for k in [k for k in self.service.kv if k == base or k.startswith(base + "/")]:
                del self.service.kv[k]

    def wait_at_barrier(
        self, barrier_id: str, timeout_in_ms: int, process_ids: Sequence[int] | None = None
    ) -> None:
        self._count("wait_at_barrier", len(barrier_id))
        with self.service.changed:
            self.service.arrived.setdefault(barrier_id, set()).add(self.pid)
        try:
            self.service.barrier(barrier_id).wait(timeout_in_ms / 1000)
        except threading.BrokenBarrierError:
            # As JAX's service says it: the tasks that did not arrive, one per line.
            late = sorted(set(range(self.service.processes)) - self.service.arrived[barrier_id])
            raise _runtime_error(
                f"DEADLINE_EXCEEDED: Barrier timed out. Barrier_id: {barrier_id}. "
                "Some timed out task names:\n" + "\n".join(map(str, late)) + "\n\n"
            ) from None


class _PerThreadCounter:
    """``_multihost._op_counter`` for simulated processes: each thread counts its own operations."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __iter__(self) -> _PerThreadCounter:
        return self

    def __next__(self) -> int:
        n = getattr(self._local, "n", 0)
        self._local.n = n + 1
        return n


_this = threading.local()  # the simulated process this thread is: .pid, .count, .client


@contextmanager
def simulated_processes() -> Iterator[None]:
    """Makes ``Collective`` see, on each thread, the process that thread simulates.

    ``Collective.__init__`` asks ``_multihost`` for the process index, the
    process count and the client (module functions, called then), and
    numbers operations with a module counter; these are swapped for
    per-thread ones here, and restored after. No distckpt code changes.
    """
    saved = (
        _multihost.client,
        _multihost.process_index,
        _multihost.process_count,
        _multihost._op_counter,
    )
    _multihost.client = lambda: _this.client
    _multihost.process_index = lambda: _this.pid
    _multihost.process_count = lambda: _this.count
    _multihost._op_counter = _PerThreadCounter()  # type: ignore[assignment]
    try:
        yield
    finally:
        (
            _multihost.client,
            _multihost.process_index,
            _multihost.process_count,
            _multihost._op_counter,
        ) = saved


def run_processes(
    n: int, body: Callable[[int, SimClient], None], timeout_s: float
) -> list[SimClient]:
    """Runs ``body(pid, client)`` on ``n`` threads, one simulated process each."""
    service = CoordinationService(n, timeout_s)
    clients = [SimClient(service, pid) for pid in range(n)]
    errors: list[BaseException | None] = [None] * n

    def main(pid: int) -> None:
        _this.pid, _this.count, _this.client = pid, n, clients[pid]
        try:
            body(pid, clients[pid])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[pid] = e

    old = threading.stack_size(1 << 20)
    try:
        with simulated_processes():
            threads = [threading.Thread(target=main, args=(p,), daemon=True) for p in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout_s * 4)
    finally:
        threading.stack_size(old)
    failed = [(p, e) for p, e in enumerate(errors) if e is not None]
    if failed:
        p, e = failed[0]
        raise RuntimeError(f"{len(failed)} simulated process(es) failed, first {p}: {e!r}") from e
    return clients


def _phased(client: SimClient, phase: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        client.phase = phase  # what this process asks the service from now on is this phase's
        return fn()

    return run


def coordinate_save(
    n: int,
    reports: Sequence[bytes],
    timeout_s: float,
    build: Callable[[list[bytes]], Commit] | None = None,
) -> dict:
    """A save's three phases on ``n`` simulated processes, as ``_save.SaveJob`` runs them.

    prepare: the payload ``_prepare`` publishes (shared by the primary, agreed
    by all with ``_save._agreement``); write: each process publishes its
    report blob; commit: the primary reads every report and returns the
    save statistics, which every process reads (``last``). With ``build``
    (the simulated save's own reports), the primary builds the root from
    the blobs it read (``commit``); else it only decodes them. The
    primary's CPU time in the commit phase's work is measured either way.
    """
    primary_cpu: dict[str, Any] = {}
    where = "sim://checkpoint"
    fingerprint = "f" * 64  # a sha256 hex digest, as _save._fingerprint gives
    attempt = _layout.new_attempt()
    manager = {"step": 100000, "metrics": {"loss": 1.6180339887}}

    def body(pid: int, client: SimClient) -> None:
        coll = _multihost.Collective("save", where, 600.0)

        def prepare() -> dict:
            out: dict[str, Any] = {
                "fingerprint": fingerprint,
                "pipeline": None,
                "where": where,
                "manager": manager,
            }
            if coll.is_primary:
                out["per_process"] = []
                out["attempt"] = attempt
            return out

        def disagree(payloads: list[dict]) -> None:
            _save._check_same_target(payloads)
            _save._check_same_tree(payloads, where)

        def write() -> dict:
            coll.put_blob(f"report/{pid}", reports[pid])
            return {}

        def commit() -> dict | None:
            if not coll.is_primary:
                return None
            began = time.thread_time()
            blobs = coll.get_blobs("report")
            if build is not None:
                done = build(blobs)
                primary_cpu.update(cpu_s=time.thread_time() - began, root_bytes=len(done.raw))
                assert done.manifest.save_stats is not None
                # What SaveJob._commit shares: the summary; the manifest alone
                # keeps each process's bytes.
                shared = dict(done.manifest.save_stats)
                del shared["bytes_per_process"]
                return shared
            decoded = [_commit.Report.from_json(b) for b in blobs]
            per_process = [sum(r.files.values()) for r in decoded]
            primary_cpu.update(cpu_s=time.thread_time() - began)
            return _save.SaveStats.summarise(
                per_process,
                blocking_s=max(r.timing["stage_s"] for r in decoded),
                write_s=max(r.timing["write_s"] for r in decoded),
                commit_s=0.123456789,
                files=sum(len(r.files) for r in decoded),
            ).to_json()

        shared = coll.run(
            "prepare",
            _phased(client, "prepare", prepare),
            share=True,
            agree=_save._agreement,
            disagree=disagree,
        )
        assert shared["attempt"] == attempt
        coll.run("write", _phased(client, "write", write), collect_blobs=True)
        stats = coll.run("commit", _phased(client, "commit", commit), last=True, share=True)
        _save.SaveStats(**stats)  # the summary every process returns, whatever n

    out = _tally(n, run_processes(n, body, timeout_s))
    out["primary_commit"] = primary_cpu
    return out


def coordinate_restore(n: int, timeout_s: float) -> dict:
    """A restore's one phase on ``n`` simulated processes, as ``_restore.restore`` runs it."""
    where = "sim://checkpoint"
    identity = f"{_layout.new_attempt()}:{12345678:08x}"

    def body(pid: int, client: SimClient) -> None:
        coll = _multihost.Collective("restore", where, 600.0)
        coll.run(
            "restore",
            _phased(client, "restore", lambda: {"commit": identity, "where": where, "share": None}),
            last=True,
            agree=lambda opened: [opened["commit"], opened["share"]],
            disagree=lambda everyone: _commit.check_same_checkpoint(everyone, "restore"),
        )

    return _tally(n, run_processes(n, body, timeout_s))


def _tally(n: int, clients: list[SimClient]) -> dict:
    phases: dict[str, dict] = {}
    for pid, c in enumerate(clients):
        for (phase, method), k in c.calls.items():
            row = phases.setdefault(
                phase,
                {
                    "ops": 0,
                    "by_method": Counter(),
                    "sent_bytes": 0,
                    "received_bytes": 0,
                    "listed_entries": 0,
                    "primary_ops": 0,
                    "max_ops_other": 0,
                    "_per": Counter(),
                },
            )
            row["ops"] += k
            row["by_method"][method] += k
            row["_per"][pid] += k
    for phase, row in phases.items():
        row["sent_bytes"] = sum(c.sent[phase] for c in clients)
        row["received_bytes"] = sum(c.received[phase] for c in clients)
        row["listed_entries"] = sum(c.entries[phase] for c in clients)
        per = row.pop("_per")
        row["primary_ops"] = per[0]
        row["max_ops_other"] = max((v for p, v in per.items() if p), default=0)
        row["ops_per_process"] = row["ops"] / n
        row["by_method"] = dict(sorted(row["by_method"].items()))
    return {"processes": n, "phases": phases}


# --------------------------------------------------------------------------- the run


def run(
    cfg: Config,
    *,
    sample: int | None = None,
    coord: Sequence[int] | None = None,
    real_plans: str = "sample",
    log: Callable[[str], None] = print,
) -> dict:
    """The whole simulation; returns every number (JSON-able)."""
    sample = cfg.sample if sample is None else sample
    coord = cfg.coord if coord is None else coord
    began = time.perf_counter()
    sim = SaveSim(cfg)
    params = sum(
        math.prod(p.shape)
        for p, s in zip(sim.params, sim.specs, strict=True)
        if s.path[0] == ("key", "params")
    )
    log(
        f"[{time.perf_counter() - began:6.1f}s] state: {len(sim.specs)} leaves, "
        f"{params / 1e9:.2f} B params, {sim.state_bytes / 1e9:.1f} GB; "
        f"{len(sim.grid_of)} distinct grids"
    )

    # Save: every process's report (one real plan per group of alike processes).
    sim.derive_all()
    if real_plans == "all":
        sim.make_real(range(sim.processes))
    log(
        f"[{time.perf_counter() - began:6.1f}s] save planned: {sim.groups} group(s) of alike "
        "processes"
    )

    # Restore plans: what of whose indexes each restoring process reads (all of them,
    # by the grids and the index heads); the sampled ones' writers are planned and
    # encoded for real before the commit, so that the indexes they read carry real
    # checksums (and their heads are the decoded ones, checked against the derived).
    restores = [RestoreSim(sim, layout) for layout in cfg.restores]
    plans = []
    for rs in restores:
        predicted = rs.predicted(root_bytes=0)  # the root is added once it is built
        chosen = rs.sample(predicted, sample)
        writers = sorted(set().union(*(rs.writers(r) for r in chosen)))
        readable = len(writers) <= cfg.max_real_writers
        if readable:
            sim.make_real(writers)
        plans.append((rs, predicted, chosen, readable))
        log(
            f"[{time.perf_counter() - began:6.1f}s] {rs.layout.name}: sample {chosen}, "
            f"{len(writers)} writers' indexes {'encoded' if readable else 'too many: predicted only'}"
        )

    real = [sim.written[p] for p in range(sim.processes) if sim.written[p].real]
    index_sizes = [_index_nbytes(sim.written[p]) for p in range(sim.processes)]
    head_sizes = [sim.head(p).ref.head_bytes for p in range(sim.processes) if index_sizes[p]]
    sections = [sim.written[p].sections for p in range(sim.processes)]
    records = [sim.written[p].records for p in range(sim.processes)]
    data = [sum(sim.written[p].report.files.values()) for p in range(sim.processes)]

    # Commit.
    blobs = [r.to_json() for r in sim.reports()]
    done = commit(sim, blobs)
    root_bytes = len(done.raw)
    log(
        f"[{time.perf_counter() - began:6.1f}s] committed: root {root_bytes} B, "
        f"commit CPU {done.cpu['total']:.3f} s"
    )

    # Restore: every process reads the root; the sample reads indexes through ChunkTable.
    with _runtime.paused_gc():
        t0 = time.process_time()
        manifest = _commit.load(cast(Storage, _Where()), done.raw)
        load_cpu = time.process_time() - t0
    server = IndexServer(sim)
    restore_rows = []
    for rs, predicted, chosen, is_real in plans:
        for row in predicted:
            row["metadata_bytes"] = root_bytes + row["index_bytes"]
        measured = []
        if is_real:
            for r in chosen:
                m = rs.read(r, manifest, server)
                expect = predicted[r]
                compared = ("index_bytes", "head_bytes", "section_bytes", "reads")
                if any(m[k] != expect[k] for k in compared) or m["writers_read"] != sorted(
                    rs.writers(r)
                ):
                    raise AssertionError(
                        f"{rs.layout.name} process {r}: read {m}, predicted {expect}"
                    )
                m["metadata_bytes"] = root_bytes + m["index_bytes"]
                measured.append(m)
        worst = max(predicted, key=lambda row: row["metadata_bytes"])
        touched, needed = rs.cell_bytes(worst["process"])
        worst = {**worst, "shard_bytes_overlapped": touched, "data_bytes_needed": needed}
        restore_rows.append(
            {
                "layout": rs.layout.name,
                "describe": rs.layout.describe(),
                "real": is_real,
                "sample": chosen,
                "measured": measured,
                "predicted_max": worst,
                "predicted_min": min(predicted, key=lambda row: row["metadata_bytes"]),
                "predicted_mean_metadata_bytes": float(
                    np.mean([row["metadata_bytes"] for row in predicted])
                ),
                "writers_max": max(row["writers"] for row in predicted),
                "reads_max": max(row["reads"] for row in predicted),
            }
        )
        log(
            f"[{time.perf_counter() - began:6.1f}s] restored {rs.layout.name}: max metadata "
            f"{worst['metadata_bytes']} B"
        )

    # Coordination (at the save's own process count, the primary commits for real
    # inside the commit phase, from the blobs it read).
    coordination = []
    for n in coord:
        t0 = time.perf_counter()
        build = (lambda b: commit(sim, b)) if n == sim.processes else None
        saved = coordinate_save(
            n, [blobs[p % len(blobs)] for p in range(n)], timeout_s=600.0, build=build
        )
        restored = coordinate_restore(n, timeout_s=600.0)
        phases = {**saved["phases"], **restored["phases"]}
        coordination.append(
            {
                "processes": n,
                "phases": phases,
                "primary_commit": saved["primary_commit"],
                "wall_s": time.perf_counter() - t0,
            }
        )
        log(
            f"[{time.perf_counter() - began:6.1f}s] coordination at N={n}: "
            + ", ".join(f"{ph} {row['ops']}" for ph, row in phases.items())
        )

    # The commit target: the primary's whole commit-phase work where it was simulated.
    in_phase = [
        c["primary_commit"]["cpu_s"] for c in coordination if "root_bytes" in c["primary_commit"]
    ]
    commit_cpu = max([done.cpu["total"], *in_phase])
    cpu_real = {
        k: float(np.mean([w.cpu[k] for w in real if k in w.cpu]))
        for k in ("plan_writes", "encode_index", "check_own_writes")
    }
    return {
        "config": cfg.name,
        "model": vars(cfg.model),
        "stacked": cfg.stacked,
        "save": cfg.save.describe(),
        "processes": cfg.save.processes,
        "devices_per_process": cfg.save.devices_per_process,
        "leaves": len(sim.specs),
        "params": params,
        "state_bytes": sim.state_bytes,
        "grids": len(sim.grid_of),
        "owner_tables": len({g.owner_key() for g in sim.grid_of.values()}),
        "writing_processes": sum(1 for s in index_sizes if s),
        "groups": sim.groups,
        "real_plans": len(real),
        "records_per_process": {"min": min(records), "max": max(records), "p0": records[0]},
        "index_bytes_per_process": {
            "min": min(index_sizes),
            "max": max(index_sizes),
            "p0": index_sizes[0],
            "total": sum(index_sizes),
        },
        "index_head_bytes_per_process": {"min": min(head_sizes), "max": max(head_sizes)},
        "index_sections_per_process": {"min": min(sections), "max": max(sections)},
        "data_bytes_per_process": {"min": min(data), "max": max(data)},
        "files": sum(len(sim.written[p].report.files) for p in range(sim.processes)),
        "planning_cpu_s_per_real_process": cpu_real,
        "plan_digest_cpu_s": sim.digest_cpu,
        "grids_cpu_s": sim.grid_cpu,
        "root_bytes": root_bytes,
        "root_sections": root_sections(done.raw),
        "commit_cpu_s": done.cpu,
        "root_load_cpu_s": load_cpu,
        "restore": restore_rows,
        "coordination": coordination,
        "targets": evaluate(root_bytes, commit_cpu, restore_rows, coordination),
        "wall_s": time.perf_counter() - began,
    }


def evaluate(
    root: int, commit_cpu: float, restores: list[dict], coordination: list[dict]
) -> list[dict]:
    """Each target: the value, the limit, and whether it is met.

    Coordination: per phase, at the largest process count simulated (the
    counts are exactly linear in N, see the table), against 4N.
    """
    out: list[dict[str, Any]] = [
        {"target": "root record", "value": root, "limit": TARGETS["root_bytes"], "unit": "B"},
        {
            "target": "primary commit CPU",
            "value": commit_cpu,
            "limit": TARGETS["commit_cpu_s"],
            "unit": "s",
        },
    ]
    for row in restores:
        out.append(
            {
                "target": f"metadata read per restoring process, {row['layout']}",
                "value": row["predicted_max"]["metadata_bytes"],
                "limit": TARGETS["metadata_bytes"],
                "unit": "B",
                "measured": bool(row["measured"]),
            }
        )
    if coordination:
        c = max(coordination, key=lambda c: c["processes"])
        n = c["processes"]
        for phase, p in c["phases"].items():
            out.append(
                {
                    "target": f"coordination operations, phase {phase}, N={n}",
                    "value": p["ops"],
                    "limit": TARGETS["ops_per_process"] * n,
                    "unit": "ops",
                }
            )
    for t in out:
        t["met"] = t["value"] <= t["limit"]
    return out


# --------------------------------------------------------------------------- output


def _mb(n: float) -> str:
    return f"{n / MB:.2f} MB"


def _value(t: dict, key: str) -> str:
    if t["unit"] == "B":
        return _mb(t[key])
    if t["unit"] == "s":
        return f"{t[key]:.3f} s"
    return f"{t[key]:g}"


def report_lines(res: dict) -> list[str]:
    rec, idx = res["records_per_process"], res["index_bytes_per_process"]
    head, sec = res["index_head_bytes_per_process"], res["index_sections_per_process"]
    out = [
        f"distckpt scale simulation ({res['config']}): save on {res['save']}",
        f"state: {res['leaves']} leaves, {res['params'] / 1e9:.2f} B params, "
        f"{res['state_bytes'] / 1e9:.1f} GB (bf16 params, fp32 Adam mu and nu"
        + ("; layers stacked)" if res["stacked"] else ")"),
        f"grids: {res['grids']} distinct, {res['owner_tables']} owner tables; writers fall into "
        f"{res['groups']} group(s) of alike ones; {res['real_plans']} planned and encoded for real",
        f"per writing process: {rec['min']}-{rec['max']} chunk records (p0 {rec['p0']}), "
        f"index {idx['min']}-{idx['max']} B (all {res['writing_processes']}: "
        f"{_mb(idx['total'])}; head {head['min']}-{head['max']} B, {sec['min']}-{sec['max']} "
        f"sections), data up to {_mb(res['data_bytes_per_process']['max'])}; "
        f"{res['files']} data files",
        "planning CPU per writing process (mean of real ones): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in res["planning_cpu_s_per_real_process"].items())
        + f"; plan_digest {res['plan_digest_cpu_s']:.3f} s",
        "",
        f"root record: {res['root_bytes']} B; by member: "
        + ", ".join(
            f"{k} {v / 1024:.0f} KiB"
            for k, v in sorted(res["root_sections"].items(), key=lambda kv: -kv[1])
            if v >= 1024
        ),
        "primary commit CPU (standalone): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in res["commit_cpu_s"].items()),
    ]
    full = [c for c in res["coordination"] if "root_bytes" in c["primary_commit"]]
    if full:
        out.append(
            f"primary commit CPU inside the commit phase at N={full[0]['processes']} (blobs "
            f"read, decoded, root built and serialised): {full[0]['primary_commit']['cpu_s']:.3f} s"
        )
    out += [
        f"a restoring process's check and parse of the root (_commit.load): "
        f"{res['root_load_cpu_s']:.3f} s CPU",
        "",
        f"{'restore layout':<15} {'how':<9} {'writers':>7} {'metadata max':>12} "
        f"{'heads':>9} {'sections':>9} {'needed':>9} {'reads':>5} {'read/needed':>11} "
        f"{'lookup CPU':>10}",
    ]
    for row in res["restore"]:
        m, worst = row["measured"], row["predicted_max"]
        if m:
            needed = _mb(max(x["index_bytes_of_found_records"] for x in m))
            amp = max(x["chunk_bytes_to_read"] / x["data_bytes_needed"] for x in m)
            ratio = f"{amp:.2f}x"
            cpu = f"{max(x['prefetch_cpu_s'] + x['lookup_cpu_s'] for x in m):.2f} s"
        else:
            needed, cpu = "-", "-"
            ratio = f"<={worst['shard_bytes_overlapped'] / worst['data_bytes_needed']:.0f}x"
        out.append(
            f"{row['layout']:<15} {('measured' if m else 'predicted'):<9} "
            f"{row['writers_max']:>7} {_mb(worst['metadata_bytes']):>12} "
            f"{_mb(worst['head_bytes']):>9} {_mb(worst['section_bytes']):>9} {needed:>9} "
            f"{row['reads_max']:>5} {ratio:>11} {cpu:>10}"
        )
    out.append(
        "  metadata = root + index heads + index sections, of the restoring process that "
        "reads the most (by the grids and heads); 'measured': the sample read them through "
        "ChunkTable.prefetch, as predicted; needed: bytes of the records found; reads: index "
        "reads per process, at most; read/needed: chunk bytes to read over data bytes needed "
        "('<=': shard bytes overlapped, a bound)"
    )
    out.append("")
    phases = list(res["coordination"][0]["phases"]) if res["coordination"] else []
    out.append(f"{'coordination ops':<17}" + "".join(f"{p:>16}" for p in phases))
    for c in res["coordination"]:
        cells = [
            f"{c['phases'][p]['ops']} ({c['phases'][p]['ops_per_process']:.2f}N)" for p in phases
        ]
        out.append(f"{'N=' + str(c['processes']):<17}" + "".join(f"{x:>16}" for x in cells))
    if res["coordination"]:
        last = res["coordination"][-1]
        out.append(f"  by call at N={last['processes']}:")
        for p in phases:
            row = last["phases"][p]
            calls = ", ".join(
                f"{k.replace('key_value_', 'kv_')} {v}" for k, v in row["by_method"].items()
            )
            out.append(
                f"    {p}: {calls}; primary {row['primary_ops']}, others <= "
                f"{row['max_ops_other']}; {row['listed_entries']} entries listed, "
                f"{_mb(row['sent_bytes'])} sent, {_mb(row['received_bytes'])} received"
            )
    out.append("")
    out.append("targets:")
    for t in res["targets"]:
        flag = "met   " if t["met"] else "MISSED"
        how = "" if t.get("measured", True) else " (predicted)"
        out.append(f"  {flag} {t['target']}: {_value(t, 'value')} <= {_value(t, 'limit')}{how}")
    out.append(f"simulation wall time {res['wall_s']:.1f} s")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="16 processes, a 2-layer model")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="70b", help="the full run's model shape"
    )
    parser.add_argument(
        "--stacked", action="store_true", help="one leaf per weight for all layers (scan)"
    )
    parser.add_argument("--sample", type=int, help="restoring processes read for real, per layout")
    parser.add_argument("--coord", help="comma-separated process counts of the coordination runs")
    parser.add_argument(
        "--real-plans",
        choices=("sample", "all"),
        default="sample",
        help="plan and encode every writer for real (slow at full scale), or only "
        "one per group and those the restore sample reads",
    )
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = parse_args(argv)
    cfg = SMALL if args.small else dataclasses.replace(FULL, model=MODELS[args.model])
    cfg = dataclasses.replace(
        cfg,
        name=cfg.name + ("" if args.small else f" {args.model}") + (" stacked" * args.stacked),
        stacked=args.stacked,
    )
    coord = [int(x) for x in args.coord.split(",")] if args.coord else None
    log: Callable[[str], None] = (
        (lambda _: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    )
    res = run(cfg, sample=args.sample, coord=coord, real_plans=args.real_plans, log=log)
    print("\n".join(report_lines(res)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
