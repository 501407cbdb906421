#!/usr/bin/env python3
"""Benchmark distckpt against Orbax on the same state, in the same run.

    python scripts/bench.py                  # 1 GiB state, 3 repetitions (a few minutes)
    python scripts/bench.py --quick          # small sizes, one to two minutes
    python scripts/bench.py --size 4 --reps 5 --json out.json --plot out.png
    python scripts/bench.py --cases async    # only the async-save case
    python scripts/bench.py --cases memory --systems distckpt   # 4 GiB under a 512 MiB budget

What it measures (docs/benchmarks.md explains every number and its caveats):

* large case: 64 float32 arrays totalling ``--size`` GiB, saved from 2 processes x 4
  CPU devices (mesh (2, 4), PartitionSpec('x', 'y')), then restored onto the same
  sharding, onto 1 process x 8 devices (mesh (8,), PartitionSpec(None, 'x')), and onto
  4 processes x 2 devices (mesh (4, 2), PartitionSpec('x', 'y'));
* small case: 2,000 leaves of 1 KiB (256 float32), fully replicated over the 8
  devices of 1 process: save and restore;
* async case: the large state saved from 2x4 through each system's checkpoint manager
  with async saving on: how long ``save`` blocks the training loop, and how long the
  ``wait_until_finished`` after it takes; its floor is a plain host copy of the bytes
  each process owns;
* memory case (``--cases memory``, not in the default set): 1 process x 2 CPU devices
  owning ``--memory-size`` GiB (4 leaves, rows sharded) with ``DISTCKPT_MEMORY_BYTES`` =
  ``--memory-budget`` MiB: a save, a save whose fetches copy as from an accelerator's
  memory, and a restore onto columns; the target is extra peak RSS within the budget;
* formats case (``--cases formats``, not in the default set; scripts/_bench_formats.py):
  2 processes x 4 devices restore a ``--size`` GiB Orbax checkpoint (distckpt against
  Orbax) and a Hugging Face sharded safetensors directory (distckpt against
  ``safetensors.numpy.load_file`` + ``jax.device_put``), both written by their own
  libraries in the same run;
* physical floors for the large case on the same filesystem: fsync'd sequential
  write and sequential read of the same number of bytes, by the same number of
  processes;
* per operation: seconds (max over processes), read amplification from
  /proc/self/io rchar, peak RSS per process, files per checkpoint.

Multi-process cases are real local processes (``scripts/_bench_worker.py``) joined
by ``jax.distributed``. Each group of processes runs every repetition of its cases,
alternating which system goes first, and the table reports medians over repetitions.
A system that fails shows up as an error row; the bench itself keeps going.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_bench_worker.py"

SYSTEMS = ("distckpt", "orbax")
FLOOR = "floor"
GiB = 1 << 30
MiB = 1 << 20


# ----------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------


@dataclass
class Topology:
    """How many processes, devices each, and how arrays are laid out on them."""

    name: str  # e.g. "2x4" = 2 processes x 4 devices
    processes: int
    devices: int  # per process
    mesh_shape: tuple[int, ...]
    axes: tuple[str, ...]
    spec: tuple  # PartitionSpec entries; None = not sharded along that dimension


SAVE_2x4 = Topology("2x4", 2, 4, (2, 4), ("x", "y"), ("x", "y"))
COLS_1x8 = Topology("1x8", 1, 8, (8,), ("x",), (None, "x"))  # column stripes, not blocks
ROWS_1x8 = Topology("1x8", 1, 8, (8,), ("x",), ("x", None))  # the single-host case
BLOCKS_4x2 = Topology("4x2", 4, 2, (4, 2), ("x", "y"), ("x", "y"))
REPLICATED_1x8 = Topology("1x8", 1, 8, (8,), ("x",), ())  # every device holds every leaf
ROWS_1x2 = Topology("1x2", 1, 2, (2,), ("x",), ("x", None))  # the memory case
COLS_1x2 = Topology("1x2", 1, 2, (2,), ("x",), (None, "x"))


@dataclass
class Row:
    """One line of the results table (one measured operation, several systems)."""

    key: str
    title: str
    kind: str  # "save", "restore" or "async"
    bytes: int  # logical bytes of the state
    has_floor: bool
    systems: tuple[str, ...] = ()  # the systems that have this operation (empty: all)


@dataclass
class Group:
    """One launch of N worker processes running the rows that share a topology."""

    name: str
    topology: Topology
    rows: list[Row]
    build_ops: Callable[[set], list[dict]]  # enabled (system, row) pairs -> operations
    extra_timeout_s: float = 0.0  # on top of --timeout, for groups known to be slow


def layout(topo: Topology, n_leaves: int, shape: tuple[int, ...], seed: int) -> dict:
    return {
        "n_leaves": n_leaves,
        "shape": list(shape),
        "dtype": "float32",
        "mesh_shape": list(topo.mesh_shape),
        "axes": list(topo.axes),
        "spec": list(topo.spec),
        "seed": seed,
    }


def large_shape(total_bytes: int, n_leaves: int) -> tuple[int, int]:
    """Square float32 leaves whose side is a multiple of 8, so every mesh here divides it."""
    side = int(math.sqrt(total_bytes / n_leaves / 4)) // 8 * 8
    return (max(side, 8), max(side, 8))


@functools.cache
def _worker_module():
    """scripts/_bench_worker.py, loaded by file path (this script is loaded that way too,
    so it may not be importable by name); it imports only numpy at the top, not JAX."""
    spec = importlib.util.spec_from_file_location("_bench_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_state_size(train: dict) -> tuple[int, int]:
    """(leaves, bytes) of the train state: float32 params, adamw's mu and nu of the same
    shapes, and its int32 step count."""

    def shapes(tree) -> list[tuple]:
        if isinstance(tree, tuple):
            return [tree]
        return [s for sub in tree.values() for s in shapes(sub)]

    params = shapes(_worker_module().train_params_shapes(train))
    return 3 * len(params) + 1, 3 * sum(math.prod(s) for s in params) * 4 + 4


def rep_order(rep: int, systems: list[str], floor: bool) -> list[str]:
    """The order in which repetition ``rep`` runs the systems (and the floor).

    Which system goes first alternates every repetition, so neither always inherits the
    other's cache and memory state; the floor's position cycles through first, middle
    and last every two repetitions, so it is not always measured in the same spot."""
    pair = list(systems) if rep % 2 == 0 else list(reversed(systems))
    if not floor:
        return pair
    position = (rep // 2) % (len(pair) + 1)
    return pair[:position] + [FLOOR] + pair[position:]


def _op(kind: str, system: str, row: str, rep: int, **fields) -> dict:
    return {"op": kind, "system": system, "row": row, "rep": rep, **fields}


class Plan:
    """Builds the groups (process launches) and their operation lists."""

    def __init__(self, args, root: Path, memory_root: Path | None = None):
        self.args = args
        self.root = root
        # Host memory (tmpfs) for the local tier's directories, as docs/local_tier.md
        # advises (/dev/shm); None: they go under ``root`` with everything else.
        self.memory_root = memory_root
        self.reps = args.reps
        self.warmup = args.warmup
        # Warm-up repetitions run first and are left out of the medians: a process's first
        # save pays for lazy imports, thread pools and tracing that later saves do not.
        self.total_reps = args.warmup + args.reps
        self.systems = [s for s in SYSTEMS if s in args.systems]
        total = int(args.size * GiB)
        self.large_leaves = 64
        self.large_shape = large_shape(total, self.large_leaves)
        self.large_bytes = self.large_leaves * math.prod(self.large_shape) * 4
        self.small_sizes = args.small_leaves or ([200, 2000] if args.quick else [2000, 20000])
        self.small_shape = (256,)
        # A transformer-shaped train state with optax adamw moments; d_model 512 gives
        # 301 leaves from 2 KiB to 16 MiB, 312 MiB in all (--quick: d_model 256, 78 MiB).
        self.train = {
            "kind": "train",
            "d_model": 256 if args.quick else 512,
            "vocab": 4096 if args.quick else 8192,
            "layers": 6,
        }
        self.train_leaves, self.train_bytes = train_state_size(self.train)
        # The S3 case: a quarter of the large case (moto keeps every object in memory).
        self.s3_shape = large_shape(max(total // 4, 16 * MiB), self.large_leaves)
        self.s3_bytes = self.large_leaves * math.prod(self.s3_shape) * 4
        self.s3_root = ""  # s3://<bucket>, set once the server is up
        # The memory case: 4 square float32 leaves owned by one process.
        self.memory_leaves = 4
        self.memory_shape = large_shape(int(args.memory_size * GiB), self.memory_leaves)
        self.memory_bytes = self.memory_leaves * math.prod(self.memory_shape) * 4
        self.memory_budget = int(args.memory_budget * MiB)
        self.floor_files = [
            [str(root / "floor" / f"part{i}.bin"), self.large_bytes // SAVE_2x4.processes]
            for i in range(SAVE_2x4.processes)
        ]
        self.floor_files[-1][1] += self.large_bytes % SAVE_2x4.processes
        # One process writes everything in the single-host case: its floor is one file.
        self.floor_file_1 = [[str(root / "floor" / "single.bin"), self.large_bytes]]

    def ckpt(self, case: str, system: str, rep: int) -> str:
        return str(self.root / case / system / f"rep{rep}")

    def small_reps(self, system: str, leaves: int) -> tuple[int, int]:
        """(warm-up, measured) repetitions of ``system`` in the small case of ``leaves``.

        Orbax takes minutes per call at 20,000 leaves, so above SLOW_LEAVES it gets
        ``--slow-reps`` measured repetitions and no warm-up of its own (its process is
        already warm from the smaller leaf counts, which run first in the same group)."""
        if system == "orbax" and leaves > SLOW_LEAVES:
            return 0, min(self.reps, self.args.slow_reps)
        return self.warmup, self.reps

    def groups(self) -> list[Group]:
        gib = self.large_bytes / GiB
        rows = {
            "save": Row("save", f"save 2x4 ({gib:.2f} GiB)", "save", self.large_bytes, True),
            "r2x4": Row("r2x4", "restore 2x4 -> 2x4", "restore", self.large_bytes, True),
            "r1x8": Row("r1x8", "restore 2x4 -> 1x8 (cols)", "restore", self.large_bytes, True),
            "r4x2": Row("r4x2", "restore 2x4 -> 4x2", "restore", self.large_bytes, True),
            "tsave": Row(
                "tsave",
                f"train state: save ({self.train_leaves} leaves, {self.train_bytes / MiB:.0f} MiB)",
                "save",
                self.train_bytes,
                False,
            ),
            "trestore": Row(
                "trestore", "train state: restore 2x4 -> 2x4", "restore", self.train_bytes, False
            ),
            "ablocked": Row("ablocked", "async save 2x4: blocked", "async", self.large_bytes, True),
            "afirst": Row(
                "afirst", "async save 2x4: blocked, first save", "async", self.large_bytes, False
            ),
            "s1save": Row("s1save", f"save 1x8 ({gib:.2f} GiB)", "save", self.large_bytes, True),
            "s1r1x8": Row("s1r1x8", "restore 1x8 -> 1x8", "restore", self.large_bytes, True),
            "s1rcols": Row(
                "s1rcols", "restore 1x8 -> 1x8 (cols)", "restore", self.large_bytes, True
            ),
            "a1blocked": Row(
                "a1blocked", "async save 1x8: blocked", "async", self.large_bytes, True
            ),
            "a1first": Row(
                "a1first", "async save 1x8: blocked, first save", "async", self.large_bytes, False
            ),
            "a1background": Row(
                "a1background", "async save 1x8: background", "async", self.large_bytes, False
            ),
            "abackground": Row(
                "abackground", "async save 2x4: background", "async", self.large_bytes, False
            ),
        }
        out = []
        if "large" in self.args.cases:
            out.append(
                Group("large-2x4", SAVE_2x4, [rows["save"], rows["r2x4"]], self._large_save_ops)
            )
            out.append(
                Group(
                    "large-1x8",
                    COLS_1x8,
                    [rows["r1x8"]],
                    lambda en: self._large_restore_ops(en, COLS_1x8, "r1x8"),
                )
            )
            out.append(
                Group(
                    "large-4x2",
                    BLOCKS_4x2,
                    [rows["r4x2"]],
                    lambda en: self._large_restore_ops(en, BLOCKS_4x2, "r4x2"),
                )
            )
        if "single" in self.args.cases:
            # One process with eight devices: most multi-host jobs run one such process
            # per host, so this is the common case (save, restores, async blocking).
            out.append(
                Group(
                    "single-1x8",
                    ROWS_1x8,
                    [
                        rows[k]
                        for k in ("s1save", "s1r1x8", "s1rcols", "a1blocked", "a1first")
                        + ("a1background",)
                    ],
                    self._single_ops,
                )
            )
        if "local" in self.args.cases:
            for topo in (SAVE_2x4, BLOCKS_4x2):
                out.append(
                    Group(
                        f"local-{topo.name}",
                        topo,
                        self._local_rows(topo),
                        functools.partial(self._local_ops, topo=topo),
                    )
                )
        if "small" in self.args.cases:
            small_rows = []
            for n in self.small_sizes:
                nbytes = n * 256 * 4
                small_rows.append(
                    Row(f"ssave{n}", f"small: save {n} x 1 KiB", "save", nbytes, False)
                )
                small_rows.append(
                    Row(f"srestore{n}", f"small: restore {n} x 1 KiB", "restore", nbytes, False)
                )
            # Orbax handles about 200-500 leaves a second here: give the group time.
            leaf_calls = sum(n * 2 * sum(self.small_reps("orbax", n)) for n in self.small_sizes)
            out.append(
                Group(
                    "small-1x8",
                    REPLICATED_1x8,
                    small_rows,
                    self._small_ops,
                    extra_timeout_s=0.05 * leaf_calls,
                )
            )
        if "train" in self.args.cases:
            out.append(
                Group("train-2x4", SAVE_2x4, [rows["tsave"], rows["trestore"]], self._train_ops)
            )
        if "s3" in self.args.cases:
            gib = self.s3_bytes / GiB
            out.append(
                Group(
                    "s3-2x4",
                    SAVE_2x4,
                    [
                        Row(
                            "s3save",
                            f"S3 (moto): save 2x4 ({gib:.2f} GiB)",
                            "save",
                            self.s3_bytes,
                            False,
                        ),
                        Row(
                            "s3restore",
                            "S3 (moto): restore 2x4 -> 2x4",
                            "restore",
                            self.s3_bytes,
                            False,
                        ),
                    ],
                    self._s3_ops,
                )
            )
        if "memory" in self.args.cases:
            gib, budget = self.memory_bytes / GiB, self.memory_budget / MiB
            out.append(
                Group(
                    "memory-1x2",
                    ROWS_1x2,
                    [
                        Row(
                            "msave",
                            f"memory: save {gib:.2f} GiB, 1 process, budget {budget:.0f} MiB",
                            "save",
                            self.memory_bytes,
                            False,
                        ),
                        Row(
                            "mcopy",
                            "memory: save, fetches copied (as from an accelerator)",
                            "save",
                            self.memory_bytes,
                            False,
                        ),
                        Row(
                            "mrestore",
                            "memory: restore rows -> columns",
                            "restore",
                            self.memory_bytes,
                            False,
                        ),
                    ],
                    self._memory_ops,
                    extra_timeout_s=240 * self.args.memory_size * self.total_reps * 2,
                )
            )
        if "async" in self.args.cases:
            # Its own launch, so neither manager shares a process with the large case's
            # checkpoints and memory; the warm-up repetition absorbs the managers' start-up.
            out.append(
                Group(
                    "async-2x4",
                    SAVE_2x4,
                    [rows["ablocked"], rows["afirst"], rows["abackground"]],
                    self._async_ops,
                )
            )
        return out

    # Each builder gets the (system, row) pairs still enabled: a system that failed an
    # operation is dropped from that row (and from restores if its save failed: disable()
    # drops those too, so a restore row still enabled always has its save).

    def _large_save_ops(self, enabled: set) -> list[dict]:
        lay = layout(SAVE_2x4, self.large_leaves, self.large_shape, seed=1)
        ops = []
        for rep in range(self.total_reps):
            order = rep_order(rep, self.systems, floor=True)
            ops += self._saves(enabled, rep, order, "save", "large", lay, self.floor_files)
            for s in order:
                if s == FLOOR:
                    ops.append(self._floor_read("r2x4", rep))
                elif (s, "r2x4") in enabled:
                    ops.append(self._restore(s, "r2x4", rep, lay, self.ckpt("large", s, rep)))
            # Keep only the last repetition's checkpoints: the other topologies restore them.
            if rep < self.total_reps - 1:
                ops.append(
                    {"op": "delete", "paths": [self.ckpt("large", s, rep) for s in self.systems]}
                )
        return ops

    def _large_restore_ops(self, enabled: set, topo: Topology, row: str) -> list[dict]:
        lay = layout(topo, self.large_leaves, self.large_shape, seed=1)
        ops = []
        for rep in range(self.total_reps):
            for s in rep_order(rep, self.systems, floor=True):
                if s == FLOOR:
                    ops.append(self._floor_read(row, rep))
                elif (s, row) in enabled:
                    path = self.ckpt("large", s, self.total_reps - 1)
                    ops.append(self._restore(s, row, rep, lay, path))
        return ops

    def _small_ops(self, enabled: set) -> list[dict]:
        ops = []
        for n in self.small_sizes:
            lay = layout(REPLICATED_1x8, n, self.small_shape, seed=2)
            save, restore = f"ssave{n}", f"srestore{n}"
            case = f"small{n}"
            for rep in range(self.total_reps):
                # A system with fewer repetitions runs the last ones (counted as measured
                # when rep >= the warm-up of the others: see rep_record).
                order = [
                    s
                    for s in rep_order(rep, self.systems, floor=False)
                    if rep >= self.total_reps - sum(self.small_reps(s, n))
                ]
                for s in order:
                    if (s, save) in enabled:
                        path = self.ckpt(case, s, rep)
                        ops.append(_op("save", s, save, rep, layout=lay, path=path))
                for s in order:
                    if (s, restore) in enabled:
                        ops.append(self._restore(s, restore, rep, lay, self.ckpt(case, s, rep)))
                ops.append(
                    {"op": "delete", "paths": [self.ckpt(case, s, rep) for s in self.systems]}
                )
        return ops

    def _train_ops(self, enabled: set) -> list[dict]:
        lay = {**self.train, **layout(SAVE_2x4, 0, (), seed=3)}
        ops = []
        for rep in range(self.total_reps):
            order = rep_order(rep, self.systems, floor=False)
            for s in order:
                if (s, "tsave") in enabled:
                    path = self.ckpt("train", s, rep)
                    ops.append(_op("save", s, "tsave", rep, layout=lay, path=path))
            for s in order:
                if (s, "trestore") in enabled:
                    ops.append(self._restore(s, "trestore", rep, lay, self.ckpt("train", s, rep)))
            ops.append(
                {"op": "delete", "paths": [self.ckpt("train", s, rep) for s in self.systems]}
            )
        return ops

    def _s3_ops(self, enabled: set) -> list[dict]:
        lay = layout(SAVE_2x4, self.large_leaves, self.s3_shape, seed=4)
        ops = []
        for rep in range(self.total_reps):
            if ("distckpt", "s3save") not in enabled:
                break
            path = f"{self.s3_root}/s3/distckpt/rep{rep}"
            ops.append(_op("save", "distckpt", "s3save", rep, layout=lay, path=path))
            if ("distckpt", "s3restore") in enabled:
                ops.append(self._restore("distckpt", "s3restore", rep, lay, path))
            ops.append({"op": "delete", "paths": [path]})
        return ops

    def _memory_ops(self, enabled: set) -> list[dict]:
        lay = layout(ROWS_1x2, self.memory_leaves, self.memory_shape, seed=5)
        cols = layout(COLS_1x2, self.memory_leaves, self.memory_shape, seed=5)
        budget = {"memory_bytes": self.memory_budget}
        ops = []
        for rep in range(self.total_reps):
            if ("distckpt", "msave") not in enabled:
                break
            path = self.ckpt("memory", "distckpt", rep)
            ops.append(_op("save", "distckpt", "msave", rep, layout=lay, path=path, **budget))
            if ("distckpt", "mcopy") in enabled:
                copied = path + "-copied"
                ops.append(
                    _op(
                        "save",
                        "distckpt",
                        "mcopy",
                        rep,
                        layout=lay,
                        path=copied,
                        simulate_device=True,
                        **budget,
                    )
                )
                ops.append({"op": "delete", "paths": [copied]})
            if ("distckpt", "mrestore") in enabled:
                ops.append({**self._restore("distckpt", "mrestore", rep, cols, path), **budget})
            ops.append({"op": "delete", "paths": [path]})
        return ops

    def _local_rows(self, topo: Topology) -> list[Row]:
        t, n = topo.name, self.large_bytes
        only = ("distckpt",)  # the local tier is distckpt's; Orbax's is not public
        return [
            Row(f"lsave{t}", f"local tier {t}: local save, blocked", "async", n, False, only),
            Row(f"lsavebg{t}", f"local tier {t}: local save, background", "async", n, False, only),
            Row(f"psave{t}", f"local tier {t}: persistent save, blocked", "async", n, False, only),
            Row(
                f"psavebg{t}",
                f"local tier {t}: persistent save, background",
                "async",
                n,
                False,
                only,
            ),
            Row(
                f"lpeer{t}",
                f"local tier {t}: recovery, process 1's directory wiped",
                "restore",
                n,
                False,
                only,
            ),
            Row(
                f"ppersist{t}",
                f"local tier {t}: restore from the persistent tier",
                "restore",
                n,
                False,
                only,
            ),
        ]

    def _local_ops(self, enabled: set, topo: Topology) -> list[dict]:
        """Local saves against persistent async saves of the same state, then recovery of
        a job whose process 1 lost its local directory against a persistent restore."""
        ops = []
        t = topo.name
        lay = layout(topo, self.large_leaves, self.large_shape, seed=1)
        local = {
            "path": str(self.root / f"local-{t}" / "shared"),
            "local_root": str((self.memory_root or self.root) / f"local-{t}" / "local"),
        }
        persistent = str(self.root / f"local-{t}" / "persistent")
        for rep in range(self.total_reps):
            step = rep + 1
            verify = rep == 0 and not self.args.no_verify
            if ("distckpt", f"lsave{t}") in enabled:
                ops.append(
                    _op(
                        "local_save",
                        "distckpt",
                        f"lsave{t}",
                        rep,
                        layout=lay,
                        step=step,
                        background_row=f"lsavebg{t}",
                        **local,
                    )
                )
            if ("distckpt", f"psave{t}") in enabled:
                ops.append(
                    _op(
                        "async_save",
                        "distckpt",
                        f"psave{t}",
                        rep,
                        layout=lay,
                        path=persistent,
                        step=step,
                        background_row=f"psavebg{t}",
                    )
                )
            if ("distckpt", f"lpeer{t}") in enabled:
                ops.append(
                    _op(
                        "local_recover",
                        "distckpt",
                        f"lpeer{t}",
                        rep,
                        layout=lay,
                        step=step,
                        wipe=1,
                        verify=verify,
                        **local,
                    )
                )
            if ("distckpt", f"ppersist{t}") in enabled:
                ops.append(
                    self._restore(
                        "distckpt", f"ppersist{t}", rep, lay, f"{persistent}/step_{step:08d}"
                    )
                )
        return ops

    def _single_ops(self, enabled: set) -> list[dict]:
        lay = layout(ROWS_1x8, self.large_leaves, self.large_shape, seed=1)
        cols = layout(COLS_1x8, self.large_leaves, self.large_shape, seed=1)
        ops = []
        for rep in range(self.total_reps):
            order = rep_order(rep, self.systems, floor=True)
            ops += self._saves(enabled, rep, order, "s1save", "single", lay, self.floor_file_1)
            for row, target in (("s1r1x8", lay), ("s1rcols", cols)):
                for s in order:
                    if s == FLOOR:
                        ops.append(self._floor_read(row, rep, self.floor_file_1))
                    elif (s, row) in enabled:
                        ops.append(self._restore(s, row, rep, target, self.ckpt("single", s, rep)))
            ops.append(
                {"op": "delete", "paths": [self.ckpt("single", s, rep) for s in self.systems]}
            )
        ops += self._async_ops(enabled, lay, ("a1blocked", "a1first", "a1background"), "async1")
        return ops

    def _async_ops(
        self,
        enabled: set,
        lay: dict | None = None,
        rows: tuple[str, str, str] = ("ablocked", "afirst", "abackground"),
        case: str = "async",
    ) -> list[dict]:
        lay = lay or layout(SAVE_2x4, self.large_leaves, self.large_shape, seed=1)
        blocked, first, background = rows
        ops = []
        for rep in range(self.total_reps):
            for s in rep_order(rep, self.systems, floor=False):
                if (s, first) in enabled:
                    # A new manager's first save, as after a job restart: its buffers
                    # are new, and distckpt's runtime question (asked when the manager
                    # is created) is asked again.
                    ops.append(
                        _op(
                            "async_save",
                            s,
                            first,
                            rep,
                            layout=lay,
                            path=str(self.root / f"{case}-first" / s / f"rep{rep}"),
                            step=1,
                            fresh=True,
                        )
                    )
            for s in rep_order(rep, self.systems, floor=True):
                if s == FLOOR:
                    ops.append(_op("host_copy", FLOOR, blocked, rep, layout=lay))
                elif (s, blocked) in enabled:
                    # One manager directory per system for the whole group, a new step
                    # each repetition (as in training); max_to_keep=2 bounds the disk used.
                    ops.append(
                        _op(
                            "async_save",
                            s,
                            blocked,
                            rep,
                            layout=lay,
                            path=str(self.root / case / s),
                            step=rep + 1,
                            background_row=background,
                        )
                    )
        return ops

    def _restore(self, system: str, row: str, rep: int, lay: dict, path: str) -> dict:
        # Checking costs a full regeneration of the state, so only on the first repetition.
        verify = rep == 0 and not self.args.no_verify
        return _op(
            "restore", system, row, rep, layout=lay, path=path, verify=verify, evict=self.args.cold
        )

    def _floor_read(self, row: str, rep: int, files: list | None = None) -> dict:
        files = files or self.floor_files
        return _op("floor_read", FLOOR, row, rep, files=files, evict=self.args.cold)

    def _saves(
        self, enabled: set, rep: int, order: list[str], row: str, case: str, lay: dict, files: list
    ) -> list[dict]:
        """One repetition of a save row: each system in ``order``, and the write floor."""
        ops = []
        for s in order:
            if s == FLOOR:
                ops.append(_op("floor_write", FLOOR, row, rep, files=files))
            elif (s, row) in enabled:
                ops.append(_op("save", s, row, rep, layout=lay, path=self.ckpt(case, s, rep)))
        return ops


# ----------------------------------------------------------------------------
# Launching worker groups
# ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot_distckpt(root: Path) -> Path:
    """Copies distckpt/ from the checkout into ``root`` and returns the directory to put on
    the workers' PYTHONPATH: edits landing in the checkout during a long run then cannot
    give different groups different code."""
    dest = root / "distckpt-snapshot"
    shutil.copytree(
        REPO / "distckpt", dest / "distckpt", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


def worker_env(devices: int, import_root: Path) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    # PYTHONPATH comes before the editable install's finder, so this copy is what imports.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(import_root), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


@dataclass
class Launch:
    events: list[dict] = field(default_factory=list)
    failure: str = ""  # empty if every process finished cleanly
    culprit: tuple | None = None  # (system, row) blamed for a failure, if any
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return not self.failure


def read_events(run_dir: Path) -> list[dict]:
    events = []
    for path in sorted(run_dir.glob("events_*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a killed writer may leave half a line
                events.append(json.loads(line))
    return events


def blame(events: list[dict]) -> tuple | None:
    """The (system, row) of the operation that failed, or that was running at a timeout."""
    for e in events:
        if e.get("event") == "error" and e.get("system") in SYSTEMS:
            return (e["system"], e["row"])
    last = {}
    for e in events:
        if e.get("event") in ("start", "result"):
            last[e["process"]] = e
    running = [e for e in last.values() if e["event"] == "start" and e.get("system") in SYSTEMS]
    if running:
        return (running[0]["system"], running[0]["row"])
    return None


def launch(
    group_name: str, topo: Topology, ops: list[dict], args, run_dir: Path, timeout_s: float
) -> Launch:
    """Starts the group's processes and waits; kills every one of them on any failure."""
    run_dir.mkdir(parents=True)
    plan = {
        "group": group_name,
        "num_processes": topo.processes,
        "total_devices": topo.processes * topo.devices,
        # Under srun, process 0 runs on the step's first node, which is this one in an
        # sbatch script; the worker looks the host name up, the port is free here.
        "coordinator": (
            f"slurm:{free_port()}" if args.launcher == "srun" else f"127.0.0.1:{free_port()}"
        ),
        "run_dir": str(run_dir),
        "init_timeout_s": 120,
        "op_timeout_s": args.op_timeout,
        "ops": [dict(op, seq=i) for i, op in enumerate(ops)],
    }
    plan_path = run_dir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    env = worker_env(topo.devices, args.import_root)
    procs, logs = [], []
    failure = ""
    try:
        if args.launcher == "srun":
            procs.append(srun(topo, plan_path, run_dir, env))
        for i in range(topo.processes if args.launcher == "local" else 0):
            log = open(run_dir / f"worker_{i}.log", "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "--plan", str(plan_path), "--process-id", str(i)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(REPO),
                    start_new_session=True,  # own process group, so a kill reaches its children
                )
            )
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failure = f"process {bad[0][0]} exited with code {bad[0][1]}"
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {timeout_s:.0f} s"
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None and args.launcher == "srun":
                # srun forwards SIGTERM to every task of the step; SIGKILL would only
                # kill srun and leave slurmd to clean the tasks up later.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for log in logs:
            log.close()
    events = read_events(run_dir)
    result = Launch(events=events, failure=failure)
    if failure:
        errors = [e for e in events if e.get("event") == "error"]
        if errors:
            result.failure += f": {errors[0]['error']}"
        result.culprit = blame(events)
        tails = []
        for i in range(topo.processes):
            log_path = run_dir / f"worker_{i}.log"
            if not log_path.exists():
                continue
            text = log_path.read_text(errors="replace").strip().splitlines()
            tails.append(f"--- worker {i} (last lines) ---\n" + "\n".join(text[-15:]))
        result.log_tail = "\n".join(tails)
    return result


