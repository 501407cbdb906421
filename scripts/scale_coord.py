"""How coordination cost grows with the number of processes: counts and times of small saves.

Runs ``distckpt launch -n N -d 1`` for each N, and in every process saves
and restores a one-leaf tree ``--reps`` times, counting what each process
asks of the coordination service (by method, through a counting wrapper of
the client) and timing each call. Prints one line per N and writes JSON.
What grows with N in a phase is what this shows: reads of other processes'
statuses grow as O(N) per process (O(N^2) at the coordinator); a phase that
reads only the failures and the primary's payload stays flat. Each N also
times the floor of any 3-phase protocol on the same job: 3 x (one status
write and a barrier), so "x fl" is a save's latency against that floor.

    .venv/bin/python scripts/scale_coord.py --processes 2,4,8,16 --json out.json
    PYTHONPATH=/path/to/other/checkout .venv/bin/python scripts/scale_coord.py ...

The second form measures another checkout of distckpt with the same script
(the workers import whatever ``distckpt`` is first on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def worker(directory: str, reps: int, out: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax._src.distributed import global_state
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    distckpt.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = NamedSharding(mesh, P())
    state = {"w": jax.make_array_from_callback((4,), sharding, lambda i: jnp.arange(4.0)[i])}
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}

    class Counting:
        def __init__(self, inner: object):
            self.inner, self.calls = inner, Counter()

        def __getattr__(self, name: str) -> object:
            method = getattr(self.inner, name)

            def call(*args: object, **kwargs: object) -> object:
                self.calls[name] += 1
                result = method(*args, **kwargs)
                if name == "key_value_dir_get":  # what a listing returns grows with N
                    self.calls["dir_entries_read"] += len(result)
                return result

            return call

    distckpt.save(f"{directory}/warm", state)  # first-call costs out of the way
    counting = Counting(global_state.client)
    global_state.client = counting
    saves, restores = [], []
    try:
        for i in range(reps):
            began = time.perf_counter()
            distckpt.save(f"{directory}/s{i}", state)
            saves.append(time.perf_counter() - began)
            began = time.perf_counter()
            distckpt.restore(f"{directory}/s{i}", target)
            restores.append(time.perf_counter() - began)
    finally:
        global_state.client = counting.inner
    # The floor of any 3-phase protocol on this job: 3 x (a status write and a barrier).
    client, pid, floor = counting.inner, jax.process_index(), []
    for i in range(reps):
        began = time.perf_counter()
        for phase in range(3):
            client.key_value_set(f"floor/{i}/{phase}/{pid}", "ok")
            client.wait_at_barrier(f"floor/{i}/{phase}", 60_000)
        floor.append(time.perf_counter() - began)
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump(
            {
                "save_s": saves,
                "restore_s": restores,
                "floor_s": floor,
                "calls_per_op": {k: v / (2 * reps) for k, v in counting.calls.items()},
            },
            f,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="2,4,8,16", help="comma-separated process counts")
    parser.add_argument("--reps", type=int, default=10, help="saves and restores per process")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    import distckpt

    rows = []
    print(f"distckpt from {Path(distckpt.__file__).parent}")
    print(
        f"{'N':>4} {'save ms':>9} {'floor ms':>9} {'x fl':>6} {'restore ms':>11} "
        f"{'values read/op, p1':>20}  calls/op"
    )
    for n in [int(x) for x in args.processes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="distckpt-scale-") as tmp:
            out = os.path.join(tmp, "result")
            cmd = [
                sys.executable, "-m", "distckpt.cli", "launch", "-n", str(n), "-d", "1", "--",
                sys.executable, __file__, "--worker", f"{tmp}/ckpt", str(args.reps), out,
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            per = [json.load(open(f"{out}.{p}")) for p in range(n)]
        save = statistics.median(max(p["save_s"][i] for p in per) for i in range(args.reps))
        restore = statistics.median(max(p["restore_s"][i] for p in per) for i in range(args.reps))
        floor = statistics.median(max(p["floor_s"][i] for p in per) for i in range(args.reps))
        calls = per[1]["calls_per_op"]
        reads = sum(v for k, v in calls.items() if "get" in k and k != "key_value_dir_get")
        reads += calls.get("dir_entries_read", 0)
        row = {
            "processes": n,
            "save_s": save,
            "restore_s": restore,
            "floor_3_phases_s": floor,
            "calls_per_op": calls,
        }
        rows.append(row)
        shown = ", ".join(f"{k.replace('key_value_', '')}={v:g}" for k, v in sorted(calls.items()))
        print(
            f"{n:>4} {save * 1e3:>9.1f} {floor * 1e3:>9.1f} {save / floor:>6.2f} "
            f"{restore * 1e3:>11.1f} {reads:>20g}  {shown}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
