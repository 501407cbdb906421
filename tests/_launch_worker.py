"""Scripts that `distckpt launch` runs in tests/test_launch.py: python -m tests._launch_worker MODE DIR."""

from __future__ import annotations

import json
import os
import sys
import time


def main(mode: str, directory: str) -> int:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    found = distckpt.initialize()
    me = jax.process_index()
    print(
        json.dumps(
            {
                "found": found,
                "process": me,
                "count": jax.process_count(),
                "devices": jax.device_count(),
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    if mode == "save":
        mesh = jax.make_mesh((jax.device_count(),), ("x",))
        sharding = NamedSharding(mesh, P("x"))
        x = jax.make_array_from_callback((64,), sharding, lambda i: np.arange(64.0)[i])
        distckpt.save(directory, {"x": x}, timeout_s=30)
        back = distckpt.restore(
            directory, {"x": jax.ShapeDtypeStruct((64,), x.dtype, sharding=sharding)}
        )
        assert float(back["x"].sum()) == float(np.arange(64.0).sum())
        print("saved and restored", flush=True)
        return 0
    if mode == "fail":
        if me == 1:
            raise RuntimeError("process 1 fails now")
        time.sleep(120)  # must be stopped by the launcher
        return 0
    if mode == "preempt":
        with distckpt.CheckpointManager(directory, save_interval_steps=10**9, timeout_s=30) as mgr:
            for step in range(1, 10**6):
                time.sleep(0.01)
                if step == 20:
                    print("training", flush=True)
                if mgr.reached_preemption(step):
                    mgr.save(step, {"step": step}, force=True, blocking=True)
                    print(f"saved at {step}", flush=True)
                    return distckpt.PREEMPTED_EXIT_CODE
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
