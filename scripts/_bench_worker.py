"""One process of a benchmark group; launched by ``scripts/bench.py``, not run by hand.

The parent writes a JSON plan (the group's topology plus a list of operations)
and starts N copies of this script with ``JAX_PLATFORMS``, ``JAX_NUM_CPU_DEVICES``
and ``XLA_FLAGS`` already in the environment, so JAX sees k CPU devices per
process from its first import. Every copy runs the same operations in the same
order; each timed operation is bracketed by ``sync_global_devices`` so that all
processes start together, and each process appends one JSON line per operation
to its own events file. The parent takes the max over processes.

If an operation raises, the process records the error and leaves with
``os._exit`` (no atexit handlers: ``jax.distributed`` would otherwise wait at a
shutdown barrier for peers that may be stuck). The parent then kills the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import shutil
import signal
import sys
import time
import traceback

import numpy as np


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL us if the parent dies, so no worker outlives a crashed bench."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass  # not Linux/glibc: the parent's own kill-on-failure still applies


# ----------------------------------------------------------------------------
# /proc probes
# ----------------------------------------------------------------------------


def read_proc_io() -> dict[str, int]:
    """This process's I/O counters (all threads). ``rchar`` counts bytes returned by
    read-like syscalls whether or not the page cache served them; ``read_bytes`` counts
    bytes the block layer actually fetched from the device."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_LIBC = None


def release_free_heap() -> None:
    """Hands memory that glibc keeps after ``free`` back to the kernel (malloc_trim).

    Without it, memory freed by one operation (say the other system's restore) stays in
    this process's RSS and is reused by the next, which blurs the per-operation peak RSS
    and makes one system's allocations cheaper because of the other's."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so that VmHWM read after an
    operation is the peak *during* it rather than over the process's whole life
    (which is what ru_maxrss would give, and this process runs many operations)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------
# State generation and checking
# ----------------------------------------------------------------------------


def leaf_names(n: int) -> list[str]:
    return [f"p{i:05d}" for i in range(n)]


def train_params_shapes(layout: dict) -> dict:
    """A transformer-shaped parameter tree: embedding, ``layers`` blocks (attention
    q/k/v/o with biases, two layer norms, an MLP of width 4d), a final norm and an
    output head; 16 leaves per block, from (d,) vectors to (vocab, d) matrices."""
    d, vocab, f = layout["d_model"], layout["vocab"], 4 * layout["d_model"]
    params = {"embed": (vocab, d), "final_norm": {"scale": (d,), "bias": (d,)}, "head": (d, vocab)}
    for i in range(layout["layers"]):
        params[f"block{i:02d}"] = {
            "attn": {
                **{k: (d, d) for k in ("q", "k", "v", "o")},
                **{f"{k}_bias": (d,) for k in ("q", "k", "v", "o")},
            },
            "norm1": {"scale": (d,), "bias": (d,)},
            "mlp": {"w_in": (d, f), "b_in": (f,), "w_out": (f, d), "b_out": (d,)},
            "norm2": {"scale": (d,), "bias": (d,)},
        }
    return params


def abstract_state(layout: dict):
    """(treedef, [(shape, dtype)]) of the state a layout describes."""
    import jax

    if layout.get("kind") == "train":
        import optax

        shapes = train_params_shapes(layout)
        params = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s, np.float32),
            shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        opt_state = jax.eval_shape(optax.adamw(1e-3, weight_decay=0.1).init, params)
        leaves, treedef = jax.tree.flatten({"params": params, "opt_state": opt_state})
        return treedef, [(tuple(x.shape), np.dtype(x.dtype)) for x in leaves]
    names = leaf_names(layout["n_leaves"])
    treedef = jax.tree.structure({n: 0 for n in names})
    return treedef, [(tuple(layout["shape"]), np.dtype(layout["dtype"]))] * len(names)


def leaf_values(layout: dict, i: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """The full value of leaf ``i``: standard normal float32, seeded by the leaf
    (integer leaves, like optax's step count, hold 1000).

    Random, because Orbax compresses with zstd by default and trained weights and
    optimizer moments are close to incompressible; an arange-style pattern (or
    optax's all-zero initial moments) would flatter compression. Every process can
    regenerate any leaf, which is how restores onto another topology are checked."""
    if not np.issubdtype(dtype, np.floating):
        return np.full(shape, 1000, dtype=dtype)
    rng = np.random.default_rng([layout["seed"], i])
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


@functools.cache
def _mesh(jax, mesh_shape: tuple, axes: tuple):
    """One Mesh per (shape, axes): states of thousands of leaves share it."""
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(mesh_shape), axes)


def make_sharding(jax, layout: dict, shape: tuple = ()):
    """The layout's sharding; in a train state only matrices are sharded (2-D over
    the mesh when its axes divide them), vectors and scalars are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = _mesh(jax, tuple(layout["mesh_shape"]), tuple(layout["axes"]))
    spec = list(layout["spec"])
    if layout.get("kind") == "train":
        sizes = [
            int(np.prod([mesh.shape[a] for a in ([p] if isinstance(p, str) else p or [])]))
            for p in spec
        ]
        if len(shape) != len(spec) or any(n % k for n, k in zip(shape, sizes, strict=True)):
            spec = []
    return NamedSharding(mesh, PartitionSpec(*spec))


def make_state(jax, layout: dict):
    treedef, leaves = abstract_state(layout)
    out = []
    for i, (shape, dtype) in enumerate(leaves):
        full = leaf_values(layout, i, shape, dtype)
        sharding = make_sharding(jax, layout, shape)
        out.append(jax.make_array_from_callback(shape, sharding, lambda idx, a=full: a[idx]))
    return jax.tree.unflatten(treedef, out)


def make_target(jax, layout: dict):
    treedef, leaves = abstract_state(layout)
    return jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(shape, dtype, sharding=make_sharding(jax, layout, shape))
            for shape, dtype in leaves
        ],
    )


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def restored_bytes(tree) -> int:
    """Bytes this process got back: addressable shards, each distinct index once.

    Replicas of one index on several local devices count once (the process needs to
    read them once); the same index on two processes counts once per process."""
    import jax

    total = 0
    for arr in jax.tree.leaves(tree):
        seen = set()
        for shard in arr.addressable_shards:
            key = _index_key(shard.index)
            if key not in seen:
                seen.add(key)
                total += shard.data.nbytes
    return total


