"""The local tier: frequent steps in each process's host-local directory, copied to peers.

``LocalTier.save`` keeps every block of an array spread over processes on
``copies`` hosts: blocks the job already holds on that many hosts (data-
parallel replicas) are written by every process that holds them, and the
others travel to each process's peers (``_replicate``) by a reshard through
the job's own collectives, then are written there too. Values that every
process holds whole (numpy arrays, arrays on one process's devices) are
kept by every process. A data pipeline's state is saved as the persistent
tier saves it: its arrays are leaves of the step, kept and copied like the
tree's; the small rest of every process's state is kept by every process
(an all-gather, ``_localstate``).

``LocalTier.recover`` agrees, through the coordination service, on the
newest local step the processes' directories still cover; each process
reads what it kept, checked against the CRC-32C of every block, and what a
lost or damaged directory held comes back from the copies through the same
collectives. Any doubt (a step that does not cover, a different topology)
gives None: the caller restores the persistent tier. See docs/local_tier.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt import (
    _local,
    _localstate,
    _match,
    _multihost,
    _plan,
    _procstate,
    _replicate,
    _reshard,
    _stage,
    _statearrays,
    _tree,
)
from distckpt._plan import LeafSpec
from distckpt._reshard import Box
from distckpt.errors import CorruptCheckpointError, DistckptError, TreeMismatchError

log = logging.getLogger("distckpt")
_MARK = ".process-"  # a process's mark in its local directory: which run last saved there


def host_name() -> str:
    """This process's host, as the local tier tells hosts apart.

    ``DISTCKPT_HOST`` if set; else SLURM's node index inside a SLURM step;
    else the machine's host name.
    """
    if os.environ.get("DISTCKPT_HOST"):
        return os.environ["DISTCKPT_HOST"]
    if os.environ.get("SLURM_NODEID") and os.environ.get("SLURM_JOB_ID"):
        return f"slurm-node-{os.environ['SLURM_NODEID']}"
    return socket.gethostname()


@dataclass(frozen=True)
class RecoveryStats:
    """Where a local-tier restore found its bytes."""

    step: int
    local_bytes: int  # read from this process's own directory
    peer_bytes: int  # received through collectives (what this process lacked)


class LocalTier:
    """One process's local directory, and the collective save and recovery over all of them."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        copies: int,
        keep: int,
        host: str | None,
        timeout_s: float,
    ):
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"local_copies must be a positive int, got {copies!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"local_max_to_keep must be a positive int, got {keep!r}")
        self.directory = os.fspath(directory)
        self.copies, self.keep, self.timeout_s = copies, keep, timeout_s
        self.host = host if host is not None else host_name()
        self.last_recovery: RecoveryStats | None = None
        self._kept: dict[_local.Block, np.ndarray] = {}  # own blocks read by ``_verify``
        self._claimed = False  # whether the first save checked that no process shares it

    # ------------------------------------------------------------------ save

    def save(
        self, step: int, tree: Any, *, extra: dict, pipeline: Any = None
    ) -> Callable[[], None]:
        """Starts saving ``tree`` as local step ``step`` on every process; collective.

        ``pipeline`` (a ``Checkpointable``, or None) has its state taken now:
        its arrays are kept as leaves of the step after the tree's, the rest
        in the step's record (``_localstate``).

        Returns once every block this process keeps is in host memory (the
        agreement, the copies to peers and the host copies are done): the
        caller may then change its arrays. The returned ``finish`` writes the
        step and waits for every process to have written it (collective too:
        run it now, or in the background as the manager does).
        """
        coll = _multihost.Collective("local save", self.directory, self.timeout_s)
        items, structure = _tree.walk(tree)
        specs, layouts, problems = [], [], []
        for path, leaf in items:
            spec, problem = _stage.describe(path, leaf)
            if problem:
                problems.append(problem)
                continue
            assert spec is not None
            specs.append(spec)
            layouts.append(_layout_of(leaf, spec))
        if problems:
            raise TypeError("cannot save to the local tier:\n  " + "\n  ".join(problems))
        captured: list[_localstate.Captured] = []

        def hosts_phase() -> None:
            if pipeline is not None:  # in the phase: an error here is raised on every process
                captured.append(_localstate.capture(pipeline, coll.pid))
            coll.put_blob(f"host/{coll.pid}", self.host.encode())

        coll.run("hosts", hosts_phase)
        state = captured[0] if captured else None
        if state is not None:  # the state's arrays: leaves after the tree's, described alike
            for path, leaf in _statearrays.leaf_items(state.leaves):
                spec, problem = _stage.describe(path, leaf)
                assert spec is not None, problem  # split gives arrays of numbers only
                specs.append(spec)
                layouts.append(_layout_of(leaf, spec))
                items.append((path, leaf))
        leaves = [leaf for _, leaf in items]
        summary = state.summary if state is not None else _localstate.NO_PIPELINE
        tree_digest = hashlib.sha256(
            json.dumps(
                [[s.display, s.kind, s.shape, s.dtype] for s in specs] + layouts, sort_keys=True
            ).encode()
        ).hexdigest()

        def prepare() -> dict:
            mine = {"step": step, "tree": tree_digest, "pipeline": summary}
            if coll.is_primary:
                mine["hosts"] = [b.decode() for b in coll.get_blobs("host")]
                mine["run"] = uuid.uuid4().hex
            return mine

        try:
            shared = coll.run(
                "prepare",
                prepare,
                share=True,
                agree=lambda p: [
                    p["step"],
                    p["tree"],
                    p["pipeline"]["pipeline"],
                    p["pipeline"].get("pipeline_digest"),
                ],
                disagree=lambda payloads: _refuse_different(payloads, self.directory),
            )
        except TreeMismatchError as e:
            if state is None:
                raise
            raise _statearrays.explain(e, state.holder) from e
        hosts: list[str] = shared["hosts"]
        if not self._claimed:
            self._claim(coll, shared["run"], hosts)
        peers = _replicate.peers(hosts, self.copies)  # ValueError: the same on every process
        # The collectives: every process runs them, in this order, after the agreement.
        # The pipeline states first: a small gather, so a refused save moves no blocks.
        process_state = _localstate.record(state, step, self.timeout_s)
        own: list[tuple[int, int, Box, np.ndarray]] = []
        copies: list[tuple[int, int, Box, np.ndarray]] = []
        values: dict[int, np.ndarray] = {}
        copied: list[int] = []
        to_copy: list[Any] = []  # the arrays of ``copied``
        for i, (leaf, spec, layout) in enumerate(zip(leaves, specs, layouts, strict=True)):
            if not spec.stored:
                continue
            data = jax.random.key_data(leaf) if spec.kind == _tree.PRNG_KEY else leaf
            if layout is None:
                values[i] = np.array(data, copy=True)
                continue
            own += [(i, coll.pid, box, a) for box, a in _distinct(data, copy=not _views_ok(data))]
            sharding = data.sharding
            assert isinstance(sharding, NamedSharding)  # _layout_of refuses others
            if not _replicate.needs_copies(sharding, data.shape, hosts, self.copies):
                continue
            copied.append(i)
            to_copy.append(data)
        for k in range(1, self.copies):
            ring = tuple(p[k - 1] for p in peers)
            sender = ring.index(coll.pid)
            # All the leaves in one program per mesh, waited for here: left in flight
            # beside the caller's next steps, collectives deadlocked in the CPU runtime
            # (docs/local_tier.md, "What is kept where").
            moved = _multihost.bounded(
                functools.partial(_send, to_copy, ring),
                timeout_s=self.timeout_s,
                what=f"local save of step {step}: the copies to peers",
            )
            # ``moved`` are this save's own arrays: their blocks are kept as they are
            # (views on CPU, host copies from accelerator memory), never copied again.
            for i, m in zip(copied, moved, strict=True):
                copies += [(i, sender, box, a) for box, a in _distinct(m, copy=False)]
            del moved
        record = {
            **extra,
            "hosts": hosts,
            "peers": peers,
            "copied": copied,
            _localstate.RECORD: process_state,
        }

        def finish() -> None:
            coll.run(
                "write",
                lambda: _local.write(
                    self.directory,
                    step,
                    process=coll.pid,
                    process_count=coll.count,
                    leaves=specs,
                    structure=structure,
                    layouts=layouts,
                    blocks=[*own, *copies],
                    values=values,
                    extra=record,
                    state_arrays=len(state.leaves) if state is not None else 0,
                ),
                last=True,
            )
            # Only once every process has written it is an older step not needed.
            _local.remove_older(self.directory, self.keep)

        return finish

    def _claim(self, coll: Any, run: str, hosts: list[str]) -> None:
        """Checks, on the first save, that no two processes were given one directory:
        each leaves a mark naming this run in its directory, then looks for another
        process's mark of the same run (two phases). Steps of two processes in one
        directory would overwrite each other."""
        os.makedirs(self.directory, exist_ok=True)

        def mark() -> None:
            path = os.path.join(self.directory, f"{_MARK}{coll.pid}")
            with open(path, "w") as f:
                f.write(run)

        coll.run("claim", mark)

        def check() -> None:
            for name in os.listdir(self.directory):
                if not name.startswith(_MARK) or name == f"{_MARK}{coll.pid}":
                    continue
                try:
                    with open(os.path.join(self.directory, name)) as f:
                        other = f.read()
                except OSError:
                    continue
                if other == run:
                    q = int(name[len(_MARK) :])
                    raise ValueError(
                        f"local_directory {self.directory} of process {coll.pid} (host "
                        f"{hosts[coll.pid]!r}) is also process {q}'s (host {hosts[q]!r}): their "
                        "steps would overwrite each other. Give every process its own, e.g. "
                        "local_directory=f'/dev/shm/run1/{jax.process_index()}'"
                    )

        coll.run("directories", check)
        self._claimed = True

    def steps(self) -> list[int]:
        """The steps this process's directory holds."""
        return _local.steps(self.directory)

    # ------------------------------------------------------------------ recovery

    def recover(
        self, target: Any, *, newer_than: int | None, partial: bool = False
    ) -> tuple[int, Any, dict, Any] | None:
        """Restores the newest local step newer than ``newer_than`` that the processes'
        directories cover; collective. Returns ``(step, tree, extra, pipeline state of this
        process)`` (the state with its arrays as their types, None if the step has none;
        not yet given to any pipeline), or None (on every process) when the persistent
        tier must be used."""
        coll = _multihost.Collective("local restore", self.directory, self.timeout_s)
        mine: dict[int, _local.Step] = {}
        for step in self.steps():
            if newer_than is not None and step <= newer_than:
                continue
            try:
                mine[step] = _local.load(self.directory, step)
            except (CorruptCheckpointError, OSError) as e:
                log.warning("local step %d on process %d is not usable: %s", step, coll.pid, e)
        inventory = {str(s): st.digest for s, st in mine.items()}
        coll.run(
            "inventory",
            lambda: coll.put_blob(f"inventory/{coll.pid}", json.dumps(inventory).encode()),
        )
        candidates = coll.run(
            "candidates",
            lambda: (
                _candidates([json.loads(b) for b in coll.get_blobs("inventory")])
                if coll.is_primary
                else None
            ),
            share=True,
        )
        try:
            for cand in candidates:
                step, holders = cand["step"], cand["holders"]
                decision = self._agree_on(coll, step, holders, mine.get(step))
                if not decision["recover"]:
                    log.warning("local step %d cannot be recovered: %s", step, decision["reason"])
                    continue
                return self._assemble(
                    coll,
                    mine.get(step),
                    step,
                    set(decision["available"]),
                    set(decision["senders"]),
                    target,
                    partial,
                )
        finally:
            self._kept = {}
        coll.run("done", lambda: None, last=True)
        return None

    def _agree_on(self, coll: Any, step: int, holders: list[int], st: _local.Step | None) -> dict:
        """Each holder checks its own blocks. Only if some process lacks its own do the
        holders also check the copies they keep of the blocks of those processes (one
        more phase). Then the lowest holder hands the primary the step's description if
        the primary has none, and the primary decides."""
        mine = st if coll.pid in holders else None
        own = self._verify(mine)
        coll.run(
            f"verify {step}", lambda: coll.put_blob(f"own/{step}/{coll.pid}", b"1" if own else b"0")
        )
        lost: list[int] = coll.run(
            f"verified {step}",
            lambda: (
                [p for p, b in enumerate(coll.get_blobs(f"own/{step}")) if b != b"1"]
                if coll.is_primary
                else None
            ),
            share=True,
        )
        if lost:  # the copies of their blocks are needed: they count only if whole
            whole = self._verify_copies(mine, set(lost))
            coll.run(
                f"verify copies {step}",
                lambda: coll.put_blob(f"copies/{step}/{coll.pid}", b"1" if whole else b"0"),
            )
        if coll.count > 1:

            def describe() -> None:
                if coll.pid == min(holders) and not coll.is_primary and st is not None:
                    coll.put_blob(
                        f"description/{step}", (st.path / _local.DESCRIPTION).read_bytes()
                    )

            coll.run(f"describe {step}", describe)

        def decide() -> dict | None:
            return self._decide(coll, step, st, lost) if coll.is_primary else None

        return coll.run(f"decide {step}", decide, share=True)

    def _verify(self, st: _local.Step | None) -> bool:
        """Whether this process's own blocks of the step are whole (each reads back and
        matches its CRC-32C) and its layouts name devices this job has. The blocks are
        kept for the assembly, so each is read once."""
        self._kept = {}
        if st is None:
            return False
        try:
            own = [b for b in st.blocks if b.owner == st.process]
            self._kept = dict(zip(own, st.read_many(own), strict=True))
            ids = {d.id for d in jax.devices()}
            return st.process_count == jax.process_count() and all(
                layout is None or set(layout["devices"]) <= ids for layout in st.layouts
            )
        except CorruptCheckpointError as e:
            log.warning(
                "local step %d on process %d is damaged: %s", st.step, jax.process_index(), e
            )
            return False

    def _verify_copies(self, st: _local.Step | None, lost: set[int]) -> bool:
        """Whether the copies this process keeps of the blocks of the processes in
        ``lost`` are whole (each reads back and matches its CRC-32C). They are kept for
        the assembly, which sends them back."""
        if st is None:
            return False
        needed = [b for b in st.blocks if b.owner in lost and b.owner != st.process]
        try:
            self._kept.update(zip(needed, st.read_many(needed), strict=True))
        except CorruptCheckpointError as e:
            log.warning(
                "local step %d on process %d: a copy kept for a peer is damaged: %s",
                st.step,
                jax.process_index(),
                e,
            )
            return False
        return True

    def _read(self, st: _local.Step, block: _local.Block) -> np.ndarray:
        """A block of this process's step: as ``_verify`` read it, or read now."""
        kept = self._kept.get(block)
        return kept if kept is not None else st.read(block)

    def _decide(self, coll: Any, step: int, st: _local.Step | None, lost: list[int]) -> dict:
        """The primary's decision: whose own blocks are good (``available``), whose copies
        of the lost processes' blocks are (``senders``), and whether together they cover."""
        available = [p for p in range(coll.count) if p not in lost]
        senders = (
            [p for p, b in enumerate(coll.get_blobs(f"copies/{step}")) if b == b"1"] if lost else []
        )
        if not available:
            return {
                "recover": False,
                "reason": "no process holds its own blocks",
                "available": [],
                "senders": [],
            }
        if st is None or st.process != coll.pid:
            raw = coll.get_blob(f"description/{step}")
            path = Path(self.directory) / ".recovering"
            st = _local.parse(raw, step, path)
        return {
            "available": available,
            "senders": senders,
            **_coverage(st, set(available), set(senders)),
        }

    def _assemble(
        self,
        coll: Any,
        st: _local.Step | None,
        step: int,
        available: set[int],
        senders: set[int],
        target: Any,
        partial: bool,
    ) -> tuple[int, Any, dict, Any]:
        """Every array on its saved layout from the copies, then placed as ``target`` asks:
        each process in ``available`` gives its own blocks, each in ``senders`` the copies
        it keeps of the others'."""
        have = coll.pid in available
        description = st if have else None
        if len(available) < coll.count:
            # A process that lost its copy gets the tree's description from the lowest
            # whole one, through a broadcast of its JSON (small: O(leaves)).
            source = min(available)
            raw = b""
            if coll.pid == source and st is not None:
                raw = (st.path / _local.DESCRIPTION).read_bytes()
            raw = _broadcast_bytes(raw, source, self.timeout_s)
            if description is None:
                description = _local.parse(raw, step, Path(self.directory) / ".recovering")
        assert description is not None  # every process holds it, or got it above
        local_bytes = peer_bytes = 0
        by_owner: dict[tuple[int, int, Box], _local.Block] = {}
        if st is not None:
            by_owner = {(b.leaf, b.owner, b.box): b for b in st.blocks}
        extra = description.extra
        peers: list[list[int]] = extra["peers"]
        copied = set(extra["copied"])
        arrays: dict[int, Any] = {}
        # Arrays whose lost blocks come back from the peers' copies, all at once (batches).
        pending: dict[int, tuple[Any, NamedSharding, np.dtype]] = {}
        for i, (spec, layout) in enumerate(
            zip(description.leaves, description.layouts, strict=True)
        ):
            if not spec.stored or layout is None:
                continue
            sharding = _sharding(layout)
            shape = spec.array_shape
            dtype = _plan.np_dtype(spec.array_dtype)
            shards = []
            for d, index in sharding.addressable_devices_indices_map(shape).items():
                box = _reshard.box_from_index(_index(index), shape)
                block = by_owner.get((i, coll.pid, box)) if have else None
                data = (
                    self._read(st, block)
                    if block is not None and st is not None
                    else np.zeros(_reshard.box_shape(box), dtype)
                )
                local_bytes += data.nbytes if block is not None else 0
                shards.append(jax.device_put(data, d))
            arr = jax.make_array_from_single_device_arrays(shape, sharding, shards)
            if len(available) < coll.count and i in copied:
                pending[i] = (arr, sharding, dtype)
            elif len(available) < coll.count:
                arr, got = _from_replicas(arr, sharding, available, self.timeout_s)
                peer_bytes += got
            arrays[i] = arr
        for i, (arr, got) in _from_copies(
            pending, peers, available, senders, by_owner, st, coll.pid, self.timeout_s, self._read
        ).items():
            arrays[i] = arr
            peer_bytes += got
        values, read_here, received = _values(
            description, st, available, coll.pid, self.timeout_s, self._read
        )
        local_bytes, peer_bytes = local_bytes + read_here, peer_bytes + received
        tree = _place(description, arrays, values, target, partial, self.timeout_s)
        state = _localstate.restored(description, arrays, values, coll.pid)
        self.last_recovery = RecoveryStats(step, local_bytes, peer_bytes)
        tier = {"hosts", "peers", "copied", _localstate.RECORD, _localstate.RECORD_V1}
        user = {k: v for k, v in extra.items() if k not in tier}
        coll.run("done", lambda: None, last=True)
        return step, tree, user, state


