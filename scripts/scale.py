"""How save and restore scale with the process count: real runs on this machine.

For each N in ``--processes`` the script starts ``distckpt launch -n N -d 1``
(N processes, one CPU device each, one JAX job) and every process:

* builds a state of ``--leaves`` arrays sharded over a 1-D mesh of all N
  devices (``P('x', None)``) plus ``--replicated`` small replicated leaves
  (``P()``), in two sizes: **weak** scaling, a fixed amount per process
  (``--weak-mib`` per process, so the total grows with N), and **strong**
  scaling, a fixed total (``--strong-mib``, split over the N processes);
* saves it ``--warmup`` + ``--reps`` times and restores it as many times onto
  the same N processes;
* restores the checkpoint the 2N-process launch saved onto these N processes
  (restore onto another process count: N -> N/2, in the next launch);
* saves and restores a one-leaf tree ``--small-reps`` times and times the
  floor of any 3-phase protocol on the same job: 3 x (one status write + a
  barrier).

Every timed call starts right after a barrier; its time is the slowest
process's, and the table shows the median over repetitions. Per process and
operation it also records the coordination-service calls per phase (counts
by method and bytes, through a counting wrapper of the client), metadata
bytes read, peak RSS and bytes read and written (``/proc/self/io``).
Launches run one at a time, largest N first, so that the checkpoints of 2N
processes exist when N processes start.

    .venv/bin/python scripts/scale.py                        # 2..32 processes, ~10 minutes
    .venv/bin/python scripts/scale.py --quick                # 2 and 4 processes, tiny state
    .venv/bin/python scripts/scale.py --json out.json --plot out.png
    .venv/bin/python scripts/scale.py --cases one-leaf --processes 2,8,32

The workers import the same ``distckpt`` as this script (its directory goes
first on their ``PYTHONPATH``); ``PYTHONPATH=/other/checkout`` measures
another checkout. docs/scale.md explains every number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from _bench_worker import reset_peak_rss  # scripts/ is on the path of a script

MiB = 1 << 20
KiB = 1 << 10
CASES = ("weak", "strong", "one-leaf")
MODES = ("weak", "strong")
COLS = 256  # float32 columns of every sharded leaf: a row is 1 KiB
REPLICATED_ELEMS = 1024  # float32 elements of each replicated leaf (4 KiB)


# ----------------------------------------------------------------------------
# Counting what a process asks of the coordination service (also scale_coord.py)
# ----------------------------------------------------------------------------


def _nbytes(x: object) -> int:
    """Bytes of the keys and values in an argument or result of a client call."""
    if isinstance(x, str):
        return len(x.encode())
    if isinstance(x, bytes | bytearray):
        return len(x)
    if isinstance(x, list | tuple):
        return sum(_nbytes(v) for v in x)
    return 0  # ints (timeouts, increments), None


class Counting:
    """Wraps the coordination-service client; counts calls and bytes per phase and method.

    The phase is whatever ``self.phase`` says when a call is made (see
    ``track_phases``); bytes are those of the keys and values sent and
    returned. ``dir_entries_read`` counts the values listings return, which
    is what grows with N when a process lists every other's status.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.phase = "other"
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()

    def __getattr__(self, name: str) -> object:
        method = getattr(self.inner, name)
        if not callable(method):
            return method

        def call(*args: object, **kwargs: object) -> object:
            phase = self.phase
            result = method(*args, **kwargs)
            self.calls[phase, name] += 1
            self.bytes[phase, name] += _nbytes(args) + _nbytes(result)
            if name.startswith("key_value_dir_get"):  # what a listing returns grows with N
                self.calls[phase, "dir_entries_read"] += len(result)
            return result

        return call

    def take(self, ops: int) -> dict[str, dict[str, dict[str, float]]]:
        """Calls and bytes per phase and method since the last take, per operation."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (phase, name), n in sorted(self.calls.items()):
            out.setdefault(phase, {})[name] = {
                "calls": n / ops,
                "bytes": self.bytes[phase, name] / ops,
            }
        self.calls.clear()
        self.bytes.clear()
        return out


@contextlib.contextmanager
def track_phases(counting: Counting | None) -> Iterator[None]:
    """Attributes every client call made inside ``Collective.run`` to ``<op>.<phase>``."""
    from distckpt import _multihost

    if counting is None:
        yield
        return
    original = _multihost.Collective.run

    def run(self: Any, phase: str, fn: Any, **kwargs: Any) -> Any:
        outer, counting.phase = counting.phase, f"{self.op}.{phase}"
        try:
            return original(self, phase, fn, **kwargs)
        finally:
            counting.phase = outer

    _multihost.Collective.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        _multihost.Collective.run = original  # type: ignore[method-assign]


def floor_3_phases(client: Any, pid: int, tag: str) -> float:
    """Seconds of the floor of any 3-phase protocol: 3 x (one status write + a barrier)."""
    began = time.perf_counter()
    for phase in range(3):
        client.key_value_set(f"floor/{tag}/{phase}/{pid}", "ok")
        client.wait_at_barrier(f"floor/{tag}/{phase}", 60_000)
    return time.perf_counter() - began


def totals(per_phase: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Calls per method summed over phases (``dir_entries_read`` included)."""
    out: dict[str, float] = {}
    for methods in per_phase.values():
        for name, v in methods.items():
            out[name] = out.get(name, 0.0) + v["calls"]
    return out


