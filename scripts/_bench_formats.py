"""The formats case of scripts/bench.py: restoring other formats' checkpoints, 2 processes.

    python scripts/_bench_formats.py GIB REPS    # parent: launches the processes, prints JSON

Two processes x 4 CPU devices join one job (``jax.distributed`` on
127.0.0.1); the state is 16 float32 leaves of GIB/16 each, on mesh (2, 4),
PartitionSpec('x', 'y'). Rows (seconds: the slowest process; median of REPS):

* an Orbax checkpoint written by orbax-checkpoint's StandardCheckpointer
  (defaults: OCDBT, zarr) from the 2 processes, restored onto the same
  sharding by ``distckpt.restore`` and by ``StandardCheckpointer.restore``;
* a Hugging Face sharded safetensors directory (``model-0000k-of-0000N`` of
  about GIB/4 each + ``model.safetensors.index.json``) written by the
  ``safetensors`` package, restored by ``distckpt.restore`` and by
  ``safetensors.numpy.load_file`` of every shard followed by
  ``jax.device_put`` of each tensor onto the target sharding (what a loader
  without offsets does: every process reads every file).

Files are in the page cache (just written): these are warm restores, as in
the large case of bench.py without ``--cold``. Every restore of the first
repetition is checked against the saved values, shard by shard.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

LEAVES = 16


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _values(i: int, shape: tuple) -> np.ndarray:
    return np.random.default_rng([7, i]).standard_normal(shape, dtype=np.float32)


def worker(root: str, gib: float, reps: int) -> dict:
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from safetensors.numpy import load_file, save_file

    import distckpt

    pid = jax.process_index()
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    side = int((gib * (1 << 30) / LEAVES / 4) ** 0.5) // 8 * 8
    shape = (side, side)
    names = [f"model.layers.{i}.w" for i in range(LEAVES)]
    full = {n: _values(i, shape) for i, n in enumerate(names)}
    state = {
        "model": {
            "layers": {
                str(i): {
                    "w": jax.make_array_from_callback(shape, sharding, lambda x, a=full[n]: a[x])
                }
                for i, n in enumerate(names)
            }
        }
    }
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state
    )
    nbytes = LEAVES * side * side * 4

    # The inputs, written by the real tools.
    orbax_dir = os.path.join(root, "orbax")
    with ocp.StandardCheckpointer() as ck:
        ck.save(orbax_dir, state)
        ck.wait_until_finished()
    hf_dir = os.path.join(root, "hf")
    shards = [names[k : k + LEAVES // 4] for k in range(0, LEAVES, LEAVES // 4)]
    files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    if pid == 0:
        os.makedirs(hf_dir)
        for file, members in zip(files, shards, strict=True):
            save_file({n: full[n] for n in members}, os.path.join(hf_dir, file))
        weight_map = {n: f for f, members in zip(files, shards, strict=True) for n in members}
        with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, f)
    del state
    multihost_utils.sync_global_devices("inputs written")

    def check(tree: dict) -> None:
        for i, n in enumerate(names):
            arr = tree["model"]["layers"][str(i)]["w"]
            for s in arr.addressable_shards:
                if not np.array_equal(np.asarray(s.data), full[n][s.index]):
                    raise AssertionError(f"{n}: shard {s.index} differs")

    def st_loader() -> dict:
        out: dict = {"model": {"layers": {}}}
        for file in files:
            loaded = load_file(os.path.join(hf_dir, file))
            for n, arr in loaded.items():
                out["model"]["layers"][n.split(".")[2]] = {"w": jax.device_put(arr, sharding)}
        return out

    ckptr = ocp.StandardCheckpointer()
    runs = {
        ("orbax", "distckpt"): lambda: distckpt.restore(orbax_dir, target, timeout_s=600),
        ("orbax", "orbax"): lambda: ckptr.restore(orbax_dir, target),
        ("safetensors", "distckpt"): lambda: distckpt.restore(hf_dir, target, timeout_s=600),
        ("safetensors", "safetensors+device_put"): st_loader,
    }
    out: dict = {f"{a}/{b}": [] for a, b in runs}
    for rep in range(reps + 1):  # the first is a warm-up, checked, not counted
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for key in order:
            multihost_utils.sync_global_devices(f"{key}-{rep}")
            r0, t0 = _rchar(), time.perf_counter()
            tree = runs[key]()
            jax.block_until_ready(tree)
            seconds, read = time.perf_counter() - t0, _rchar() - r0
            if rep == 0:
                check(tree)
            else:
                out[f"{key[0]}/{key[1]}"].append({"seconds": seconds, "rchar": read})
            del tree
    ckptr.close()
    multihost_utils.sync_global_devices("done")
    return {"process": pid, "bytes": nbytes, "files": len(files), "runs": out}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent(gib: float, reps: int, timeout_s: float = 1800) -> dict:
    root = tempfile.mkdtemp(prefix="distckpt-bench-formats-")
    port = _free_port()
    procs = []
    try:
        for pid in range(2):
            env = dict(os.environ)
            env.update(
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=4",
                BENCH_FORMATS_PROCESS=str(pid),
                BENCH_FORMATS_PORT=str(port),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(gib), str(reps), root],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout_s
        results = []
        for p in procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the formats case took more than {timeout_s:g} s") from None
            if p.returncode != 0:
                raise RuntimeError(f"a formats worker failed ({p.returncode}):\n{stderr[-3000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for key in results[0]["runs"]:
        fmt, system = key.split("/")
        per_rep = [max(r["runs"][key][i]["seconds"] for r in results) for i in range(reps)]
        rchar = [r["runs"][key][-1]["rchar"] for r in results]
        rows.append(
            {
                "format": fmt,
                "system": system,
                "seconds": sorted(per_rep)[len(per_rep) // 2],
                "all_seconds": per_rep,
                "read_per_process": rchar,
            }
        )
    return {"bytes": results[0]["bytes"], "files": results[0]["files"], "reps": reps, "rows": rows}


if __name__ == "__main__":
    gib, reps = float(sys.argv[1]), int(sys.argv[2])
    if "BENCH_FORMATS_PROCESS" in os.environ:
        import jax

        jax.distributed.initialize(
            f"127.0.0.1:{os.environ['BENCH_FORMATS_PORT']}",
            num_processes=2,
            process_id=int(os.environ["BENCH_FORMATS_PROCESS"]),
            initialization_timeout=120,
        )
        print(json.dumps(worker(sys.argv[3], gib, reps)))
    else:
        print(json.dumps(parent(gib, reps)))