# --------------------------------------------------------------------------- pieces


def _index(index: Any) -> Any:
    assert index is not None  # every device of a NamedSharding holds a block
    return index


def _refuse_different(payloads: list[dict], where: str) -> None:
    """The error for a local save whose processes passed different steps, trees or
    pipeline states (the same on every process: it is computed from all payloads)."""
    steps = {p: d["step"] for p, d in enumerate(payloads)}
    if len(set(steps.values())) > 1:
        raise DistckptError(
            f"local save to {where}: the processes save different steps {steps}; every "
            "process must call save with the same step. Nothing was kept."
        )
    _procstate.check_agreement([d["pipeline"] for d in payloads], f"the local tier ({where})")
    differ = [p for p, d in enumerate(payloads) if d["tree"] != payloads[0]["tree"]]
    raise TreeMismatchError(
        f"local save of step {steps[0]} to {where}: processes {differ} passed a tree whose "
        "paths, shapes, dtypes or shardings differ from process 0's; every process must "
        "save the same tree at the same step. Nothing was kept."
    )


def _layout_of(leaf: Any, spec: LeafSpec) -> dict | None:
    """The layout of an array spread over processes (None: a value every process keeps)."""
    if spec.kind not in (_tree.ARRAY, _tree.PRNG_KEY):
        return None
    data = jax.random.key_data(leaf) if spec.kind == _tree.PRNG_KEY else leaf
    if data.is_fully_addressable:
        return None
    sharding = data.sharding
    if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, Mesh):
        raise TypeError(
            f"{spec.display}: the local tier keeps arrays laid out by a NamedSharding on a "
            f"Mesh; this one has a {type(sharding).__name__}"
        )
    return {
        "devices": [int(d.id) for d in sharding.mesh.devices.flat],
        "mesh": list(sharding.mesh.devices.shape),
        "axes": [str(a) for a in sharding.mesh.axis_names],
        "spec": [list(p) if isinstance(p, tuple) else p for p in sharding.spec],
        "memory_kind": sharding.memory_kind,
    }