def srun(topo: Topology, plan_path: Path, run_dir: Path, env: dict) -> subprocess.Popen:
    """One job step running the group's workers, spread over the allocation's nodes
    (one per node when there are enough nodes). SLURM_PROCID gives each its index."""
    nodes = max(1, min(topo.processes, int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))))
    cmd = [
        "srun",
        f"--ntasks={topo.processes}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={-(-topo.processes // nodes)}",
        "--kill-on-bad-exit=1",
        f"--output={run_dir}/worker_%t.log",
        sys.executable,
        str(WORKER),
        "--plan",
        str(plan_path),
        "--process-id",
        "-1",
    ]
    return subprocess.Popen(
        cmd, env=env, cwd=str(REPO), start_new_session=True, stdout=subprocess.DEVNULL
    )


def run_group(
    group: Group, plan: Plan, args, enabled: set, errors: dict, runs_dir: Path
) -> list[dict]:
    """Runs a group; on a failure attributable to one (system, row), records the error,
    disables that pair and relaunches, so the other systems still get measured."""
    attempt = 0
    while True:
        ops = group.build_ops(enabled)
        measured = ("save", "restore", "async_save", "floor_write", "floor_read", "host_copy")
        if not any(op["op"] in measured for op in ops):
            return []
        attempt += 1
        for op in ops:  # a failed attempt may have left partial checkpoints behind
            if op["op"] in ("save", "async_save"):
                shutil.rmtree(op["path"], ignore_errors=True)
        t0 = time.monotonic()
        print(
            f"[{group.name}] {group.topology.processes} process(es) x {group.topology.devices} devices, "
            f"{len(ops)} operations (attempt {attempt}) ...",
            flush=True,
        )
        res = launch(
            group.name,
            group.topology,
            ops,
            args,
            runs_dir / f"{group.name}-{attempt}",
            args.timeout + group.extra_timeout_s,
        )
        if res.ok:
            print(f"[{group.name}] done in {time.monotonic() - t0:.1f} s", flush=True)
            return [e for e in res.events if e.get("event") == "result"]
        print(f"[{group.name}] FAILED: {res.failure}", flush=True)
        give_up = res.culprit is None or res.culprit not in enabled
        if args.verbose or give_up:  # giving up prints the tail even without -v
            print(res.log_tail, flush=True)
        if give_up:
            # Not attributable to one system (floor, start-up, a barrier): give up on the group.
            for row in group.rows:
                for s in plan.systems + ([FLOOR] if row.has_floor else []):
                    errors.setdefault((s, row.key), f"group {group.name} failed: {res.failure}")
            return []
        system, row = res.culprit
        disable(system, row, res.failure, enabled, errors)