def round_trips(per_phase: dict[str, dict[str, dict[str, float]]]) -> float:
    return sum(
        v["calls"] for m in per_phase.values() for k, v in m.items() if k != "dir_entries_read"
    )


def values_read(calls: dict[str, float]) -> float:
    """Values a process's reads return: single gets plus the entries of listings."""
    singles = sum(
        v for k, v in calls.items() if "get" in k and not k.startswith("key_value_dir_get")
    )
    return singles + calls.get("dir_entries_read", 0)


# ----------------------------------------------------------------------------
# Per-process measurements
# ----------------------------------------------------------------------------


def proc_io() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                out[key] = int(value)
    return out


def peak_rss_bytes(reset_ok: bool) -> int:
    """VmHWM since the last reset, else the process's whole-life ``ru_maxrss``."""
    if reset_ok:
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB


def current_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    return 0


def metadata_counter() -> tuple[Callable[[], int], str]:
    """A function giving this process's metadata bytes read so far, and what it counts.

    ``distckpt._chunks.metadata_bytes_read()`` (commit record + chunk index
    bytes) where this distckpt has it; otherwise the bytes of every
    ``manifest.json`` read through ``PosixStorage.read_manifest``.
    """
    import distckpt

    try:
        from distckpt import _chunks  # type: ignore[attr-defined]

        # An editable install elsewhere can serve a submodule this checkout lacks:
        # only the measured checkout's own counter counts.
        if Path(_chunks.__file__).parent == Path(distckpt.__file__).parent:
            counter = _chunks.metadata_bytes_read
            return (lambda: int(counter())), "distckpt._chunks.metadata_bytes_read()"
    except (ImportError, AttributeError):
        pass
    from distckpt._storage import posix

    read = posix.PosixStorage.read_manifest
    seen = [0]

    def counted(self: Any) -> bytes | None:
        raw = read(self)
        seen[0] += len(raw) if raw is not None else 0
        return raw

    posix.PosixStorage.read_manifest = counted  # type: ignore[method-assign]
    return (lambda: seen[0]), "manifest.json bytes read (PosixStorage.read_manifest)"