def _sharding(layout: dict) -> NamedSharding:
    by_id = {d.id: d for d in jax.devices()}
    devices = np.asarray([by_id[i] for i in layout["devices"]], dtype=object).reshape(
        layout["mesh"]
    )
    spec = PartitionSpec(*(tuple(p) if isinstance(p, list) else p for p in layout["spec"]))
    return NamedSharding(
        Mesh(devices, tuple(layout["axes"])), spec, memory_kind=layout["memory_kind"]
    )


def _distinct(arr: Any, *, copy: bool) -> list[tuple[Box, np.ndarray]]:
    """The distinct blocks this process holds of ``arr`` in host memory: copies, or
    (``copy=False``) what ``np.asarray`` gives (a view of a CPU buffer)."""
    out: dict[Box, np.ndarray] = {}
    for s in arr.addressable_shards:
        box = _reshard.box_from_index(s.index, arr.shape)
        if box not in out:
            out[box] = np.array(s.data, copy=True) if copy else np.asarray(s.data)
    return list(out.items())


def _views_ok(arr: Any) -> bool:
    """Whether the caller's ``arr`` may be kept as views until the write: CPU buffers,
    which the runtime keeps from donation while a view lives (as an async save does,
    ``_stage.views_outlive_donation``)."""
    return all(d.platform == "cpu" for d in arr.devices()) and _stage.views_outlive_donation()


