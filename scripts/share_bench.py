"""Read once, then share: bytes read from storage and time of a restore, sharing off and on.

For each layout (processes x devices per process, replica groups), the job
saves a float32 state of ``--size`` MiB in ``--leaves`` leaves, each
process writing its part (``PartitionSpec(("replica", "fsdp"))``), then
restores it onto ``PartitionSpec("fsdp")`` of a ``("replica", "fsdp")``
mesh whose replica axis spans processes: every replica group needs the
whole state. Each restore runs with ``share=False`` (off) and ``share=None``
(auto, the default), or the ``--modes`` given (``on``: ``share=True``),
in rotating order, ``--reps`` times after one warm-up each, and records
per process:

* bytes read from storage: every data read counted by a wrapper around the
  POSIX reader (exact), and ``/proc/self/io`` rchar (every ``read(2)``,
  whatever it reads; the coordination service's and gloo's sockets too);
* peak memory the restore added (RSS: on CPU device memory is host memory),
  the largest over processes;
* seconds, the job's being the slowest process's: the median of the
  measured restores, and the first of each mode (after one untimed restore
  without sharing), which compiles the gathers: a job restores once, so
  that one is what it pays.

The data files sit in the page cache after the save, so storage here is as
fast as memory copies: the best case for reading everything, the worst for
sharing. On storage slower than the job's interconnect (a network
filesystem, an object store) the bytes saved are time saved.

    .venv/bin/python scripts/share_bench.py                       # 1 GiB, 3 layouts
    .venv/bin/python scripts/share_bench.py --size 256 --layouts 2x2:2 --json out.json
    .venv/bin/python scripts/share_bench.py --leaves 1024 --modes off,auto,on --layouts 2x2:2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_worker import read_proc_io, status_kib  # scripts/ is on the path of a script

MiB = 1 << 20
COLUMNS = 1024


def _reset_peak() -> None:
    """Returns freed heap to the kernel, then restarts VmHWM from the current RSS (Linux
    >= 4.0), so that the next peak is this restore's and not helped by the last one's."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _value(leaf: int, index: tuple, shape: tuple) -> object:
    import numpy as np

    rows = np.arange(shape[0], dtype=np.float32)[index[0]]
    cols = np.arange(shape[1], dtype=np.float32)[index[1]]
    return (rows[:, None] * 7 + cols[None, :] + leaf).astype(np.float32)


MODES = {"off": False, "auto": None, "on": True}  # -> restore(share=)


