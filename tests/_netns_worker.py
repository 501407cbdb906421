"""Worker of tests/test_netns.py, run inside a network namespace: python -m tests._netns_worker MODE DIR."""

from __future__ import annotations

import json
import sys
import time


def _say(**record) -> None:
    print(json.dumps(record), flush=True)


def main(mode: str, directory: str) -> int:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import distckpt

    distckpt.initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    values = np.arange(12 * 8, dtype=np.float32).reshape(12, 8)

    def state(step: int):
        w = jax.make_array_from_callback((12, 8), sharding, lambda i: values[i] * step)
        return {"w": w, "step": step}

    mgr = distckpt.CheckpointManager(directory, async_save=False, timeout_s=5)
    if mode == "save":
        mgr.save(1, state(1))
        _say(process=jax.process_index(), saved=1, count=jax.process_count())
        return 0
    if mode == "restore":
        target = {"w": jax.ShapeDtypeStruct((12, 8), np.float32, sharding=sharding), "step": 0}
        got = mgr.restore(1, target)
        ok = all(
            np.array_equal(np.asarray(s.data), values[s.index]) for s in got["w"].addressable_shards
        )
        _say(process=jax.process_index(), restored=got["step"], ok=ok, count=jax.process_count())
        return 0
    if mode == "cut":
        _say(process=jax.process_index(), saving=2)
        began = time.monotonic()
        try:
            mgr.save(2, state(2))
        except distckpt.errors.DistckptError as e:
            _say(
                process=jax.process_index(),
                error=type(e).__name__,
                message=str(e)[:2000],
                missing=getattr(e, "missing", None),
                seconds=time.monotonic() - began,
            )
            sys.stdout.flush()
            import os

            os._exit(0)  # the coordination service cannot shut down cleanly now
        _say(process=jax.process_index(), saved=2)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