def _broadcast_bytes(raw: bytes, source: int, timeout_s: float) -> bytes:
    """``raw`` of process ``source``, on every process (through a collective)."""
    if jax.process_count() == 1:
        return raw
    return _multihost.bounded(
        lambda: _broadcast(raw, source),
        timeout_s=timeout_s,
        what=f"sending process {source}'s description of the step",
    )


def _broadcast(raw: bytes, source: int) -> bytes:
    is_source = jax.process_index() == source
    size = multihost_utils.broadcast_one_to_all(
        np.asarray([len(raw)], np.int64), is_source=is_source
    )
    buf = np.zeros(int(np.asarray(size)[0]), np.uint8)
    if is_source:
        buf[:] = np.frombuffer(raw, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf, is_source=is_source)
    return np.asarray(out).tobytes()


def _candidates(inventories: list[dict[str, str]]) -> list[dict]:
    """Steps newest first, each with the processes whose copy of it agrees with the most."""
    by_step: dict[int, dict[str, list[int]]] = {}
    for p, inv in enumerate(inventories):
        for name, digest in inv.items():
            by_step.setdefault(int(name), {}).setdefault(digest, []).append(p)
    out = []
    for step in sorted(by_step, reverse=True):
        digests = by_step[step]
        best = max(digests.values(), key=len)
        out.append({"step": step, "holders": sorted(best)})
    return out


