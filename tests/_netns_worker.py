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
    if mode in ("local_train", "local_resume"):
        return _local_tier(mode, directory, state, sharding, values)
    raise SystemExit(f"unknown mode {mode}")


def _local_tier(mode: str, directory: str, state, sharding, values) -> int:
    """The local tier across hosts: every step in each host's own directory (a copy
    of each block on another host), every second step in the shared one."""
    import os

    import jax
    import numpy as np

    import distckpt

    class Data:
        position = 0

        def get_state(self):
            return {"position": self.position}

        def set_state(self, saved):
            self.position = saved["position"]

    me = jax.process_index()
    data = Data()
    mgr = distckpt.CheckpointManager(
        directory,
        save_interval_steps=2,
        local_directory=os.environ["TEST_LOCAL_DIRECTORY"],
        local_save_interval_steps=1,
        timeout_s=10,
    )
    if mode == "local_train":
        for step in (1, 2, 3):
            data.position = 100 * step + me
            mgr.save(step, state(step), pipeline=data)
        mgr.wait_until_finished()
        _say(process=me, trained=3, persistent=mgr.all_steps())
        time.sleep(600)  # until the test kills the job, as a lost host ends it
        return 0
    target = {"w": jax.ShapeDtypeStruct((12, 8), np.float32, sharding=sharding), "step": 0}
    got = mgr.restore(None, target, pipeline=data)
    stats = mgr.last_restore_stats
    step = mgr.last_restored_step
    exact = all(
        np.array_equal(np.asarray(s.data), values[s.index] * step)
        for s in got["w"].addressable_shards
    )
    _say(
        process=me,
        step=step,
        exact=exact,
        position=data.position,
        tier=stats.tier,
        local=stats.local_bytes,
        peer=stats.peer_bytes,
        persistent=stats.persistent_bytes,
    )
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
