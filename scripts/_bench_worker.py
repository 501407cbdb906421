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
import ctypes
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


def _status_kib(field: str) -> int:
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


def leaf_values(layout: dict, i: int) -> np.ndarray:
    """The full value of leaf ``i``: standard normal float32, seeded by the leaf.

    Random, because Orbax compresses with zstd by default and trained weights are
    close to incompressible; an arange-style pattern would flatter compression.
    Every process can regenerate any leaf, which is how restores onto another
    topology are checked."""
    rng = np.random.default_rng([layout["seed"], i])
    return rng.standard_normal(tuple(layout["shape"]), dtype=np.float32)


def make_sharding(jax, layout: dict):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices()).reshape(layout["mesh_shape"])
    mesh = Mesh(devices, tuple(layout["axes"]))
    return NamedSharding(mesh, PartitionSpec(*layout["spec"]))


def make_state(jax, layout: dict) -> dict:
    sharding = make_sharding(jax, layout)
    shape = tuple(layout["shape"])
    state = {}
    for i, name in enumerate(leaf_names(layout["n_leaves"])):
        full = leaf_values(layout, i)
        state[name] = jax.make_array_from_callback(shape, sharding, lambda idx, a=full: a[idx])
    return state


def make_target(jax, layout: dict) -> dict:
    sharding = make_sharding(jax, layout)
    sds = jax.ShapeDtypeStruct(tuple(layout["shape"]), np.dtype(layout["dtype"]), sharding=sharding)
    return {name: sds for name in leaf_names(layout["n_leaves"])}


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def restored_bytes(tree: dict) -> int:
    """Bytes this process got back: addressable shards, each distinct index once.

    Replicas of one index on several local devices count once (the process needs to
    read them once); the same index on two processes counts once per process."""
    total = 0
    for arr in tree.values():
        seen = set()
        for shard in arr.addressable_shards:
            key = _index_key(shard.index)
            if key not in seen:
                seen.add(key)
                total += shard.data.nbytes
    return total


def check_restored(layout: dict, tree: dict) -> None:
    """Compares every addressable shard with the regenerated leaf; raises on mismatch."""
    names = leaf_names(layout["n_leaves"])
    if sorted(tree) != names:
        raise AssertionError(f"restored keys differ: {sorted(tree)[:5]}...")
    for i, name in enumerate(names):
        full = leaf_values(layout, i)
        arr = tree[name]
        if tuple(arr.shape) != full.shape or arr.dtype != full.dtype:
            raise AssertionError(
                f"{name}: got {arr.shape} {arr.dtype}, want {full.shape} {full.dtype}"
            )
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), full[shard.index]):
                raise AssertionError(f"{name}: shard {shard.index} on {shard.device} differs")


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

        if not (
            callable(getattr(distckpt, "save", None))
            and callable(getattr(distckpt, "restore", None))
        ):
            raise ImportError("distckpt has no save/restore yet")
        self._lib = distckpt
        self._timeout_s = timeout_s
        self.source = os.path.dirname(distckpt.__file__)

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
            coordinator_address=self.plan["coordinator"],
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

    def system(self, name: str):
        if name not in self.systems:
            self.systems[name] = SYSTEMS[name](self.plan["op_timeout_s"])
            self.emit(
                event="system", system=name, source=getattr(self.systems[name], "source", None)
            )
        return self.systems[name]

    def _begin(self, label: str) -> tuple[int, dict]:
        """Settles memory, lines the processes up and starts the probes; returns
        (RSS before, I/O counters). The caller starts its clock right after."""
        gc.collect()
        release_free_heap()
        self.sync(f"{label}-begin")
        self.can_reset_rss = reset_peak_rss()
        return _status_kib("VmRSS"), read_proc_io()

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
        peak = _status_kib("VmHWM")
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
        peak_blocked = _status_kib("VmHWM")
        blocked = self._measured(t1 - t0, rss_before, io0, peak_blocked)
        wait()
        t2 = time.perf_counter()
        peak_total = _status_kib("VmHWM")
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
            _, m = self.timed(label, lambda: sysm.save(op["path"], state))
            if self.pid == 0:
                m["files"], m["disk_bytes"] = dir_stats(op["path"])
            self.emit(event="result", **common, **m)

        elif kind == "restore":
            sysm = self.system(op["system"])
            target = make_target(self.jax, op["layout"])
            if op.get("evict") and self.pid == 0:
                evict_from_page_cache([op["path"]])
            tree, m = self.timed(label, lambda: sysm.restore(op["path"], target))
            m["restored_bytes"] = restored_bytes(tree)
            if op.get("verify"):
                check_restored(op["layout"], tree)
                m["verified"] = True
            del tree
            self.emit(event="result", **common, **m)

        elif kind == "async_save":
            state = self.get_state(op["layout"])
            sysm = self.system(op["system"])
            key = (op["system"], op["path"])
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
            self.emit(event="result", **common, **blocked)
            self.emit(event="result", **{**common, "row": op["background_row"]}, **background)

        elif kind == "host_copy":
            state = self.get_state(op["layout"])
            copies = []

            def copy_owned() -> None:
                # Fresh arrays, as a real staging copy makes: copying into a reused
                # buffer would skip the page faults every save's copy pays.
                for arr in state.values():
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
            del out
            self.emit(event="result", **common, **m)

        elif kind == "delete":
            self.sync(f"{label}-begin")
            if self.pid == 0:
                for p in op["paths"]:
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
            self.systems[name].close_manager(mgr)
        for sysm in self.systems.values():
            sysm.close()
        self.sync("bench-done")
        self.emit(event="done")


def main() -> None:
    _die_with_parent()
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    args = parser.parse_args()
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