def _coverage(st: _local.Step, available: set[int], senders: set[int]) -> dict:
    """Whether every block of every array is held: by a process in ``available`` (its own
    blocks are whole), or as a copy by one in ``senders`` (its copies are whole)."""
    peers: list[list[int]] = st.extra["peers"]
    copied = set(st.extra["copied"])
    for i, (spec, layout) in enumerate(zip(st.leaves, st.layouts, strict=True)):
        if layout is None or not spec.stored:
            continue
        sharding = _sharding(layout)
        had: dict[Box, set[int]] = {}  # every process that held the block at save time
        held: dict[Box, bool] = {}
        for d, index in sharding.devices_indices_map(spec.array_shape).items():
            box = _reshard.box_from_index(index, spec.array_shape)
            p = d.process_index  # type: ignore[attr-defined]
            copies = set(peers[p]) if i in copied else set()
            had.setdefault(box, set()).update({p} | copies)
            held[box] = held.get(box, False) or p in available or bool(copies & senders)
        for box, ok in held.items():
            if not ok:
                return {
                    "recover": False,
                    "reason": f"{spec.display} box {[list(r) for r in box]}: every copy was on "
                    f"processes {sorted(had[box])}, none of which has it whole now",
                }
    return {"recover": True, "reason": ""}


def _from_copies(
    pending: dict[int, tuple[Any, NamedSharding, np.dtype]],
    peers: list[list[int]],
    available: set[int],
    senders: set[int],
    by_owner: dict,
    st: _local.Step | None,
    pid: int,
    timeout_s: float,
    read: Callable[[_local.Step, _local.Block], np.ndarray],
) -> dict[int, tuple[Any, int]]:
    """Each array of ``pending`` (leaf -> array, its layout, dtype) with the blocks of the
    processes not in ``available`` taken from the copies the processes in ``senders``
    keep, and the bytes this process received for it.

    Each process puts the copies it keeps in the place of the process they belong
    to (zeros for the others) on the peer layout, and a reshard moves every block
    home, one array at a time. Unlike the save's copies (one program for all
    leaves, ``_replicate.send_to_peers``), recovery runs once per restarted job,
    which would compile that program every time: a reshard per array reuses one
    compiled program for all the arrays of a shape and layout (at 2 x 4, 64
    arrays of 16 MiB: 1.0 s per recovery against 1.6 s with one program, most of
    the difference its compilation).
    """
    out = {i: (arr, 0) for i, (arr, _, _) in pending.items()}
    holds = pid in senders
    for k in range(1, len(peers[0]) + 1):
        ring = tuple(p[k - 1] for p in peers)
        sender = ring.index(pid)
        take = pid not in available and ring[pid] in senders
        for leaf, (arr, sharding, dtype) in pending.items():
            moved_sharding = _replicate.peer_sharding(sharding, ring)
            shards = []
            for d, index in moved_sharding.addressable_devices_indices_map(arr.shape).items():
                box = _reshard.box_from_index(_index(index), arr.shape)
                block = (
                    by_owner.get((leaf, sender, box)) if holds and sender not in available else None
                )
                data = (
                    read(st, block)
                    if block is not None and st is not None
                    else np.zeros(_reshard.box_shape(box), dtype)
                )
                shards.append(jax.device_put(data, d))
            held = jax.make_array_from_single_device_arrays(arr.shape, moved_sharding, shards)
            # Waited for here: one cross-process collective in flight at a time (left to
            # run asynchronously, successive ones deadlocked in the CPU runtime at 4 x 2).
            back = _multihost.bounded(
                functools.partial(_reshard_now, held, sharding),
                timeout_s=timeout_s,
                what=f"recovering leaf {leaf} from the peers' copies",
            )
            if take and out[leaf][0] is arr:  # the first ring whose holder has it
                out[leaf] = (back, sum(s.data.nbytes for s in back.addressable_shards))
    return out