def worker(
    directory: str, groups: int, size_mib: int, leaves: int, reps: int, names: str, out: str
) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt
    from distckpt._storage import posix

    distckpt.initialize()
    mesh = Mesh(np.array(jax.devices()).reshape(groups, -1), ("replica", "fsdp"))
    rows = size_mib * MiB // (leaves * COLUMNS * 4)
    shape = (rows, COLUMNS)
    saved = NamedSharding(mesh, P(("replica", "fsdp")))
    state = {
        f"l{i:03d}": jax.make_array_from_callback(
            shape, saved, lambda idx, i=i: _value(i, idx, shape)
        )
        for i in range(leaves)
    }
    distckpt.save(directory, state)
    del state
    target_sharding = NamedSharding(mesh, P("fsdp"))
    target = {
        f"l{i:03d}": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=target_sharding)
        for i in range(leaves)
    }

    counted = {"bytes": 0}
    read = posix._PosixReader.read

    def counting(self, name, offset, nbytes, out=None):  # type: ignore[no-untyped-def]
        counted["bytes"] += nbytes
        return read(self, name, offset, nbytes, out)

    posix._PosixReader.read = counting  # type: ignore[method-assign]

    modes = {m: MODES[m] for m in names.split(",")}
    # The process's first restore pays for first touches whatever the mode; after
    # this one, a mode's first restore differs from its later ones by what it
    # compiles (the gathers, if it shares).
    jax.block_until_ready(distckpt.restore(directory, target, share=False))
    records: dict[str, list[dict]] = {m: [] for m in modes}
    first: dict[str, float] = {}
    for rep in range(reps + 1):  # rep 0 warms up (compilation, first touch)
        order = list(modes)[rep % len(modes) :] + list(modes)[: rep % len(modes)]
        for mode in order:
            gc.collect()
            multihost_utils.sync_global_devices(f"{mode}-{rep}-begin")
            _reset_peak()
            counted["bytes"], rchar, rss = 0, read_proc_io()["rchar"], status_kib("VmRSS")
            began = time.perf_counter()
            restored = distckpt.restore(directory, target, share=modes[mode])
            jax.block_until_ready(restored)
            seconds = time.perf_counter() - began
            record = {
                "seconds": seconds,
                "storage_bytes": counted["bytes"],
                "rchar": read_proc_io()["rchar"] - rchar,
                # On CPU device memory is host memory: what the restore added at its peak.
                "peak_mib": (status_kib("VmHWM") - rss) / 1024,
            }
            if rep == reps:  # check the values once, outside the timed part
                for name, arr in restored.items():
                    for shard in arr.addressable_shards:
                        want = _value(int(name[1:]), shard.index, shape)
                        if not np.array_equal(np.asarray(shard.data), want):
                            raise AssertionError(f"{mode}: {name} {shard.index} differs")
            del restored
            if rep:
                records[mode].append(record)
            else:
                first[mode] = seconds
            multihost_utils.sync_global_devices(f"{mode}-{rep}-end")
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump({"records": records, "first": first, "nbytes": rows * COLUMNS * 4 * leaves}, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="state size in MiB")
    parser.add_argument("--leaves", type=int, default=16, help="number of leaves")
    parser.add_argument("--reps", type=int, default=3, help="measured restores per mode")
    parser.add_argument(
        "--layouts",
        default="2x2:2,4x1:2,4x1:4",
        help="processes x devices : replica groups, comma-separated",
    )
    parser.add_argument(
        "--modes", default="off,auto", help="share settings: off, auto (the default), on"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        d, g, s, n, r, m, o = args.worker
        worker(d, int(g), int(s), int(n), int(r), m, o)
        return 0
    import distckpt

    print(
        f"distckpt from {Path(distckpt.__file__).parent}; {args.size} MiB, {args.leaves} "
        f"leaves; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'layout':>7} {'groups':>6} {'share':>5} {'read/ckpt':>9} {'rchar/ckpt':>10} "
        f"{'per process MiB':>22} {'restore s':>9} {'first s':>7} {'peak MiB':>8}"
    )
    rows = []
    for layout in args.layouts.split(","):
        topology, groups = layout.split(":")
        processes, devices = (int(x) for x in topology.split("x"))
        with tempfile.TemporaryDirectory(prefix="distckpt-share-") as tmp:
            out = os.path.join(tmp, "result")
            cmd = [
                sys.executable, "-m", "distckpt.cli", "launch", "-n", str(processes),
                "-d", str(devices), "--", sys.executable, __file__, "--worker", f"{tmp}/ckpt",
                groups, str(args.size), str(args.leaves), str(args.reps), args.modes, out,
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            per = [json.load(open(f"{out}.{p}")) for p in range(processes)]
        nbytes = per[0]["nbytes"]
        for mode in args.modes.split(","):
            reps = range(args.reps)
            recs = [[p["records"][mode][i] for p in per] for i in reps]
            storage = statistics.median(sum(r["storage_bytes"] for r in rec) for rec in recs)
            rchar = statistics.median(sum(r["rchar"] for r in rec) for rec in recs)
            seconds = statistics.median(max(r["seconds"] for r in rec) for rec in recs)
            peak = statistics.median(max(r["peak_mib"] for r in rec) for rec in recs)
            each = [
                statistics.median(rec[p]["storage_bytes"] for rec in recs) for p in range(processes)
            ]
            row = {
                "layout": topology,
                "replica_groups": int(groups),
                "share": mode,
                "checkpoint_bytes": nbytes,
                "storage_bytes": storage,
                "storage_per_checkpoint": storage / nbytes,
                "rchar_per_checkpoint": rchar / nbytes,
                "storage_bytes_per_process": each,
                "seconds": seconds,
                "peak_mib_over_before": peak,
                "seconds_all": [max(r["seconds"] for r in rec) for rec in recs],
                # The warm-up restore: compilation of the gathers included.
                "first_seconds": max(p["first"][mode] for p in per),
            }
            rows.append(row)
            shown = "/".join(f"{b / MiB:.0f}" for b in each)
            print(
                f"{topology:>7} {groups:>6} {mode:>5} {storage / nbytes:>9.2f} "
                f"{rchar / nbytes:>10.2f} {shown:>22} {seconds:>9.2f} "
                f"{row['first_seconds']:>7.2f} {peak:>8.0f}"
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