def result_bytes(tree) -> int:
    """Bytes of every addressable shard of ``tree`` (replicas on several local devices
    each count): the memory a restore's result takes in this process on CPU."""
    import jax

    return sum(s.data.nbytes for arr in jax.tree.leaves(tree) for s in arr.addressable_shards)


@contextlib.contextmanager
def memory_options(op: dict):
    """The memory case's settings for one call: ``memory_bytes`` (DISTCKPT_MEMORY_BYTES,
    read by distckpt at every call) and ``simulate_device``: shards fetched the way
    they are from an accelerator (a copy into fresh host memory; a view on CPU)."""
    saved_env = os.environ.get("DISTCKPT_MEMORY_BYTES")
    if "memory_bytes" in op:
        os.environ["DISTCKPT_MEMORY_BYTES"] = str(op["memory_bytes"])
    stage = saved = None
    if op.get("simulate_device"):
        from distckpt import _stage as stage

        saved = stage._fetch_copies, stage._host_copy
        stage._fetch_copies = lambda device: True
        stage._host_copy = lambda data: np.array(data, copy=True)
    try:
        yield
    finally:
        if stage is not None and saved is not None:
            stage._fetch_copies, stage._host_copy = saved
        if saved_env is None:
            os.environ.pop("DISTCKPT_MEMORY_BYTES", None)
        else:
            os.environ["DISTCKPT_MEMORY_BYTES"] = saved_env


def owned_bytes(tree) -> int:
    """Bytes of the shards this process holds the ``replica_id == 0`` copy of: what a
    checkpoint that stores every byte once has this process write."""
    import jax

    return sum(
        s.data.nbytes
        for arr in jax.tree.leaves(tree)
        for s in arr.addressable_shards
        if s.replica_id == 0
    )