def _from_replicas(
    arr: Any, sharding: NamedSharding, available: set[int], timeout_s: float
) -> tuple[Any, int]:
    """``arr`` with the blocks of processes that lost their copy taken from a replica on a
    process that kept its own (all-gather over the mesh axes the layout leaves unused)."""
    mesh = sharding.mesh
    used = {a for p in sharding.spec if p is not None for a in ((p,) if isinstance(p, str) else p)}
    free = tuple(a for a in mesh.axis_names if a not in used)
    procs = np.vectorize(lambda d: d.process_index, otypes=[np.int32])(mesh.devices)
    good = np.isin(procs, sorted(available)).astype(np.int32)
    flags = jax.make_array_from_callback(
        good.shape, NamedSharding(mesh, PartitionSpec(*mesh.axis_names)), lambda i: good[i]
    )

    def pick(x: Any, f: Any) -> Any:
        xs = jax.lax.all_gather(x, free)
        fs = jax.lax.all_gather(f.reshape(()), free).reshape(-1)
        return xs.reshape(-1, *x.shape)[jnp.argmax(fs)]

    gather = jax.jit(
        jax.shard_map(
            pick,
            mesh=mesh,
            in_specs=(sharding.spec, PartitionSpec(*mesh.axis_names)),
            out_specs=sharding.spec,
            check_vma=False,  # every replica picks the same block: replicated by construction
        )
    )
    fixed = _multihost.bounded(  # one collective in flight at a time (see _from_copies)
        lambda: jax.block_until_ready(gather(arr, flags)),
        timeout_s=timeout_s,
        what="recovering blocks from replicas",
    )
    received = (
        0
        if jax.process_index() in available
        else sum(s.data.nbytes for s in fixed.addressable_shards)
    )
    return fixed, received