CASES = (
    "large",
    "single",
    "small",
    "train",
    "async",
    "local",
    "s3",
    "compress",
    "memory",
    "formats",
)
# s3 needs moto; memory owns 4 GiB in one process (minutes on this machine); local is
# distckpt's local tier alone (no Orbax counterpart), against its persistent tier;
# formats restores other formats' checkpoints (Orbax, safetensors) and needs the
# safetensors package
DEFAULT_CASES = ("large", "single", "small", "train", "async", "compress")
SLOW_LEAVES = 5000  # small cases above this many leaves give Orbax --slow-reps repetitions


def dependent_rows(row: str) -> tuple[str, ...]:
    """Rows that restore what a save row wrote: if the save fails there is nothing to
    restore. An async save's background row comes from the same call as its blocked row."""
    if row == "save":
        return ("r2x4", "r1x8", "r4x2")
    if row.startswith("ssave"):
        return ("srestore" + row[len("ssave") :],)
    return {
        "tsave": ("trestore",),
        "ablocked": ("abackground",),
        "lsave2x4": ("lsavebg2x4", "lpeer2x4"),
        "lsave4x2": ("lsavebg4x2", "lpeer4x2"),
        "psave2x4": ("psavebg2x4", "ppersist2x4"),
        "psave4x2": ("psavebg4x2", "ppersist4x2"),
        "s3save": ("s3restore",),
        "msave": ("mcopy", "mrestore"),
    }.get(row, ())


