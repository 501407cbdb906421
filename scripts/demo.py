"""`make demo`: 2 processes x 4 CPU devices save a sharded train state, then
1 process with 8 devices restores it onto a different mesh and checks it.

Run it with `make demo` (or `.venv/bin/python scripts/demo.py`). Each phase
runs as real OS processes that form one JAX job over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

SHAPE = (512, 256)


def _expected():
    import numpy as np

    w = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) / 1000
    return {"w": w, "b": np.linspace(0, 1, SHAPE[1], dtype=np.float32), "step": 1000}


def _init(process_id: int, num_processes: int, port: int) -> None:
    import jax

    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=10,
            shutdown_timeout_seconds=10,
        )


def worker_save(directory: str, process_id: int, port: int) -> None:
    _init(process_id, 2, port)
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    ref = _expected()
    state = {
        "params": {
            "w": jax.make_array_from_callback(
                SHAPE, NamedSharding(mesh, P("data", "model")), lambda i: ref["w"][i]
            ),
            "b": jax.make_array_from_callback(
                SHAPE[1:], NamedSharding(mesh, P()), lambda i: ref["b"][i]
            ),
        },
        "step": ref["step"],
        "rng": jax.random.key(42),
    }
    t = time.perf_counter()
    distckpt.save(directory, state, metadata={"demo": True})
    print(
        f"[process {jax.process_index()}] saved {len(jax.tree.leaves(state))} leaves "
        f"with mesh {dict(mesh.shape)} in {time.perf_counter() - t:.2f} s",
        flush=True,
    )


def worker_restore(directory: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    info = distckpt.metadata(directory)
    print(
        f"[restore] checkpoint written by {info.process_count} processes / {info.device_count} devices:"
    )
    for path, leaf in info.leaves.items():
        print(f"    {path:22s} {leaf.kind:8s} {str(leaf.shape):12s} {leaf.dtype}  {leaf.sharding}")
    mesh = jax.make_mesh((4, 2), ("rows", "cols"))
    target = {
        "params": {
            "w": jax.ShapeDtypeStruct(
                SHAPE, jnp.float32, sharding=NamedSharding(mesh, P("cols", "rows"))
            ),
            "b": jax.ShapeDtypeStruct(
                SHAPE[1:], jnp.float32, sharding=NamedSharding(mesh, P("rows"))
            ),
        },
        "step": 0,
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
    }
    t = time.perf_counter()
    state = distckpt.restore(directory, target)
    took = time.perf_counter() - t
    ref = _expected()
    assert state["step"] == ref["step"]
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), ref["w"])
    np.testing.assert_array_equal(np.asarray(state["params"]["b"]), ref["b"])
    assert state["params"]["w"].sharding.spec == P("cols", "rows")
    np.testing.assert_array_equal(
        jax.random.key_data(state["rng"]), jax.random.key_data(jax.random.key(42))
    )
    report = distckpt.verify(directory)
    print(
        f"[restore] 1 process x {jax.device_count()} devices, mesh {dict(mesh.shape)}: restored in {took:.2f} s"
    )
    print(f"[restore] w is now sharded {state['params']['w'].sharding.spec}; values match")
    print(
        f"[restore] verify: {report.chunks} chunks, {report.bytes_checked} bytes, every crc32c ok"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, __file__, *args], env=env)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while procs:
            for p in list(procs):
                code = p.poll()
                if code is None:
                    continue
                procs.remove(p)
                if code != 0:
                    raise SystemExit(f"demo: a worker exited with code {code}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: workers still running after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    if len(sys.argv) > 1:
        role, *rest = sys.argv[1:]
        if role == "save":
            worker_save(rest[0], int(rest[1]), int(rest[2]))
        else:
            worker_restore(rest[0])
        return
    with tempfile.TemporaryDirectory(prefix="distckpt-demo-") as tmp:
        directory = os.path.join(tmp, "step_00001000")
        port = _free_port()
        print(f"demo: 2 processes x 4 CPU devices save to {directory}")
        _wait_all([_spawn(["save", directory, str(i), str(port)], 4) for i in range(2)], 120)
        files = sorted(
            os.path.relpath(os.path.join(r, f), directory)
            for r, _, fs in os.walk(directory)
            for f in fs
        )
        print("demo: on disk:", json.dumps(files))
        print("demo: 1 process x 8 CPU devices restores onto a (4, 2) mesh")
        _wait_all([_spawn(["restore", directory], 8)], 120)
    print("demo: OK")


if __name__ == "__main__":
    main()