def _values(
    st: _local.Step,
    mine: _local.Step | None,
    available: set[int],
    pid: int,
    timeout_s: float,
    read: Callable[[_local.Step, _local.Block], np.ndarray],
) -> tuple[dict[int, np.ndarray], int, int]:
    """Every value every process kept whole: the lowest available process's, on all.

    Returns ``(values, bytes read here, bytes received from the source)``.
    """
    source = min(available)
    out: dict[int, np.ndarray] = {}
    for i, spec in enumerate(st.leaves):
        if not spec.stored or st.layouts[i] is not None:
            continue
        if pid == source and mine is not None:
            value = read(mine, mine.blocks[mine.values[i]])
        else:
            value = np.zeros(spec.array_shape, _plan.np_dtype(spec.array_dtype))
        out[i] = value
    nbytes = sum(v.nbytes for v in out.values())
    if jax.process_count() > 1 and out:
        # As bytes: through the devices, an int64 or float64 would be narrowed to 32
        # bits (and its value changed) unless jax_enable_x64 is set.
        raw = {k: np.ascontiguousarray(v).reshape(-1).view(np.uint8) for k, v in out.items()}
        got = _multihost.bounded(
            lambda: multihost_utils.broadcast_one_to_all(raw, is_source=pid == source),
            timeout_s=timeout_s,
            what=f"sending process {source}'s whole values",
        )
        out = {
            int(k): np.asarray(v).view(out[int(k)].dtype).reshape(out[int(k)].shape)
            for k, v in got.items()
        }
    return out, (nbytes if pid == source else 0), (0 if pid == source else nbytes)