def disable(system: str, row: str, why: str, enabled: set, errors: dict) -> None:
    """Stops running ``system`` on ``row`` (and on the rows that need its checkpoint)."""
    enabled.discard((system, row))
    errors.setdefault((system, row), why)
    for dep in dependent_rows(row):
        if (system, dep) in enabled:
            enabled.discard((system, dep))
            errors.setdefault((system, dep), f"no checkpoint, the save failed: {why}")


def check_distckpt(import_root: Path) -> str | None:
    """None if distckpt imports; else why not (checked in a subprocess so the parent
    never initialises JAX)."""
    code = "import distckpt"
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            env=worker_env(1, import_root),
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        return "importing distckpt timed out"
    if p.returncode == 0:
        return None
    lines = p.stderr.strip().splitlines()
    return "distckpt unavailable: " + (lines[-1] if lines else f"exit code {p.returncode}")


# ----------------------------------------------------------------------------
# Aggregation and reporting
# ----------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rep_record(rep: int, evs: list[dict], warmup: int) -> dict:
    """One repetition of one (row, system): time is the max over processes (the slowest
    process decides when a collective call is done), bytes are summed over processes."""
    evs = sorted(evs, key=lambda e: e["process"])
    rchar = sum(e["rchar"] for e in evs)
    restored = sum(e.get("restored_bytes", 0) for e in evs)
    return {
        "rep": rep,
        "warmup": rep < warmup,
        "seconds": max(e["seconds"] for e in evs),
        "seconds_per_process": [e["seconds"] for e in evs],
        "rchar": rchar,
        "rchar_per_process": [e["rchar"] for e in evs],
        "device_read_bytes": sum(e["read_bytes"] for e in evs),
        "wchar": sum(e["wchar"] for e in evs),
        "device_write_bytes": sum(e["write_bytes"] for e in evs),
        "restored_bytes": restored or None,
        # rchar counts read(2), not the sockets an object store is read through:
        # where it saw less than a tenth of the bytes, it did not see the reads.
        "read_amplification": rchar / restored if restored and rchar > restored / 10 else None,
        "rss_before_mib": [e["rss_before_kib"] / 1024 for e in evs],
        "peak_rss_mib": [e["peak_rss_kib"] / 1024 for e in evs],
        "peak_rss_is_lifetime": any(e["peak_rss_is_lifetime"] for e in evs),
        "files": evs[0].get("files"),
        "disk_bytes": evs[0].get("disk_bytes"),
        "owned_bytes": [e.get("owned_bytes") for e in evs],
        "result_bytes": [e.get("result_bytes") for e in evs],
        "verified": any(e.get("verified") for e in evs),
        # Async saves: save() + wait_until_finished() on the slowest process, and
        # distckpt's own last_save_stats (the same on every process, so process 0's).
        "seconds_total": max(
            (e["seconds_total"] for e in evs if "seconds_total" in e), default=None
        ),
        "save_stats": evs[0].get("save_stats"),
        # Read floors: crc32c of the bytes just read, on the slowest process.
        "crc32c_seconds": max(
            (e["crc32c_seconds"] for e in evs if "crc32c_seconds" in e), default=None
        ),
    }