def check_restored(layout: dict, tree) -> None:
    """Compares every addressable shard with the regenerated leaf; raises on mismatch."""
    import jax

    treedef, leaves = abstract_state(layout)
    got, got_def = jax.tree.flatten(tree)
    if got_def != treedef:
        raise AssertionError(f"restored tree structure differs: {got_def} != {treedef}")
    for i, ((shape, dtype), arr) in enumerate(zip(leaves, got, strict=True)):
        full = leaf_values(layout, i, shape, dtype)
        if tuple(arr.shape) != full.shape or arr.dtype != full.dtype:
            raise AssertionError(
                f"leaf {i}: got {arr.shape} {arr.dtype}, want {full.shape} {full.dtype}"
            )
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), full[shard.index]):
                raise AssertionError(f"leaf {i}: shard {shard.index} on {shard.device} differs")


# ----------------------------------------------------------------------------
# Storage helpers
# ----------------------------------------------------------------------------


def dir_stats(path: str) -> tuple[int, int]:
    """(number of files, bytes) under ``path``."""
    n = size = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            n += 1
            size += os.path.getsize(os.path.join(root, name))
    return n, size


def evict_from_page_cache(paths: list[str]) -> None:
    """Best-effort eviction of files from the page cache without root.

    fsync first because POSIX_FADV_DONTNEED only drops clean pages. Pages another
    process has mapped stay, and a VM host may still cache the disk underneath."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _dirs, names in os.walk(p):
                files += [os.path.join(root, n) for n in names]
        elif os.path.exists(p):
            files.append(p)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_FLOOR_CHUNK = 64 << 20  # bytes per os.write / os.preadv call in the floors


def floor_write(path: str, nbytes: int, buf: np.ndarray) -> None:
    """Sequential write of ``nbytes`` from an in-memory buffer, then fsync: what any
    checkpoint save must at least do with its bytes on this filesystem."""
    view = memoryview(buf).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            n = os.write(fd, view[: min(left, len(view))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_read(files: list[list], start: int, stop: int, out: np.ndarray) -> None:
    """Reads bytes [start, stop) of the concatenation of ``files`` into ``out``."""
    view = memoryview(out).cast("B")
    pos = 0  # offset of the current file within the concatenation
    done = 0
    for path, size in files:
        lo, hi = max(start, pos), min(stop, pos + size)
        if lo < hi:
            fd = os.open(path, os.O_RDONLY)
            try:
                off = lo - pos
                while off < hi - pos:
                    n = os.preadv(fd, [view[done : done + min(_FLOOR_CHUNK, hi - pos - off)]], off)
                    if n == 0:
                        raise OSError(f"{path}: unexpected end of file at {off}")
                    off += n
                    done += n
            finally:
                os.close(fd)
        pos += size
    if done != stop - start:
        raise OSError(f"floor read got {done} bytes, expected {stop - start}")


# ----------------------------------------------------------------------------
# The two systems under test
# ----------------------------------------------------------------------------


class Distckpt:
    name = "distckpt"

    def __init__(self, timeout_s: float):
        import distckpt

        self._lib = distckpt
        self._timeout_s = timeout_s

    def save(self, path: str, tree: dict) -> None:
        self._lib.save(path, tree, timeout_s=self._timeout_s)

    def restore(self, path: str, target: dict) -> dict:
        return self._lib.restore(path, target, timeout_s=self._timeout_s)

    # Async saves go through the manager, which is where distckpt offers them.

    def manager(self, directory: str):
        return self._lib.CheckpointManager(
            directory, max_to_keep=2, async_save=True, timeout_s=self._timeout_s
        )

    def async_save(self, mgr, step: int, tree: dict) -> None:
        mgr.save(step, tree)  # returns once this process's shards are copied to host

    def forget_process_state(self) -> None:
        """Forgets what a restarted process would not know: the runtime's answer on
        views and donation, which the next manager asks again when it is created."""
        from distckpt import _stage

        _stage._probe_result.clear()

    def wait(self, mgr) -> None:
        mgr.wait_until_finished()

    def save_stats(self, mgr) -> dict | None:
        stats = mgr.last_save_stats
        return stats.to_json() if stats is not None else None

    def close_manager(self, mgr) -> None:
        mgr.close()

    def close(self) -> None:
        pass


class Orbax:
    """Orbax's recommended API: StandardCheckpointer, save + wait_until_finished,
    restore with abstract ShapeDtypeStruct targets carrying the wanted shardings."""

    name = "orbax"

    def __init__(self, timeout_s: float):
        import orbax.checkpoint as ocp

        # Orbax has its own timeout (AsyncOptions.timeout_secs); the parent's kill backs it up.
        del timeout_s
        self._ocp = ocp
        self._ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, tree: dict) -> None:
        self._ckptr.save(path, tree)
        self._ckptr.wait_until_finished()

    def restore(self, path: str, target: dict) -> dict:
        return self._ckptr.restore(path, target)

    # Orbax's documented async path: a CheckpointManager with async checkpointing on
    # (its default, spelled out) and StandardSave args.

    def manager(self, directory: str):
        ocp = self._ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
        return ocp.CheckpointManager(directory, options=options)

    def async_save(self, mgr, step: int, tree: dict) -> None:
        mgr.save(step, args=self._ocp.args.StandardSave(tree))

    def forget_process_state(self) -> None:
        pass  # a new manager is all Orbax's first save needs

    def wait(self, mgr) -> None:
        mgr.wait_until_finished()

    def save_stats(self, mgr) -> dict | None:
        del mgr
        return None

    def close_manager(self, mgr) -> None:
        mgr.close()

    def close(self) -> None:
        self._ckptr.close()


SYSTEMS = {"distckpt": Distckpt, "orbax": Orbax}


# ----------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------


class Worker:
    def __init__(self, plan: dict, process_id: int):
        self.plan = plan
        self.pid = process_id
        self.nprocs = plan["num_processes"]
        self.events = open(os.path.join(plan["run_dir"], f"events_{process_id}.jsonl"), "a")
        self.systems: dict = {}
        self.state = None
        self.state_layout_key = None
        self.floor_buf = None
        self.managers: dict = {}  # (system, directory) -> that system's checkpoint manager
        self.can_reset_rss = reset_peak_rss()

    def emit(self, **record) -> None:
        record.update(process=self.pid, group=self.plan["group"], wall=time.time())
        self.events.write(json.dumps(record) + "\n")
        self.events.flush()

    def start(self) -> None:
        self.emit(event="launch", pid=os.getpid())
        import jax

        if jax.config.jax_cpu_collectives_implementation != "gloo":
            # sync_global_devices is a cross-process psum; CPU needs gloo for that.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address(self.plan["coordinator"]),
            num_processes=self.nprocs,
            process_id=self.pid,
            initialization_timeout=self.plan["init_timeout_s"],
        )
        from jax.experimental import multihost_utils

        self.jax = jax
        self.sync = multihost_utils.sync_global_devices
        if jax.process_count() != self.nprocs or len(jax.devices()) != self.plan["total_devices"]:
            raise RuntimeError(
                f"expected {self.nprocs} processes x {self.plan['total_devices']} devices, "
                f"got {jax.process_count()} x {len(jax.devices())}"
            )
        self.sync("bench-start")  # also compiles the barrier outside any timed region
        self.emit(event="ready")

    def local_directory(self, op: dict) -> str:
        return os.path.join(op["local_root"], f"process{self.pid}")

    def local_manager(self, op: dict):
        """A manager whose saves all go to the local tier (each process named its own
        host, so every copy goes to another process, as across hosts)."""
        import distckpt

        return distckpt.CheckpointManager(
            op["path"],
            save_interval_steps=10**9,
            local_directory=self.local_directory(op),
            local_save_interval_steps=1,
            local_max_to_keep=2,
            local_host=f"bench-host-{self.pid}",
            timeout_s=self.plan["op_timeout_s"],
        )

    def system(self, name: str):
        if name not in self.systems:
            self.systems[name] = SYSTEMS[name](self.plan["op_timeout_s"])
        return self.systems[name]

    def _begin(self, label: str) -> tuple[int, dict]:
        """Settles memory, lines the processes up and starts the probes; returns
        (RSS before, I/O counters). The caller starts its clock right after."""
        gc.collect()
        release_free_heap()
        self.sync(f"{label}-begin")
        self.can_reset_rss = reset_peak_rss()
        return status_kib("VmRSS"), read_proc_io()

    def _measured(self, seconds: float, rss_before: int, io0: dict, peak: int) -> dict:
        io1 = read_proc_io()
        return {
            "seconds": seconds,
            "rchar": io1["rchar"] - io0["rchar"],
            "read_bytes": io1["read_bytes"] - io0["read_bytes"],
            "wchar": io1["wchar"] - io0["wchar"],
            "write_bytes": io1["write_bytes"] - io0["write_bytes"],
            "rss_before_kib": rss_before,
            # Without clear_refs VmHWM is the lifetime peak; say so rather than mislead.
            "peak_rss_kib": peak,
            "peak_rss_is_lifetime": not self.can_reset_rss,
        }

    def timed(self, label: str, fn):
        """Runs ``fn`` between barriers; returns (result, measurements of this process)."""
        rss_before, io0 = self._begin(label)
        t0 = time.perf_counter()
        out = fn()
        if out is not None:
            self.jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        peak = status_kib("VmHWM")
        m = self._measured(seconds, rss_before, io0, peak)
        self.sync(f"{label}-end")
        return out, m

    def timed_async(self, label: str, start, wait) -> tuple[dict, dict]:
        """Times ``start`` (what blocks the training loop) and then ``wait`` (the rest of
        the save, run back to back as if the loop had nothing else to do), between one
        pair of barriers. Returns (blocked, background) measurements of this process.

        The peak RSS of ``blocked`` is during ``start``; that of ``background`` is
        during ``start`` + ``wait``, the whole save (VmHWM is not reset in between).
        No barrier between the two: a training loop goes on as soon as its own
        ``save`` returns, so each process's wait starts when its save returned."""
        rss_before, io0 = self._begin(label)
        t0 = time.perf_counter()
        start()
        t1 = time.perf_counter()
        peak_blocked = status_kib("VmHWM")
        blocked = self._measured(t1 - t0, rss_before, io0, peak_blocked)
        wait()
        t2 = time.perf_counter()
        peak_total = status_kib("VmHWM")
        background = self._measured(t2 - t1, rss_before, io0, peak_total)
        background["seconds_total"] = blocked["seconds_total"] = t2 - t0
        self.sync(f"{label}-end")
        return blocked, background

    def get_state(self, layout: dict) -> dict:
        key = json.dumps(layout, sort_keys=True)
        if self.state_layout_key != key:
            self.state = None
            gc.collect()
            self.state = make_state(self.jax, layout)
            self.jax.block_until_ready(self.state)
            self.state_layout_key = key
        return self.state

    def maybe_inject_fault(self, op: dict) -> None:
        """Testing aid for the bench's own failure handling: BENCH_INJECT_FAULT=
        "system:row:raise" or "system:row:hang" makes process 0 fail or hang there."""
        spec = os.environ.get("BENCH_INJECT_FAULT", "")
        if spec and self.pid == 0:
            system, row, how = spec.split(":")
            if op.get("system") == system and op.get("row") == row:
                if how == "hang":
                    time.sleep(1e9)
                raise RuntimeError(f"injected fault at {system}:{row}")

    def run_op(self, op: dict) -> None:
        kind = op["op"]
        label = f"{kind}-{op.get('system', '')}-{op.get('rep', '')}-{op['seq']}"
        common = {k: op[k] for k in ("op", "system", "rep", "row", "seq") if k in op}
        self.emit(event="start", **common)
        self.maybe_inject_fault(op)

        if kind == "save":
            state = self.get_state(op["layout"])
            sysm = self.system(op["system"])
            with memory_options(op):
                _, m = self.timed(label, lambda: sysm.save(op["path"], state))
            m["owned_bytes"] = owned_bytes(state)
            if self.pid == 0 and "://" not in op["path"]:
                m["files"], m["disk_bytes"] = dir_stats(op["path"])
            self.emit(event="result", **common, **m)

        elif kind == "restore":
            sysm = self.system(op["system"])
            target = make_target(self.jax, op["layout"])
            if op.get("evict") and self.pid == 0:
                evict_from_page_cache([op["path"]])
            with memory_options(op):
                tree, m = self.timed(label, lambda: sysm.restore(op["path"], target))
            m["restored_bytes"] = restored_bytes(tree)
            m["result_bytes"] = result_bytes(tree)
            if op.get("verify"):
                check_restored(op["layout"], tree)
                m["verified"] = True
            del tree
            self.emit(event="result", **common, **m)

        elif kind == "async_save":
            state = self.get_state(op["layout"])
            sysm = self.system(op["system"])
            key = (op["system"], op["path"])
            if op.get("fresh"):  # a new manager's first save, as in a restarted job
                sysm.forget_process_state()
                self.managers[key] = sysm.manager(op["path"])
            if key not in self.managers:  # construction is collective and not timed
                self.managers[key] = sysm.manager(op["path"])
            mgr = self.managers[key]
            blocked, background = self.timed_async(
                label,
                lambda: sysm.async_save(mgr, op["step"], state),
                lambda: sysm.wait(mgr),
            )
            stats = sysm.save_stats(mgr)
            if stats is not None:
                background["save_stats"] = stats
            blocked["owned_bytes"] = background["owned_bytes"] = owned_bytes(state)
            self.emit(event="result", **common, **blocked)
            if op.get("background_row"):
                self.emit(event="result", **{**common, "row": op["background_row"]}, **background)
            if op.get("fresh"):
                sysm.close_manager(self.managers.pop(key))

        elif kind == "local_save":
            # The local tier: every step into this process's own directory, each block
            # also on another process ("host"); nothing into the shared directory.
            state = self.get_state(op["layout"])
            key = ("distckpt", f"local:{op['path']}")
            if key not in self.managers:  # construction is collective and not timed
                self.managers[key] = self.local_manager(op)
            mgr = self.managers[key]
            blocked, background = self.timed_async(
                label, lambda: mgr.save(op["step"], state), mgr.wait_until_finished
            )
            blocked["owned_bytes"] = background["owned_bytes"] = owned_bytes(state)
            self.emit(event="result", **common, **blocked)
            self.emit(event="result", **{**common, "row": op["background_row"]}, **background)

        elif kind == "local_recover":
            # A restarted job whose process ``wipe`` lost its local directory: a new
            # manager resumes from the newest local step, that process's blocks coming
            # from its peer's copies.
            if self.pid == op["wipe"]:
                shutil.rmtree(self.local_directory(op), ignore_errors=True)
            self.sync(f"{label}-wiped")
            mgr = self.local_manager(op)
            target = make_target(self.jax, op["layout"])
            tree, m = self.timed(label, lambda: mgr.restore(None, target))
            stats = mgr.last_restore_stats
            if stats is None or stats.tier != "local" or stats.step != op["step"]:
                raise RuntimeError(
                    f"recovered {stats}, expected step {op['step']} from the local tier"
                )
            m["restored_bytes"] = restored_bytes(tree)
            m["result_bytes"] = result_bytes(tree)
            m["local_tier"] = {
                "local_bytes": stats.local_bytes,
                "peer_bytes": stats.peer_bytes,
                "persistent_bytes": stats.persistent_bytes,
            }
            if op.get("verify"):
                check_restored(op["layout"], tree)
                m["verified"] = True
            del tree
            mgr.close()
            self.emit(event="result", **common, **m)

        elif kind == "host_copy":
            state = self.get_state(op["layout"])
            copies = []

            def copy_owned() -> None:
                # Fresh arrays, as a real staging copy makes: copying into a reused
                # buffer would skip the page faults every save's copy pays.
                for arr in self.jax.tree.leaves(state):
                    for shard in arr.addressable_shards:
                        if shard.replica_id == 0:
                            copies.append(np.array(shard.data, copy=True))

            _, m = self.timed(label, copy_owned)
            m["copied_bytes"] = sum(c.nbytes for c in copies)
            del copies
            self.emit(event="result", **common, **m)

        elif kind == "floor_write":
            path, nbytes = op["files"][self.pid]
            if self.floor_buf is None or self.floor_buf.nbytes < min(nbytes, _FLOOR_CHUNK):
                rng = np.random.default_rng(self.pid)
                self.floor_buf = rng.integers(0, 255, min(nbytes, _FLOOR_CHUNK), dtype=np.uint8)
            if os.path.exists(path):
                os.unlink(path)  # fresh blocks each time, as a new checkpoint gets
            _, m = self.timed(label, lambda: floor_write(path, nbytes, self.floor_buf))
            self.emit(event="result", **common, **m)

        elif kind == "floor_read":
            total = sum(size for _, size in op["files"])
            start, stop = total * self.pid // self.nprocs, total * (self.pid + 1) // self.nprocs
            # Touch the destination before timing: on a VM that hands freed memory back to
            # the host, first-touching fresh pages costs anywhere from ~0.06 to ~2.5 s/GiB
            # depending on luck, which would drown the read bandwidth this floor measures.
            out = np.ones(stop - start, dtype=np.uint8)
            if op.get("evict") and self.pid == 0:
                evict_from_page_cache([p for p, _ in op["files"]])
            _, m = self.timed(label, lambda: floor_read(op["files"], start, stop, out))
            m["restored_bytes"] = stop - start
            # The other pass a restore that checks its data cannot skip, on the same
            # bytes, still in cache: with the read, the floor of a verified restore.
            import crc32c

            t0 = time.perf_counter()
            crc32c.crc32c(out)
            m["crc32c_seconds"] = time.perf_counter() - t0
            del out
            self.emit(event="result", **common, **m)

        elif kind == "delete":
            self.sync(f"{label}-begin")
            if self.pid == 0:
                for p in op["paths"]:
                    if "://" in p:  # an object store: through distckpt's storage layer
                        from distckpt import _storage

                        parent, name = p.rstrip("/").rsplit("/", 1)
                        _storage.open_storage(parent).remove_entry(name)
                    else:
                        shutil.rmtree(p, ignore_errors=True)
            self.sync(f"{label}-end")

        else:
            raise ValueError(f"unknown op {kind!r}")

    def run(self) -> None:
        self.start()
        for op in self.plan["ops"]:
            try:
                self.run_op(op)
            except BaseException as e:
                self.emit(
                    event="error",
                    op=op["op"],
                    system=op.get("system"),
                    row=op.get("row"),
                    rep=op.get("rep"),
                    error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                )
                raise
        for (name, _), mgr in self.managers.items():
            self.system(name).close_manager(mgr)
        for sysm in self.systems.values():
            sysm.close()
        self.sync("bench-done")
        self.emit(event="done")


def coordinator_address(spec: str) -> str:
    """``host:port``; ``slurm:PORT`` (``bench.py --launcher srun``) means the first node
    of this job step, where SLURM_PROCID 0 runs and so where JAX starts the service."""
    if not spec.startswith("slurm:"):
        return spec
    import subprocess

    nodelist = os.environ["SLURM_STEP_NODELIST"]
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return f"{hosts[0]}:{spec.split(':', 1)[1]}"


def main() -> None:
    _die_with_parent()
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument(
        "--process-id", type=int, required=True, help="-1: take it from SLURM_PROCID (srun)"
    )
    args = parser.parse_args()
    if args.process_id < 0:
        args.process_id = int(os.environ["SLURM_PROCID"])
    with open(args.plan) as f:
        plan = json.load(f)

    worker = Worker(plan, args.process_id)
    code = 0
    try:
        worker.run()
    except BaseException:
        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    worker.events.close()
    if code == 0:
        import jax

        jax.distributed.shutdown()  # all peers reached "bench-done", so this cannot wait long
    os._exit(code)


if __name__ == "__main__":
    main()