def _send(arrays: list[Any], ring: tuple[int, ...]) -> list[Any]:
    return jax.block_until_ready(_replicate.send_to_peers(arrays, ring))


def _reshard_now(arr: Any, sharding: Any) -> Any:
    return jax.block_until_ready(jax.device_put(arr, sharding))


def _gather_host(arr: Any) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))


def _put_host(host: np.ndarray, sharding: Any) -> Any:
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def _place(
    st: _local.Step,
    arrays: dict[int, Any],
    values: dict[int, np.ndarray],
    target: Any,
    partial: bool,
    timeout_s: float,
) -> Any:
    """The restored tree: ``target``'s leaves from the saved ones (as ``restore`` matches)."""
    if target is None:
        raise TreeMismatchError(
            "a local-tier restore needs a target (distckpt.abstract_like of your state)"
        )
    items, treedef = _tree.flatten(target)
    wants, problems = _match.match(st.tree_leaves, items, partial=partial, cast=False)
    if problems:
        raise _match.mismatch(str(st.path), problems, what="local step")
    out: list[Any] = [None] * len(items)
    for w in wants:
        spec = st.leaves[w.leaf]
        if w.mode == _match.Mode.VALUE:
            out[w.index] = w.value
            continue
        if w.leaf in arrays:
            arr = arrays[w.leaf]
            if w.sharding is None:  # a host value
                arr = _multihost.bounded(
                    functools.partial(_gather_host, arr),
                    timeout_s=timeout_s,
                    what=f"gathering {spec.display} onto every process",
                )
            elif arr.sharding != w.sharding:
                arr = _multihost.bounded(
                    functools.partial(_reshard_now, arr, w.sharding),
                    timeout_s=timeout_s,
                    what=f"placing {spec.display} on the target's sharding",
                )
        else:
            host = values[w.leaf]
            arr = host if w.sharding is None else _put_host(host, w.sharding)
        if w.mode == _match.Mode.KEY:
            arr = jax.random.wrap_key_data(arr, impl=spec.impl)
        out[w.index] = arr
    return jax.tree_util.tree_unflatten(treedef, out)