def summarise(
    results: list[dict],
    rows: list[Row],
    systems: list[str],
    errors: dict,
    nprocs: dict,
    warmup: int,
) -> list[dict]:
    """One summary per (row, system): medians over the measured (not warm-up) repetitions."""
    by = {}
    for e in results:
        by.setdefault((e["row"], e["system"], e["rep"]), []).append(e)
    out = []
    for row in rows:
        mine = [x for x in systems if x in row.systems] if row.systems else systems
        for system in mine + ([FLOOR] if row.has_floor else []):
            all_reps = [
                rep_record(rep, evs, warmup)
                for (r, s, rep), evs in sorted(by.items(), key=lambda kv: kv[0][2])
                # A repetition missing a process cannot happen after a clean launch; skip it.
                if r == row.key and s == system and len(evs) == nprocs[row.key]
            ]
            reps = [r for r in all_reps if not r["warmup"]]
            summary = {
                "row": row.key,
                "title": row.title,
                "kind": row.kind,
                "system": system,
                "logical_bytes": row.bytes,
                "processes": nprocs[row.key],
                "error": errors.get((system, row.key)),
                "verified": any(r["verified"] for r in all_reps),
                "reps": all_reps,
            }
            if reps:
                secs = median(r["seconds"] for r in reps)
                growth = [
                    p - b
                    for r in reps
                    for p, b in zip(r["peak_rss_mib"], r["rss_before_mib"], strict=True)
                ]
                per_proc = [
                    max(r["peak_rss_mib"][p] - r["rss_before_mib"][p] for r in reps)
                    for p in range(nprocs[row.key])
                ]
                # Beyond what the call returns: a restore's arrays are its result.
                extra = [
                    max(
                        r["peak_rss_mib"][p]
                        - r["rss_before_mib"][p]
                        - (r["result_bytes"][p] or 0) / MiB
                        for r in reps
                    )
                    for p in range(nprocs[row.key])
                ]
                summary.update(
                    n_reps=len(reps),
                    peak_rss_over_before_mib_per_process=per_proc,
                    extra_rss_mib_per_process=extra,
                    owned_mib_per_process=[(b or 0) / MiB for b in reps[0]["owned_bytes"]],
                    seconds=secs,
                    seconds_min=min(r["seconds"] for r in reps),
                    seconds_max=max(r["seconds"] for r in reps),
                    gb_per_s=row.bytes / secs / 1e9,
                    read_amplification=median(r["read_amplification"] for r in reps),
                    device_read_bytes=median(r["device_read_bytes"] for r in reps),
                    peak_rss_mib=max(max(r["peak_rss_mib"]) for r in reps),
                    peak_rss_over_before_mib=max(growth),
                    files=median(r["files"] for r in reps),
                    disk_bytes=median(r["disk_bytes"] for r in reps),
                    seconds_total=median(r["seconds_total"] for r in reps),
                    read_crc32c_seconds=median(
                        r["seconds"] + r["crc32c_seconds"]
                        for r in reps
                        if r["crc32c_seconds"] is not None
                    ),
                )
                stats = [r["save_stats"] for r in reps if r["save_stats"]]
                if stats:
                    summary["save_stats"] = {
                        k: median(st[k] for st in stats)
                        for k in ("blocking_s", "write_s", "commit_s")
                    }
            out.append(summary)
    # Ratios against the floor of the same row and against Orbax.
    index = {(s["row"], s["system"]): s for s in out}
    for s in out:
        floor = index.get((s["row"], FLOOR))
        if s.get("seconds") and floor and floor.get("seconds") and s["system"] != FLOOR:
            s["x_floor"] = s["seconds"] / floor["seconds"]
        orbax = index.get((s["row"], "orbax"))
        if s["system"] == "distckpt" and s.get("seconds") and orbax and orbax.get("seconds"):
            s["speedup_vs_orbax"] = orbax["seconds"] / s["seconds"]
    return out


def fmt(x, spec, dash="-"):
    return dash if x is None else format(x, spec)