def load_timer() -> Callable[[], tuple[float, float]]:
    """A function giving the seconds and CPU seconds this process has spent in
    ``_commit.load`` (reading, parsing and checking commit records) so far; zeros
    where this distckpt has no such function."""
    from distckpt import _commit

    load = getattr(_commit, "load", None)
    if load is None:
        return lambda: (0.0, 0.0)
    spent = [0.0, 0.0]

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        began, cpu = time.perf_counter(), time.thread_time()
        try:
            return load(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - began
            spent[1] += time.thread_time() - cpu

    _commit.load = timed_load
    return lambda: (spent[0], spent[1])


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------
# Worker: one process of one launch
# ----------------------------------------------------------------------------


def sizes(mode: str, n: int, args: dict) -> dict:
    """Shape of the sharded leaves of ``mode`` on ``n`` processes (rows split over them)."""
    leaves = args["leaves"]
    if mode == "weak":
        shard_bytes = args["weak_bytes"] // leaves
        rows_per_process = max(1, shard_bytes // (4 * COLS))
        rows = rows_per_process * n
    else:  # the same total on every N
        rows = max(1, args["strong_bytes"] // leaves // (4 * COLS))
    return {"rows": rows, "cols": COLS, "leaves": leaves, "replicated": args["replicated"]}


def state_bytes(shape: dict) -> int:
    return 4 * (
        shape["leaves"] * shape["rows"] * shape["cols"] + shape["replicated"] * REPLICATED_ELEMS
    )


def worker(spec_path: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.distributed import global_state
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    spec = json.loads(Path(spec_path).read_text())
    distckpt.initialize()
    pid, n = jax.process_index(), jax.process_count()
    metadata_read, metadata_source = metadata_counter()
    load_seconds = load_timer()
    inner = global_state.client
    counting = Counting(inner) if inner is not None else None
    if counting is not None:
        global_state.client = counting
    mesh = jax.make_mesh((n,), ("x",))
    sharded, replicated = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
    device = jax.local_devices()[0]
    barriers = iter(range(1 << 30))
    timeout_s = spec["op_timeout"]
    reset_ok = reset_peak_rss()
    out: dict[str, Any] = {
        "process": pid,
        "metadata_source": metadata_source,
        "rss_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss",
        "ops": {},
        "save_stats": {},
    }

    def align() -> None:
        gc.collect()
        _malloc_trim()
        if inner is not None and n > 1:
            inner.wait_at_barrier(f"scale/align/{next(barriers)}", 600_000)

    def block(mode_seed: int, leaf: int, process: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([mode_seed, leaf, process])
        return rng.standard_normal((rows, COLS), dtype=np.float32)

    def replicated_value(mode_seed: int, leaf: int) -> np.ndarray:
        return np.random.default_rng([mode_seed, 1 << 20, leaf]).standard_normal(
            REPLICATED_ELEMS, dtype=np.float32
        )

    def build(mode_seed: int, shape: dict) -> dict:
        rows = shape["rows"] // n
        state: dict[str, Any] = {}
        for i in range(shape["leaves"]):
            local = jax.device_put(block(mode_seed, i, pid, rows), device)
            state[f"s{i:05d}"] = jax.make_array_from_single_device_arrays(
                (shape["rows"], COLS), sharded, [local]
            )
        for i in range(shape["replicated"]):
            value = replicated_value(mode_seed, i)
            state[f"r{i:03d}"] = jax.make_array_from_callback(
                value.shape, replicated, value.__getitem__
            )
        return state

    def target(shape: dict) -> dict:
        t: dict[str, Any] = {}
        for i in range(shape["leaves"]):
            t[f"s{i:05d}"] = jax.ShapeDtypeStruct(
                (shape["rows"], COLS), jnp.float32, sharding=sharded
            )
        for i in range(shape["replicated"]):
            t[f"r{i:03d}"] = jax.ShapeDtypeStruct(
                (REPLICATED_ELEMS,), jnp.float32, sharding=replicated
            )
        return t

    def check(restored: dict, mode_seed: int, shape: dict, saved_n: int) -> None:
        """The first and last sharded leaf and one replicated leaf hold what was saved."""
        saved_rows = shape["rows"] // saved_n
        for i in (0, shape["leaves"] - 1):
            (shard,) = restored[f"s{i:05d}"].addressable_shards
            lo, hi, _ = shard.index[0].indices(shape["rows"])
            whole = np.concatenate(
                [
                    block(mode_seed, i, p, saved_rows)
                    for p in range(lo // saved_rows, -(-hi // saved_rows))
                ]
            )
            offset = lo - (lo // saved_rows) * saved_rows
            if not np.array_equal(np.asarray(shard.data), whole[offset : offset + hi - lo]):
                raise AssertionError(f"restored leaf s{i:05d} differs from what was saved")
        if shape["replicated"]:
            got = np.asarray(restored["r000"].addressable_shards[0].data)
            if not np.array_equal(got, replicated_value(mode_seed, 0)):
                raise AssertionError("restored leaf r000 differs from what was saved")

    def timed(
        label: str,
        reps: int,
        call: Callable[[int], Any],
        verify: Callable[[Any], None] | None = None,
    ) -> None:
        """Runs ``call(rep)`` ``warmup + reps`` times, each right after a barrier, and
        records the measured ones; ``verify`` checks the first result, untimed."""
        rec: dict[str, Any] = {
            k: []
            for k in (
                "seconds",
                "cpu_s",
                "load_s",
                "load_cpu_s",
                "metadata_bytes",
                "peak_rss",
                "rss_before",
                "io",
            )
        }
        warmup = spec["warmup"]
        for rep in range(warmup + reps):
            if rep == warmup and counting is not None:
                counting.take(1)  # drop the warm-up's calls
            align()
            rss_before = current_rss_bytes()
            reset_peak_rss()
            io0, meta0, load0 = proc_io(), metadata_read(), load_seconds()
            began, cpu0 = time.perf_counter(), time.process_time()
            result = jax.block_until_ready(call(rep))
            seconds, cpu = time.perf_counter() - began, time.process_time() - cpu0
            io1, meta1, load1 = proc_io(), metadata_read(), load_seconds()
            peak = peak_rss_bytes(reset_ok)
            if rep == 0 and verify is not None:
                verify(result)
            del result  # before the next call allocates its own
            if rep < warmup:
                continue
            rec["seconds"].append(seconds)
            rec["cpu_s"].append(cpu)
            rec["load_s"].append(load1[0] - load0[0])
            rec["load_cpu_s"].append(load1[1] - load0[1])
            rec["metadata_bytes"].append(meta1 - meta0)
            rec["peak_rss"].append(peak)
            rec["rss_before"].append(rss_before)
            rec["io"].append({k: io1[k] - io0.get(k, 0) for k in io1})
        rec["coord"] = counting.take(reps) if counting is not None else {}
        out["ops"][label] = rec
        if pid == 0:
            print(f"{label}: {statistics.median(rec['seconds']):.3f} s (process 0)", flush=True)

    def save_into(root: str, tree: Any, rep: int) -> None:
        distckpt.save(f"{root}/s{rep}", tree, timeout_s=timeout_s)

    def restore_from(path: str, want: Any, rep: int) -> Any:
        return distckpt.restore(path, want, timeout_s=timeout_s)

    with track_phases(counting):
        for mode in spec["measure"]:
            shape, seed = spec["shapes"][mode], MODES.index(mode)
            state = build(seed, shape)
            jax.block_until_ready(state)
            root = f"{spec['dir']}/{mode}-n{n}"
            last = f"{root}/s{spec['warmup'] + spec['reps'] - 1}"
            timed(f"{mode}/save", spec["reps"], partial(save_into, root, state))
            del state
            if pid == 0:  # the save's own timings (blocking, write, commit), untimed here
                measured = range(spec["warmup"], spec["warmup"] + spec["reps"])
                out["save_stats"][mode] = [
                    distckpt.metadata(f"{root}/s{rep}").save_stats for rep in measured
                ]
            timed(
                f"{mode}/restore",
                spec["reps"],
                partial(restore_from, last, target(shape)),
                partial(check, mode_seed=seed, shape=shape, saved_n=n),
            )
            align()
            if pid == 0:  # keep only the checkpoint the N/2 launch restores
                for rep in range(spec["warmup"] + spec["reps"] - 1):
                    shutil.rmtree(f"{root}/s{rep}", ignore_errors=True)
        for mode, path, saved_n in spec["cross"]:
            shape, seed = spec["cross_shapes"][mode], MODES.index(mode)
            timed(
                f"{mode}/cross",
                spec["reps"],
                partial(restore_from, path, target(shape)),
                partial(check, mode_seed=seed, shape=shape, saved_n=saved_n),
            )
        if spec["one_leaf"]:
            four = np.arange(4.0, dtype=np.float32)
            one = {"w": jax.make_array_from_callback((4,), replicated, four.__getitem__)}
            one_want = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)}
            root = f"{spec['dir']}/one-n{n}"
            timed("one/save", spec["small_reps"], partial(save_into, root, one))
            timed(
                "one/restore",
                spec["small_reps"],
                lambda rep: restore_from(f"{root}/s{rep}", one_want, rep),
            )
            if inner is not None and n > 1:
                floors = []
                for rep in range(spec["warmup"] + spec["small_reps"]):
                    align()
                    seconds = floor_3_phases(inner, pid, str(rep))
                    if rep >= spec["warmup"]:
                        floors.append(seconds)
                out["floor_3_phases_s"] = floors
    if counting is not None:
        global_state.client = inner
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime  # the whole process, start-up included
    Path(f"{spec['out']}.p{pid}.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------
# Parent: launches, aggregation, table, targets, plot
# ----------------------------------------------------------------------------


def check_counts(processes: list[int], cases: list[str], args: argparse.Namespace) -> None:
    """Refuses process counts the states cannot be split over, saying the rule."""
    bad = [n for n in processes if n < 1]
    if bad:
        raise SystemExit(f"--processes must be positive, got {bad}")
    if not any(m in cases for m in MODES):
        return
    shape_args = shape_arguments(args)
    for n in processes:
        for mode in MODES:
            rows = sizes(mode, n, shape_args)["rows"]
            for m in (n, max(1, n // 2)):
                if rows % m:
                    raise SystemExit(
                        f"--processes {n}: the {mode} state's leaves have {rows} rows, which "
                        f"{m} processes cannot split evenly (N is saved on N processes and "
                        "restored on N/2); use powers of two, or change --strong-mib/--leaves"
                    )


def shape_arguments(args: argparse.Namespace) -> dict:
    return {
        "leaves": args.leaves,
        "replicated": args.replicated,
        "weak_bytes": int(args.weak_mib * MiB),
        "strong_bytes": int(args.strong_mib * MiB),
    }


def launch(n: int, spec: dict, run_dir: Path, timeout_s: float, env: dict) -> list[dict]:
    """Runs ``n`` worker processes with ``distckpt launch``; returns each one's record."""
    label = f"launch-n{n}"
    spec = {**spec, "out": str(run_dir / label)}
    spec_path = run_dir / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = run_dir / f"{label}.log"
    cmd = [
        sys.executable, "-m", "distckpt.cli", "launch", "-n", str(n), "-d", "1", "--",
        sys.executable, os.path.abspath(__file__), "--worker", str(spec_path),
    ]  # fmt: skip
    with open(log, "wb") as f:
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        why = f"timed out after {timeout_s:g} s" if code is None else f"exited with {code}"
        raise RuntimeError(f"the {n}-process launch {why}; last lines of {log}:\n{tail}")
    return [json.loads(Path(f"{spec['out']}.p{p}.json").read_text()) for p in range(n)]


def aggregate(per: list[dict], label: str) -> dict:
    """One operation over a launch's processes: slowest process per repetition, then medians."""
    recs = [p["ops"][label] for p in per]
    reps = len(recs[0]["seconds"])
    slowest = [max(r["seconds"][i] for r in recs) for i in range(reps)]

    def per_process_median(key: str) -> list[float]:
        return [statistics.median(r[key]) for r in recs]

    def io(key: str) -> list[float]:
        return [statistics.median(x.get(key, 0) for x in r["io"]) for r in recs]

    meta = per_process_median("metadata_bytes")
    cpu = per_process_median("cpu_s")
    load = per_process_median("load_s")
    load_cpu = per_process_median("load_cpu_s") if "load_cpu_s" in recs[0] else [0.0]
    others = [r["coord"] for r in recs[1:]]
    busiest_other = max(others, key=round_trips) if others else None
    return {
        "seconds": statistics.median(slowest),
        "seconds_min": min(slowest),
        "seconds_max": max(slowest),
        "seconds_per_rep": slowest,
        "reps": reps,
        "cpu_s_total": sum(cpu),
        "cpu_s_max": max(cpu),
        "commit_record_load_s_max": max(load),
        "commit_record_load_cpu_s_total": sum(load_cpu),
        "metadata_bytes_read_max": max(meta),
        "metadata_bytes_read_total": sum(meta),
        "peak_rss_bytes_max": max(max(r["peak_rss"]) for r in recs),
        "rss_before_bytes_max": max(max(r["rss_before"]) for r in recs),
        "rchar_total": sum(io("rchar")),
        "wchar_total": sum(io("wchar")),
        "rchar_max": max(io("rchar")),
        "wchar_max": max(io("wchar")),
        "read_bytes_total": sum(io("read_bytes")),
        "write_bytes_total": sum(io("write_bytes")),
        "coord_primary": recs[0]["coord"],
        "coord_other": busiest_other,
        "round_trips_primary": round_trips(recs[0]["coord"]),
        "round_trips_other": round_trips(busiest_other) if busiest_other is not None else 0.0,
        "coord_bytes_primary": sum(
            v["bytes"] for m in recs[0]["coord"].values() for v in m.values()
        ),
        "coord_bytes_other": (
            sum(v["bytes"] for m in busiest_other.values() for v in m.values())
            if busiest_other
            else 0.0
        ),
    }


def evaluate_targets(rows: list[dict], one_leaf: list[dict]) -> list[dict]:
    """The issue's targets, for the smallest and largest N of the run."""
    out = []
    weak = sorted((r for r in rows if r["mode"] == "weak"), key=lambda r: r["processes"])
    if len(weak) >= 2:
        lo, hi = weak[0], weak[-1]
        bytes_growth = hi["total_bytes"] / lo["total_bytes"]
        # Time is the target; CPU seconds summed over processes say the same with
        # less noise from whatever else runs on the machine.
        for op, measure, key in (
            ("save", "time", "seconds"),
            ("restore", "time", "seconds"),
            ("save", "CPU", "cpu_s_total"),
            ("restore", "CPU", "cpu_s_total"),
        ):
            growth = hi[op][key] / lo[op][key]
            steps = [
                math.log2(b[op][key] / a[op][key]) / math.log2(b["processes"] / a["processes"])
                for a, b in zip(weak, weak[1:], strict=False)
            ]
            out.append(
                {
                    "target": f"weak {op} {lo['processes']} -> {hi['processes']} processes: "
                    f"{measure} growth / total-bytes growth",
                    "goal": "<= 1",
                    "measured": growth / bytes_growth,
                    "met": growth <= bytes_growth,
                    "detail": f"{measure} x{growth:.1f}, bytes x{bytes_growth:.1f}; growth "
                    "exponent per doubling of N " + ", ".join(f"{s:.2f}" for s in steps),
                }
            )
    timed_floor = [r for r in one_leaf if r.get("floor_3_phases_s")]
    if timed_floor:
        top = max(timed_floor, key=lambda r: r["processes"])
        ratio = top["save_s"] / top["floor_3_phases_s"]
        out.append(
            {
                "target": f"one-leaf save at {top['processes']} processes / floor of a 3-phase "
                "protocol (3 x (status write + barrier))",
                "goal": "<= 3",
                "measured": ratio,
                "met": ratio <= 3,
                "detail": f"{top['save_s'] * 1e3:.1f} ms / {top['floor_3_phases_s'] * 1e3:.1f} ms",
            }
        )
    return out


def phase_trips(per_phase: dict | None) -> dict[str, float]:
    """Round trips to the coordination service per phase (``save.prepare`` -> ``prepare``)."""
    return {
        phase.split(".", 1)[-1]: sum(v["calls"] for k, v in m.items() if k != "dir_entries_read")
        for phase, m in (per_phase or {}).items()
    }


def table_lines(rows: list[dict], one_leaf: list[dict]) -> list[str]:
    nan = float("nan")
    lines = []
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["processes"])
        if not mine:
            continue
        lines += [
            "",
            f"{mode} scaling: {mine[0]['describe']}",
            "times: medians of the slowest process; CPU s: summed over processes, 'load' the "
            "part spent reading and checking the commit record; save parts: the save's own stats",
            f"{'N':>3} {'MiB':>5} {'save s':>7} {'restore s':>9} {'N->N/2 s':>8} "
            f"{'save CPU':>8} {'rest. CPU':>9} {'load CPU':>8}  "
            f"{'save: blocking/write/commit s':>28}",
        ]
        for r in mine:
            s, rs, cross = r["save"], r["restore"], r.get("cross")
            st = s.get("stats") or {}
            parts = "/".join(f"{st.get(k, nan):.3f}" for k in ("blocking_s", "write_s", "commit_s"))
            lines.append(
                f"{r['processes']:>3} {r['total_bytes'] / MiB:>5.0f} {s['seconds']:>7.3f} "
                f"{rs['seconds']:>9.3f} {cross['seconds'] if cross else nan:>8.3f} "
                f"{s['cpu_s_total']:>8.2f} {rs['cpu_s_total']:>9.2f} "
                f"{rs.get('commit_record_load_cpu_s_total', nan):>8.2f}  {parts:>28}"
            )
        lines += [
            "per process: round trips to the coordination service and their KiB (p0 = primary, "
            "p1 = busiest other); metadata read; peak RSS; MiB written/read (max process)",
            f"{'N':>3} {'trips save':>10} {'trips rest.':>11} {'KiB save':>13} {'KiB rest.':>9} "
            f"{'meta KiB':>8} {'RSS save':>8} {'RSS rest.':>9} {'MiB written':>11} {'MiB read':>8}",
        ]
        for r in mine:
            s, rs = r["save"], r["restore"]
            lines.append(
                f"{r['processes']:>3} {s['round_trips_primary']:>5g}/{s['round_trips_other']:<4g} "
                f"{rs['round_trips_primary']:>6g}/{rs['round_trips_other']:<4g} "
                f"{s['coord_bytes_primary'] / KiB:>7.1f}/{s['coord_bytes_other'] / KiB:<5.1f} "
                f"{rs['coord_bytes_primary'] / KiB:>9.1f} "
                f"{rs['metadata_bytes_read_max'] / KiB:>8.0f} "
                f"{s['peak_rss_bytes_max'] / MiB:>8.0f} {rs['peak_rss_bytes_max'] / MiB:>9.0f} "
                f"{s['wchar_max'] / MiB:>11.1f} {rs['rchar_max'] / MiB:>8.1f}"
            )
    if one_leaf:
        lines += [
            "",
            "one-leaf save and restore, and the floor of a 3-phase protocol (medians, ms)",
            f"{'N':>3} {'save':>7} {'floor':>7} {'x floor':>7} {'restore':>8} "
            f"{'values read/op p1':>17}  round trips per phase p0|p1",
        ]
        for r in sorted(one_leaf, key=lambda r: r["processes"]):
            floor = r.get("floor_3_phases_s")
            primary = {
                **phase_trips(r["save"]["coord_primary"]),
                **phase_trips(r["restore"]["coord_primary"]),
            }
            other = {**phase_trips(r["coord_save_other"]), **phase_trips(r["coord_restore_other"])}
            shown = " ".join(f"{k} {v:g}|{other.get(k, 0):g}" for k, v in primary.items())
            lines.append(
                f"{r['processes']:>3} {r['save_s'] * 1e3:>7.1f} "
                f"{floor * 1e3 if floor else nan:>7.1f} "
                f"{r['save_s'] / floor if floor else nan:>7.2f} "
                f"{r['restore_s'] * 1e3:>8.1f} {values_read(r['calls_per_op']):>17g}  {shown}"
            )
    return lines


def _rows_of(result: dict, mode: str) -> list[dict]:
    return sorted((r for r in result["rows"] if r["mode"] == mode), key=lambda r: r["processes"])


def _plot_scaling(ax: Any, result: dict, mode: str, key: str) -> None:
    """``key`` (seconds or CPU seconds) of save and restore against N, each beside
    its ideal: proportional to the total bytes, from the smallest N."""
    rows = _rows_of(result, mode)
    ns = [r["processes"] for r in rows]
    for op, marker in (("save", "o-"), ("restore", "s-")):
        ts = [r[op][key] for r in rows]
        (line,) = ax.plot(ns, ts, marker, label=op)
        ideal = [ts[0] * r["total_bytes"] / rows[0]["total_bytes"] for r in rows]
        ax.plot(ns, ideal, ":", color=line.get_color(), label=f"{op}: ideal (prop. to bytes)")
    crossed = [r for r in rows if r.get("cross")]
    if crossed:
        ax.plot(
            [r["processes"] for r in crossed],
            [r["cross"][key] for r in crossed],
            "^-",
            label="restore of N's checkpoint onto N/2",
        )
    if key == "seconds":
        ax.set_ylabel("seconds (median, slowest process)")
        ax.set_title(f"{mode} scaling: time\n{rows[0]['describe']}", fontsize=9)
    else:
        ax.set_ylabel("CPU seconds (median, summed over processes)")
        ax.set_title(f"{mode} scaling: CPU of all processes\n{rows[0]['describe']}", fontsize=9)


def _plot_one_leaf(ax: Any, result: dict) -> None:
    rows = sorted(result["one_leaf"], key=lambda r: r["processes"])
    ns = [r["processes"] for r in rows]
    ax.plot(ns, [r["save_s"] * 1e3 for r in rows], "o-", label="one-leaf save")
    ax.plot(ns, [r["restore_s"] * 1e3 for r in rows], "s-", label="one-leaf restore")
    floored = [r for r in rows if r.get("floor_3_phases_s")]
    ax.plot(
        [r["processes"] for r in floored],
        [3e3 * r["floor_3_phases_s"] for r in floored],
        "k--",
        label="3 x floor (3 x (status write + barrier))",
    )
    ax.set_ylabel("milliseconds (median, slowest process)")
    ax.set_title("one-leaf save and restore\n(the floor measured in the same job)", fontsize=9)


def _plot_per_process(ax: Any, result: dict) -> None:
    """What one process reads: metadata per restore, coordination bytes per save (primary)."""
    for mode, style in (("weak", "-"), ("strong", "--")):
        rows = _rows_of(result, mode)
        ns = [r["processes"] for r in rows]
        if not rows:
            continue
        ax.plot(
            ns,
            [r["restore"]["metadata_bytes_read_max"] / KiB for r in rows],
            "o" + style,
            color="tab:purple",
            label=f"{mode}: metadata read per process, restore",
        )
        ax.plot(
            ns,
            [r["save"]["coord_bytes_primary"] / KiB for r in rows],
            "s" + style,
            color="tab:brown",
            label=f"{mode}: coordination bytes of the primary, save",
        )
    ax.set_ylabel("KiB per process per operation")
    ax.set_title("what one process reads\n(independent of N would be flat)", fontsize=9)


def plot(result: dict, path: str) -> str | None:
    """Time and CPU against N for weak and strong scaling beside their ideal lines, the
    one-leaf save against 3x the 3-phase floor, and the per-process bytes that grow
    with N. Returns why not, if it could not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed"
    modes = [m for m in MODES if _rows_of(result, m)]
    # Row 1: time of each mode, one-leaf latency; row 2: CPU of each mode, per-process bytes.
    Panel = Callable[[Any], None] | None
    pad: list[Panel] = [None] * (len(MODES) - len(modes))
    top: list[Panel] = [partial(_plot_scaling, result=result, mode=m, key="seconds") for m in modes]
    top += pad + [partial(_plot_one_leaf, result=result) if result["one_leaf"] else None]
    bottom: list[Panel] = [
        partial(_plot_scaling, result=result, mode=m, key="cpu_s_total") for m in modes
    ]
    bottom += pad + [partial(_plot_per_process, result=result) if modes else None]
    panels = [p for row in (top, bottom) if any(row) for p in row]
    if not panels:
        return "nothing to plot"
    columns = len(MODES) + 1
    rows = len(panels) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.4 * columns, 4.3 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels, strict=True):
        if draw is None:
            ax.axis("off")
            continue
        draw(ax)
        ns = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("processes (1 CPU device each)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"distckpt {result['revision']}: save and restore against the process count, "
        f"{result['machine']['nproc']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    plt.close(fig)
    try:  # a 256-colour palette: a third of the bytes for a figure of lines and text
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=256).save(path, optimize=True)
    except ImportError:
        Path(path).write_bytes(buf.getvalue())
    return None


def machine_info() -> dict:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    for pkg in ("jax", "jaxlib", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    return info


def revision(source: Path) -> str:
    """The commit of the measured distckpt, with "+dirty" if its distckpt/ has edits."""
    try:
        git = ["git", "-C", str(source)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "distckpt"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--processes", default=None, help="comma-separated N (default 2,4,8,16,32; --quick 2,4)"
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    p.add_argument(
        "--leaves", type=int, default=None, help="sharded leaves (default 1024; --quick 64)"
    )
    p.add_argument("--replicated", type=int, default=8, help="replicated 4 KiB leaves (default 8)")
    p.add_argument(
        "--weak-mib",
        type=float,
        default=None,
        help="weak: MiB per process (default 8; --quick 0.25)",
    )
    p.add_argument(
        "--strong-mib", type=float, default=None, help="strong: total MiB (default 256; --quick 1)"
    )
    p.add_argument(
        "--reps", type=int, default=None, help="measured saves and restores (default 3; --quick 2)"
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions first (default 1)")
    p.add_argument(
        "--small-reps", type=int, default=None, help="one-leaf repetitions (default 10; --quick 3)"
    )
    p.add_argument(
        "--quick", action="store_true", help="2 and 4 processes, a tiny state: checks the script"
    )
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the run directory is made")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and worker logs")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--plot", help="write time against N here (PNG, needs matplotlib)")
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds one launch may take (default 900)"
    )
    p.add_argument("--op-timeout", type=float, default=300, help="timeout_s of every distckpt call")
    p.add_argument("--from-json", help="print and plot a saved --json result instead of running")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "processes": "2,4" if quick else "2,4,8,16,32",
        "leaves": 64 if quick else 1024,
        "weak_mib": 0.25 if quick else 8,
        "strong_mib": 1 if quick else 256,
        "reps": 2 if quick else 3,
        "small_reps": 3 if quick else 10,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"--cases: unknown {sorted(unknown)}; choose from {','.join(CASES)}")
    for name in ("leaves", "reps", "small_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def describe(mode: str, shape_args: dict) -> str:
    if mode == "weak":
        return (
            f"{shape_args['weak_bytes'] / MiB:g} MiB per process in {shape_args['leaves']} "
            f"sharded leaves + {shape_args['replicated']} replicated"
        )
    return (
        f"{shape_args['strong_bytes'] / MiB:g} MiB in total in {shape_args['leaves']} "
        f"sharded leaves + {shape_args['replicated']} replicated"
    )


def summarise(
    per_launch: dict[int, list[dict]], processes: list[int], cases: list[str], shape_args: dict
) -> tuple[list[dict], list[dict]]:
    """Rows per mode and N, and one-leaf rows per N, from every launch's records."""
    rows, one_leaf = [], []
    for n in processes:
        per = per_launch.get(n)
        if per is None:
            continue  # the launch failed; its error is reported
        for m in (m for m in MODES if m in cases):
            shape = sizes(m, n, shape_args)
            row: dict[str, Any] = {
                "mode": m,
                "processes": n,
                "describe": describe(m, shape_args),
                "shape": shape,
                "total_bytes": state_bytes(shape),
                "save": aggregate(per, f"{m}/save"),
                "restore": aggregate(per, f"{m}/restore"),
                "cross": None,
            }
            stats = [x for x in per[0]["save_stats"].get(m, []) if x]
            if stats:  # medians of the measured saves' own timings
                row["save"]["stats"] = {
                    k: statistics.median(x[k] for x in stats)
                    for k in ("blocking_s", "write_s", "commit_s")
                }
            half = per_launch.get(max(1, n // 2))
            if half is not None and f"{m}/cross" in half[0]["ops"]:
                row["cross"] = {"processes": len(half), **aggregate(half, f"{m}/cross")}
            rows.append(row)
        if "one-leaf" in cases:
            save, restore = aggregate(per, "one/save"), aggregate(per, "one/restore")
            floors = per[0].get("floor_3_phases_s")
            floor = None
            if floors:
                floor = statistics.median(
                    max(p["floor_3_phases_s"][i] for p in per) for i in range(len(floors))
                )
            both = Counter(totals(save["coord_other"] or {}))
            both.update(totals(restore["coord_other"] or {}))
            one_leaf.append(
                {
                    "processes": n,
                    "save_s": save["seconds"],
                    "restore_s": restore["seconds"],
                    "floor_3_phases_s": floor,
                    "save": save,
                    "restore": restore,
                    "coord_save_other": save["coord_other"],
                    "coord_restore_other": restore["coord_other"],
                    # a non-primary's calls per operation (save and restore alike)
                    "calls_per_op": {k: v / 2 for k, v in both.items()},
                }
            )
    return rows, one_leaf


def report(result: dict, args: argparse.Namespace) -> None:
    """The tables, the targets, and the JSON and plot if asked."""
    for line in table_lines(result["rows"], result["one_leaf"]):
        print(line)
    print(f"\nmetadata bytes: {result['metadata_source']}; peak RSS: {result['rss_method']}")
    for n, why in result["errors"].items():
        print(f"ERROR: {n} processes: {why}")
    for t in result["targets"]:
        verdict = "met" if t["met"] else "NOT MET"
        print(f"{t['target']}: {t['measured']:.2f} (goal {t['goal']}) {verdict}; {t['detail']}")
    print(
        f"{result['wall_s']:.0f} s; load average {result['loadavg_start'][0]:.1f} at start, "
        f"{result['loadavg_end'][0]:.1f} at end"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        why = plot(result, args.plot)
        print(f"skipping --plot {args.plot}: {why}" if why else f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["targets"] = evaluate_targets(result["rows"], result["one_leaf"])
        report(result, args)
        return 0
    import distckpt

    source = Path(distckpt.__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    processes = sorted({int(x) for x in args.processes.split(",")})
    cases = args.cases.split(",")
    check_counts(processes, cases, args)
    modes = [m for m in MODES if m in cases]
    shape_args = shape_arguments(args)
    # One launch per N, largest first, so that N/2 processes restore what N saved.
    halves = {max(1, n // 2) for n in processes} if modes else set()
    launches = sorted(set(processes) | halves, reverse=True)
    load_start = os.getloadavg()
    print(
        f"distckpt from {source} ({revision(source)}); launches: {launches}; "
        f"load average {load_start[0]:.1f}"
    )
    started = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="distckpt-scale-", dir=args.dir))
    per_launch: dict[int, list[dict]] = {}
    errors: dict[int, str] = {}
    launch_stats: dict[int, dict] = {}
    last = f"s{args.warmup + args.reps - 1}"  # the save a restore reads
    try:
        for n in launches:
            saved = 2 * n if modes and 2 * n in processes and 2 * n in per_launch else None
            spec = {
                "dir": f"{run_dir}/ckpt",
                "measure": modes if n in processes else [],
                "shapes": {m: sizes(m, n, shape_args) for m in modes},
                "cross": [[m, f"{run_dir}/ckpt/{m}-n{saved}/{last}", saved] for m in modes]
                if saved
                else [],
                "cross_shapes": {m: sizes(m, saved, shape_args) for m in modes} if saved else {},
                "one_leaf": n in processes and "one-leaf" in cases,
                "reps": args.reps,
                "warmup": args.warmup,
                "small_reps": args.small_reps,
                "op_timeout": args.op_timeout,
            }
            began = time.perf_counter()
            try:
                per_launch[n] = launch(n, spec, run_dir, args.timeout, env)
                wall = time.perf_counter() - began
                cpu = sum(p["cpu_s"] for p in per_launch[n])
                # How much of the machine the workers got: well under 1 when others ran.
                share = cpu / (wall * (os.cpu_count() or 1))
                launch_stats[n] = {"wall_s": wall, "cpu_s": cpu, "cpu_share": share}
                print(
                    f"  {n} processes: {wall:.0f} s, {cpu:.0f} CPU s ({share:.0%} of the machine)"
                )
            except RuntimeError as e:
                errors[n] = str(e)
                print(f"  {n} processes: FAILED after {time.perf_counter() - began:.0f} s")
            for m in modes if saved else ():
                shutil.rmtree(f"{run_dir}/ckpt/{m}-n{saved}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"kept {run_dir}")
    rows, one_leaf = summarise(per_launch, processes, cases, shape_args)
    first = next(iter(per_launch.values()), [{}])[0]
    result = {
        "revision": revision(source),
        "distckpt": str(source),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "from_json")},
        "launches": launches,
        "launch_stats": launch_stats,
        "metadata_source": first.get("metadata_source"),
        "rss_method": first.get("rss_method"),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "rows": rows,
        "one_leaf": one_leaf,
        "targets": evaluate_targets(rows, one_leaf),
        "errors": errors,
    }
    report(result, args)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