def table_lines(summaries: list[dict], plan: Plan) -> list[str]:
    """The results table as text lines; a failed (row, system) becomes an ERROR line."""
    header = [
        "case",
        "system",
        "n",
        "median s",
        "min s",
        "GB/s",
        "x floor",
        "vs orbax",
        "read amp",
        "peak RSS MiB (+op)",
        "files",
    ]
    cells, errors = [], {}  # errors: index in cells -> message
    last_title = None
    for s in summaries:
        title = s["title"] if s["title"] != last_title else ""
        last_title = s["title"]
        name = s["system"]
        is_floor = name == FLOOR
        if is_floor:
            read = (
                "floor (read, evicted first)" if plan.args.cold else "floor (read, cache may serve)"
            )
            name = {"save": "floor (fsync'd write)", "async": "floor (host copy)"}.get(
                s["kind"], read
            )
        if s.get("seconds") is None:
            errors[len(cells)] = "ERROR: " + " ".join((s["error"] or "not measured").split())[:160]
            cells.append([title, name])
            continue
        speedup = s.get("speedup_vs_orbax")
        cells.append(
            [
                title,
                name,
                str(s["n_reps"]),
                f"{s['seconds']:.3f}",
                f"{s['seconds_min']:.3f}",
                fmt(s["gb_per_s"], ".3g"),
                fmt(s.get("x_floor"), ".2f"),
                f"{speedup:.2f}x" if speedup else "-",
                fmt(s.get("read_amplification"), ".2f")
                if s["kind"] == "restore" and not is_floor
                else "-",
                "-"
                if is_floor
                else f"{s['peak_rss_mib']:.0f} (+{s['peak_rss_over_before_mib']:.0f})",
                fmt(s.get("files"), ".0f") if s["kind"] == "save" and not is_floor else "-",
            ]
        )
    widths = [len(h) for h in header]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def render(row):
        return "  ".join(
            c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)
        )

    out = [render(header), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(cells):
        out.append(render(row) + ("  " + errors[i] if i in errors else ""))
    out += [
        "",
        f"n = measured repetitions (medians over them; {plan.warmup} warm-up first); time = max over processes "
        "of barrier-to-return; GB = 1e9 bytes of state;",
        "x floor = seconds / floor seconds of the same row; vs orbax = Orbax seconds / distckpt seconds;",
        "read amp = rchar summed over processes / restored bytes; peak RSS = max over processes and reps "
        "during the call (+ growth over RSS before it).",
    ]
    if any(s["kind"] == "async" for s in summaries):
        out.append(
            "async rows: blocked = save() until it returns (floor: np.array copy of the shards "
            "each process owns); background = the wait_until_finished() right after;"
        )
        out.append(
            "  peak RSS is during save() on the blocked row, during save() + wait on the "
            "background row."
        )
        for s in summaries:
            st = s.get("save_stats")
            if st:
                out.append(
                    f"  {s['system']} last_save_stats (medians): blocking {st['blocking_s']:.3f} s, "
                    f"write {st['write_s']:.3f} s, commit {st['commit_s']:.3f} s"
                )
    checked = sorted({s["title"] for s in summaries if s["verified"]})
    if checked:
        out.append(
            f"restored values were compared with the saved state (first repetition) in "
            f"{len(checked)} restore row(s); a mismatch would show as an ERROR."
        )
    return out


# The host-memory budget distckpt is held to: DISTCKPT_MEMORY_BYTES (default 1 GiB),
# read from the environment the workers inherit; the memory case sets its own.
def memory_budget_bytes() -> int:
    return int(float(os.environ.get("DISTCKPT_MEMORY_BYTES", GiB)))


def evaluate_targets(summaries: list[dict], plan: Plan) -> list[dict]:
    """Issue 8's targets, each with the measured ratio and whether it is met.

    ``met`` is None when a number is missing (a case not run, or an error)."""
    idx = {(s["row"], s["system"]): s for s in summaries}

    def sec(row: str, system: str):
        s = idx.get((row, system))
        return s.get("seconds") if s else None

    def ratio(a, b):
        return a / b if a and b else None

    out = []

    ran = {row for row, _ in idx}

    def add(name: str, goal: str, value, ok, detail: str = "", row: str = "") -> None:
        if row and row not in ran:
            return  # a case this run left out
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": value,
                "met": None if value is None else bool(ok(value)),
                "detail": detail,
            }
        )

    d = "distckpt"
    add(
        "save throughput / fsync'd write floor",
        ">= 0.80",
        ratio(sec("save", FLOOR), sec("save", d)),
        lambda v: v >= 0.8,
        row="save",
    )
    add(
        "save: Orbax s / distckpt s",
        ">= 1.5",
        ratio(sec("save", "orbax"), sec("save", d)),
        lambda v: v >= 1.5,
        row="save",
    )
    for row, what in (("r2x4", "same sharding"), ("r1x8", "2x4 -> 1x8"), ("r4x2", "2x4 -> 4x2")):
        add(
            f"restore {what}: Orbax s / distckpt s",
            ">= 2",
            ratio(sec(row, "orbax"), sec(row, d)),
            lambda v: v >= 2,
            row=row,
        )
        verified = (idx.get((row, FLOOR)) or {}).get("read_crc32c_seconds")
        add(
            f"restore {what}: distckpt s / read floor s",
            "<= 2",
            ratio(sec(row, d), sec(row, FLOOR)),
            lambda v: v <= 2,
            f"{ratio(sec(row, d), verified):.2f}x read + crc32c of the same bytes"
            if ratio(sec(row, d), verified)
            else "",
            row=row,
        )
    add(
        "async blocked: distckpt s / host-copy floor s",
        "<= 1.5",
        ratio(sec("ablocked", d), sec("ablocked", FLOOR)),
        lambda v: v <= 1.5,
        row="ablocked",
    )
    add(
        "async blocked: Orbax s / distckpt s",
        "> 1",
        ratio(sec("ablocked", "orbax"), sec("ablocked", d)),
        lambda v: v > 1,
        row="ablocked",
    )
    # Issue 21: the single-host case (1 process x 8 devices) and 2x4, side by side.
    for save, blocked, first, where in (
        ("save", "ablocked", "afirst", "2x4"),
        ("s1save", "a1blocked", "a1first", "1x8"),
    ):
        add(
            f"{where} save throughput / fsync'd write floor (issue 21)",
            ">= 0.85",
            ratio(sec(save, FLOOR), sec(save, d)),
            lambda v: v >= 0.85,
            row=save,
        )
        add(
            f"{where} async blocked: distckpt s / host-copy floor s (issue 21)",
            "<= 1.2",
            ratio(sec(blocked, d), sec(blocked, FLOOR)),
            lambda v: v <= 1.2,
            row=blocked,
        )
        for row, what in ((blocked, "steady state"), (first, "a manager's first save")):
            add(
                f"{where} async blocked, {what}: Orbax s / distckpt s (issue 21)",
                "> 1",
                ratio(sec(row, "orbax"), sec(row, d)),
                lambda v: v > 1,
                row=row,
            )
    for row, what in (("s1r1x8", "1x8 -> 1x8"), ("s1rcols", "1x8 -> 1x8 cols")):
        add(
            f"restore {what}: Orbax s / distckpt s (issue 21)",
            ">= 3",
            ratio(sec(row, "orbax"), sec(row, d)),
            lambda v: v >= 3,
            row=row,
        )
    sizes = sorted(plan.small_sizes)
    if sizes:
        n0, n1 = (2000 if 2000 in sizes else sizes[0]), sizes[-1]
        for kind in ("save", "restore"):
            row0 = f"s{kind}{n0}"
            add(
                f"small {kind} at {n0} leaves: Orbax s / distckpt s",
                ">= 20",
                ratio(sec(row0, "orbax"), sec(row0, d)),
                lambda v: v >= 20,
                row=row0,
            )
            if n1 > n0:
                per0 = ratio(sec(row0, d), n0)
                per1 = ratio(sec(f"s{kind}{n1}", d), n1)
                add(
                    f"small {kind}: distckpt cost per leaf at {n1} / at {n0}",
                    "<= 1.25 (flat)",
                    ratio(per1, per0),
                    lambda v: v <= 1.25,
                    f"{per0 * 1e6:.0f} -> {per1 * 1e6:.0f} us/leaf" if per0 and per1 else "",
                    row=row0,
                )
    for row, what in (("r1x8", "2x4 -> 1x8"), ("r4x2", "2x4 -> 4x2")):
        s, o = idx.get((row, d)), idx.get((row, "orbax"))
        orbax_amp = o.get("read_amplification") if o else None
        add(
            f"read amplification {what}",
            "<= 1.25",
            s.get("read_amplification") if s else None,
            lambda v: v <= 1.25,
            f"Orbax {orbax_amp:.2f}" if orbax_amp else "",
            row=row,
        )
    for s in summaries:
        extra = s.get("extra_rss_mib_per_process")
        owned = s.get("owned_mib_per_process")
        blocked_rows = ("ablocked", "afirst", "a1blocked", "a1first")
        if s["system"] != d or s["row"] in blocked_rows or not extra or not owned:
            continue
        memory_row = s["row"] in ("msave", "mcopy", "mrestore")
        budget = (plan.memory_budget if memory_row else memory_budget_bytes()) / MiB
        if s["kind"] == "async":
            # An async save copies everything it owns before returning (its contract);
            # only what it needs beyond that copy counts against the budget.
            extra = [e - o for e, o in zip(extra, owned, strict=True)]
            what = " beyond the owned copy"
        else:
            what = " beyond the result" if s["kind"] == "restore" else ""
        add(
            f"peak extra RSS{what}, {s['title']}: max over processes / budget",
            "<= 1",
            max(extra) / budget,
            lambda v: v <= 1,
            "extra " + ", ".join(f"{e:.0f}" for e in extra) + f" MiB; budget {budget:.0f} MiB",
        )
    return out


def target_lines(targets: list[dict]) -> list[str]:
    out = ["", "targets (issues 8 and 21):"]
    for t in targets:
        state = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        value = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        extra = f"  ({t['detail']})" if t["detail"] else ""
        out.append(f"  {state:12s} {t['target']}: {value} (goal {t['goal']}){extra}")
    return out


def machine_info(root: Path) -> dict:
    info = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["df_T"] = subprocess.run(
            ["df", "-T", str(root)], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    # Some VMs (e.g. Firecracker with virtio-balloon free page reporting) hand freed guest
    # memory back to the host, so touching "new" memory costs a host page fault per page.
    # That lands inside timed regions unpredictably; record whether it is happening here.
    with contextlib.suppress(OSError, ValueError):
        info["free_page_reporting_reported_kib"] = int(
            Path("/sys/module/page_reporting/parameters/reported_kib").read_text()
        )
    for pkg in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy"):
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            info[pkg] = importlib_metadata.version(pkg)
    return info


def distckpt_revision() -> str | None:
    """The commit the measured distckpt comes from, with "+dirty" if distckpt/ has edits."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "distckpt"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head or "no-commit") + ("+dirty" if dirty else "")


def fresh_memory_rate() -> float:
    """GB/s at which this machine hands out and zeroes memory nobody touched recently.
    On bare metal this is several GB/s; on VMs that reclaim free guest pages it can be
    well under 1 GB/s, and every fresh allocation in a timed region pays it."""
    import numpy as np

    t0 = time.perf_counter()
    buf = np.ones(256 * MiB, dtype=np.uint8)
    seconds = time.perf_counter() - t0
    del buf
    return 256 * MiB / seconds / 1e9


def plot(summaries: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping --plot {path}")
        return
    titles = list(dict.fromkeys(s["title"] for s in summaries))
    systems = list(dict.fromkeys(s["system"] for s in summaries))
    colours = {"distckpt": "tab:blue", "orbax": "tab:orange", FLOOR: "tab:gray"}
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(titles) * len(systems) + 1))
    height = 0.8 / len(systems)
    for j, system in enumerate(systems):
        vals = []
        for t in titles:
            s = next((x for x in summaries if x["title"] == t and x["system"] == system), None)
            vals.append(s.get("seconds") if s and s.get("seconds") else 0)
        ys = [i + j * height for i in range(len(titles))]
        ax.barh(ys, vals, height=height, label=system, color=colours.get(system))
        for y, v in zip(ys, vals, strict=True):
            if v:
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(titles))], titles)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median seconds (log scale; lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="64 MiB large case and 200 and 2,000 small leaves (one to two minutes)",
    )
    p.add_argument(
        "--size",
        type=float,
        default=None,
        help="GiB in the large case (default 1; 1/16 with --quick)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=3,
        help="repetitions per system (default 3); medians are reported",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed-in-the-medians repetitions run first (default 1)",
    )
    p.add_argument(
        "--small-leaves",
        default=None,
        help="comma-separated leaf counts of the small case (default 2000,20000; 200,2000 "
        "with --quick)",
    )
    p.add_argument(
        "--slow-reps",
        type=int,
        default=1,
        help=f"measured repetitions of Orbax in small cases above {SLOW_LEAVES} leaves "
        "(default 1: minutes each)",
    )
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of distckpt,orbax"
    )
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma-separated subset of " + ",".join(CASES) + " (s3: against moto's S3 "
        "emulator on loopback; local: distckpt's local tier; s3, local and memory are not in "
        "the default set)",
    )
    p.add_argument(
        "--memory-size",
        type=float,
        default=None,
        help="GiB one process owns in the memory case (default 4; 1/4 with --quick)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="DISTCKPT_MEMORY_BYTES in MiB for the memory case (default 512; 128 with --quick)",
    )
    p.add_argument(
        "--launcher",
        choices=("local", "srun"),
        default="local",
        help="local: start worker processes here; srun: start each group with srun (inside "
        "a SLURM allocation, see slurm/bench.sbatch; needs --dir on a shared filesystem)",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="parent directory for checkpoints (default: /tmp); a fresh subdirectory is used and removed",
    )
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and worker logs")
    p.add_argument(
        "--cold",
        action="store_true",
        help="before each restore, fsync + posix_fadvise(DONTNEED) the files to read (best-effort cold cache)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking restored values (done on the first repetition)",
    )
    p.add_argument("--json", default=None, help="write every measured number to this file")
    p.add_argument("--plot", default=None, help="write a bar chart to this PNG (needs matplotlib)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per group launch before all its processes are killed",
    )
    p.add_argument(
        "--op-timeout", type=float, default=None, help="timeout_s passed to distckpt calls"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print worker log tails on failures"
    )
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.cases = [c for c in args.cases.split(",") if c]
    try:
        args.small_leaves = (
            [int(n) for n in args.small_leaves.split(",") if n] if args.small_leaves else None
        )
    except ValueError:
        p.error(f"--small-leaves takes comma-separated integers, got {args.small_leaves!r}")
    if args.launcher == "srun" and not args.dir:
        p.error("--launcher srun needs --dir on a filesystem every node shares")
    unknown = set(args.systems) - set(SYSTEMS)
    unknown |= set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown systems/cases: {sorted(unknown)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.size is None:
        args.size = 1 / 16 if args.quick else 1.0
    if args.memory_size is None:
        args.memory_size = 1 / 4 if args.quick else 4.0
    if args.memory_budget is None:
        args.memory_budget = 128.0 if args.quick else 512.0
    if args.timeout is None:  # generous: a hang is what it guards against, not slowness
        args.timeout = 300 + 240 * args.size * (args.reps + args.warmup)
    if args.op_timeout is None:
        args.op_timeout = max(120.0, args.timeout / 2)
    return args


def run_all(plan: Plan, groups: list[Group], args) -> tuple[list[dict], dict]:
    """Runs every group; returns the workers' result events and the errors by (system, row)."""
    errors: dict = {}
    all_rows = [r.key for g in groups for r in g.rows]
    enabled = {(s, r) for s in plan.systems for r in all_rows}
    if "distckpt" in plan.systems:
        why = check_distckpt(args.import_root)
        if why:
            print(f"distckpt will be reported as an error: {why}", flush=True)
            for r in all_rows:
                disable("distckpt", r, why, enabled, errors)
    (plan.root / "floor").mkdir()
    server = None
    if "memory" in args.cases:
        why = "the memory case measures distckpt's DISTCKPT_MEMORY_BYTES budget"
        disable("orbax", "msave", why, enabled, errors)
    if "s3" in args.cases:
        disable("orbax", "s3save", "Orbax does not accept s3:// locations", enabled, errors)
        try:
            server, plan.s3_root = start_s3()
        except Exception as e:  # noqa: BLE001 - reported as an ERROR row, not a crash
            why = f"no S3 server: {e}"
            print(f"S3 case skipped: {why}", flush=True)
            disable("distckpt", "s3save", why, enabled, errors)
    try:
        results = []
        for group in groups:
            results += run_group(group, plan, args, enabled, errors, plan.root / "runs")
    finally:
        if server is not None:
            server.stop()
    return results, errors


def run_compress(args) -> dict | None:
    """The compression case: one process, its own script; None (and a message) if it fails."""
    mib = 16 if args.quick else 64
    cmd = [sys.executable, str(Path(__file__).with_name("_bench_compress.py")), str(mib)]
    cmd += [str(max(1, args.reps)), "1,3,9"]
    env = worker_env(1, args.import_root)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print("compression case: timed out", flush=True)
        return None
    if done.returncode != 0:
        print(f"compression case failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_formats(args) -> dict | None:
    """The formats case: 2 processes, its own script; None (and a message) if it fails."""
    cmd = [sys.executable, str(Path(__file__).with_name("_bench_formats.py")), str(args.size)]
    cmd += [str(args.reps)]
    env = worker_env(4, args.import_root)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print("formats case: timed out", flush=True)
        return None
    if done.returncode != 0:
        print(f"formats case failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def formats_lines(result: dict) -> list[str]:
    gib = result["bytes"] / GiB
    lines = [
        "",
        f"formats (restore 2x4 -> 2x4 of {gib:.2f} GiB written by the format's own library; "
        f"median of {result['reps']}; read = rchar per process, mmap not counted):",
        f"  {'checkpoint':<34} {'restored by':<24} {'s':>7} {'GiB/s':>6} {'read MiB':>15}",
    ]
    what = {
        "orbax": "Orbax (StandardCheckpointer)",
        "safetensors": f"HF safetensors, {result['files']} shards",
    }
    for r in result["rows"]:
        read = "/".join(f"{b / MiB:.0f}" for b in r["read_per_process"])
        lines.append(
            f"  {what[r['format']]:<34} {r['system']:<24} {r['seconds']:>7.3f} "
            f"{gib / r['seconds']:>6.2f} {read:>15}"
        )
    return lines


def compress_lines(result: dict) -> list[str]:
    lines = [
        "",
        "compression (one process; ratio = raw bytes / stored bytes; times are medians):",
        f"  {'leaf kind':<14} {'codec':<8} {'ratio':>6} {'save s':>8} {'x raw':>6} "
        f"{'restore s':>9} {'x raw':>6}",
    ]
    raw = {r["kind"]: r for r in result["rows"] if r["compression"] == "raw"}
    for r in result["rows"]:
        base = raw[r["kind"]]
        lines.append(
            f"  {r['kind']:<14} {r['compression']:<8} {r['ratio']:>6.2f} {r['save_s']:>8.3f} "
            f"{r['save_s'] / base['save_s']:>6.2f} {r['restore_s']:>9.3f} "
            f"{r['restore_s'] / base['restore_s']:>6.2f}"
        )
    return lines


def start_s3():
    """moto's S3 server on loopback, a bucket, and the environment the workers inherit.

    An emulator in this process: its numbers say how distckpt's object-store path
    compares with its POSIX path here, nothing about a real object store."""
    import logging
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # One PUT per data file, buffered in memory until then: small files bound it.
            "DISTCKPT_SEGMENT_BYTES": str(16 * MiB),
        }
    )
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=bucket)
    return server, f"s3://{bucket}"


def local_tier_memory(args) -> Path | None:
    """A directory in /dev/shm for the local tier's case, if it has room for its steps
    (each process keeps two steps of its share and of its peer's: 4x the state), else None."""
    if "local" not in args.cases or not os.path.isdir("/dev/shm"):
        return None
    free = shutil.disk_usage("/dev/shm").free
    if free < 5 * args.size * GiB:
        print(f"/dev/shm has {free / GiB:.1f} GiB free: the local tier's directories go on disk")
        return None
    return Path(tempfile.mkdtemp(prefix="distckpt-bench-local-", dir="/dev/shm"))


def main(argv=None) -> int:
    args = parse_args(argv)
    parent = Path(args.dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    touch_rate = fresh_memory_rate()
    revision = distckpt_revision()
    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        # Two cores: anything else running (a test suite, a build) skews every number.
        print(
            f"warning: 1-minute load average is {load_start[0]:.1f} before starting; other "
            "work on this machine will make the numbers noisy",
            flush=True,
        )
    root = Path(tempfile.mkdtemp(prefix="distckpt-bench-", dir=parent))
    memory_root = local_tier_memory(args)
    try:
        plan = Plan(args, root, memory_root)
        groups = plan.groups()
        print(
            f"checkpoints under {root}; large case {plan.large_leaves} x {plan.large_shape} "
            f"float32 = {plan.large_bytes / GiB:.3f} GiB; small case {plan.small_sizes} x 1 KiB; "
            f"train state {plan.train_leaves} leaves, {plan.train_bytes / MiB:.0f} MiB; "
            f"{args.warmup} warm-up + {args.reps} measured repetitions",
            flush=True,
        )
        has_source = (REPO / "distckpt").is_dir()
        args.import_root = snapshot_distckpt(root) if has_source else REPO
        results, errors = run_all(plan, groups, args)
        compress = run_compress(args) if "compress" in args.cases else None
        formats = run_formats(args) if "formats" in args.cases else None
    except KeyboardInterrupt:
        print("interrupted; workers were killed", flush=True)
        return 130
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if memory_root is not None:
            shutil.rmtree(memory_root, ignore_errors=True)

    rows = [r for g in groups for r in g.rows]
    nprocs = {r.key: g.topology.processes for g in groups for r in g.rows}
    summaries = summarise(results, rows, plan.systems, errors, nprocs, plan.warmup)
    print()
    print("\n".join(table_lines(summaries, plan)))
    targets = evaluate_targets(summaries, plan)
    print("\n".join(target_lines(targets)))
    if compress is not None:
        print("\n".join(compress_lines(compress)))
    if formats is not None:
        print("\n".join(formats_lines(formats)))
    print(
        f"total wall time {time.monotonic() - t_start:.0f} s; distckpt {revision}; "
        f"load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    info = machine_info(parent)
    info["fresh_memory_touch_gb_per_s"] = round(touch_rate, 3)
    info["loadavg_start"] = load_start
    info["loadavg_end"] = os.getloadavg()
    info["distckpt_revision"] = revision
    if args.json:
        doc = {
            "compression": compress,
            "formats": formats,
            "config": {
                "reps": args.reps,
                "warmup": args.warmup,
                "quick": args.quick,
                "cold": args.cold,
                "large": {
                    "leaves": plan.large_leaves,
                    "shape": plan.large_shape,
                    "bytes": plan.large_bytes,
                },
                "small": {
                    "leaves": plan.small_sizes,
                    "shape": plan.small_shape,
                    "orbax_reps_above": {"leaves": SLOW_LEAVES, "reps": args.slow_reps},
                    "sharding": "fully replicated over mesh (8,)",
                },
                "train": {
                    **plan.train,
                    "leaves": plan.train_leaves,
                    "bytes": plan.train_bytes,
                    "state": "{'params': transformer-shaped dict, 'opt_state': "
                    "optax.adamw(1e-3, weight_decay=0.1).init(params)}; matrices "
                    "P('x','y') on mesh (2, 4), vectors and the step count replicated",
                },
                "cases": args.cases,
                "memory": {
                    "leaves": plan.memory_leaves,
                    "shape": plan.memory_shape,
                    "bytes": plan.memory_bytes,
                    "budget_bytes": plan.memory_budget,
                    "topology": "1 process x 2 devices, P('x', None); restore onto P(None, 'x')",
                },
                "async": {
                    "topology": SAVE_2x4.name,
                    "state": "same as the large case",
                    "distckpt": "CheckpointManager(dir, max_to_keep=2, async_save=True, "
                    "timeout_s=...); save(step, state); wait_until_finished()",
                    "orbax": "CheckpointManager(dir, options=CheckpointManagerOptions("
                    "max_to_keep=2, enable_async_checkpointing=True)); "
                    "save(step, args=StandardSave(state)); wait_until_finished()",
                    "floor": "np.array(shard.data, copy=True) for every addressable shard "
                    "with replica_id == 0",
                },
                "topologies": {
                    t.name + ("-rep" if t is REPLICATED_1x8 else ""): vars(t)
                    for t in (SAVE_2x4, COLS_1x8, BLOCKS_4x2, REPLICATED_1x8)
                },
                "systems": plan.systems,
            },
            "machine": info,
            "results": summaries,
            "targets": targets,
            "raw_events": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        plot(summaries, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
