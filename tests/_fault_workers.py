"""Worker functions of the fault-injection suite (tests/test_faults_*.py).

Each runs on every process of a real ``jax.distributed`` job started by
:func:`tests.mp.run_processes`. Faults are injected only through the
test-only hook ``DISTCKPT_FAULT`` (distckpt/_faults.py): a worker sets the
variable in its own environment right before the operation that must fail,
so that the saves before it run clean.

Every worker reports what it saw (error type, processes named, seconds) as
its JSON return value; the tests assert on those, on exit codes, on timing
and on what is on disk.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time

FAULT = "DISTCKPT_FAULT"


def arm(fault: str) -> None:
    os.environ[FAULT] = fault


def disarm() -> None:
    os.environ.pop(FAULT, None)


def sync(tag: str) -> None:
    """A test-side barrier with a long timeout: realigns processes after a fault
    (a stalled or frozen process arrives seconds after the others)."""
    from distckpt import _multihost

    client = _multihost.client()
    if client is not None and _multihost.process_count() > 1:
        client.wait_at_barrier(f"faults-test/{tag}", 60_000)


# --------------------------------------------------------------------------- the state


W_SHAPE = (32, 16)


def _mesh():
    import jax

    return jax.make_mesh((jax.process_count(), jax.local_device_count()), ("x", "y"))


def state(step: int) -> dict:
    """A small train state whose every value encodes ``step``."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _mesh()
    w = np.arange(np.prod(W_SHAPE), dtype=np.float32).reshape(W_SHAPE) + step
    b = np.full(16, step, np.float32)

    def put(value, spec):
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda i: value[i]
        )

    return {
        "w": put(w, P("x", "y")),
        "b": put(b, P()),
        "n": put(np.array(step, np.int32), P()),
        "rng": jax.random.key(step),
        "step": step,
    }


def target() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = _mesh()
    return {
        "w": jax.ShapeDtypeStruct(W_SHAPE, jnp.float32, sharding=NamedSharding(mesh, P("x", "y"))),
        "b": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P())),
        "n": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
        "step": 0,
    }


def check(out: dict, step: int) -> None:
    """Asserts that ``out`` is exactly ``state(step)`` on this process's devices."""
    import jax
    import numpy as np

    w = np.arange(np.prod(W_SHAPE), dtype=np.float32).reshape(W_SHAPE) + step
    for shard in out["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
    for shard in out["b"].addressable_shards:
        np.testing.assert_array_equal(
            np.asarray(shard.data), np.full(16, step, np.float32)[shard.index]
        )
    assert int(np.asarray(out["n"].addressable_shards[0].data)) == step
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(out["rng"])),
        np.asarray(jax.random.key_data(jax.random.key(step))),
    )
    assert out["step"] == step


def _seen(e: BaseException, began: float) -> dict:
    return {
        "type": type(e).__name__,
        "message": str(e),
        "processes": getattr(e, "processes", None),
        "missing": getattr(e, "missing", None),
        "problems": getattr(e, "problems", None),
        "seconds": time.monotonic() - began,
    }


# --------------------------------------------------------------------------- kills


def kill_during_save(directory: str, fault: str, at_step: int, timeout_s: float) -> dict:
    """Manager saves steps 1..at_step; the save of ``at_step`` runs under ``fault``.

    The victim dies in it (SIGKILL); a survivor reports what it saw, if it
    lives long enough (JAX may abort it first).
    """
    import distckpt

    mgr = distckpt.CheckpointManager(directory, async_save=False, timeout_s=timeout_s)
    for step in range(1, at_step + 1):
        if step == at_step:
            print(json.dumps({"armed": time.time()}), flush=True)
            arm(fault)
        began = time.monotonic()
        try:
            mgr.save(step, state(step))
        except distckpt.errors.DistckptError as e:
            seen = _seen(e, began)
            print(json.dumps({"error": seen, "at": time.time()}), flush=True)
            return seen
    return {"type": None}


def resume(directory: str, expect: int, next_step: int, timeout_s: float) -> dict:
    """A restarted job: resumes from the latest committed step, then saves the next one."""
    import distckpt

    mgr = distckpt.CheckpointManager(directory, async_save=False, timeout_s=timeout_s)
    latest = mgr.latest_step()
    assert latest == expect, (latest, expect, mgr.all_steps())
    check(mgr.restore(latest, target()), latest)
    mgr.save(next_step, state(next_step))
    check(mgr.restore(next_step, target()), next_step)
    mgr.close()
    return {"latest": latest, "steps": mgr.all_steps()}


# --------------------------------------------------------------------------- phases


def phase_faults(root: str, cases: list, timeout_s: float) -> dict:
    """One save per case, each under its own fault; the job goes on after each."""
    import distckpt

    results = {}
    for name, fault in cases:
        arm(fault)
        began = time.monotonic()
        try:
            distckpt.save(os.path.join(root, name), state(1), timeout_s=timeout_s)
            results[name] = {"type": None, "seconds": time.monotonic() - began}
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            results[name] = _seen(e, began)
        disarm()
        sync(name)
    # The job carries on: a clean save and restore after all those failures.
    after = os.path.join(root, "after")
    distckpt.save(after, state(2), timeout_s=timeout_s)
    check(distckpt.restore(after, target(), timeout_s=timeout_s), 2)
    results["mismatch"] = _mismatch(after, timeout_s)
    return results


def _mismatch(directory: str, timeout_s: float) -> dict:
    """Restore with a target that differs in every way at once (case 11)."""
    import jax
    import jax.numpy as jnp

    import distckpt

    good = target()
    wrong = {
        "weights": good["w"],  # 'w' renamed: missing in the target, unknown in the checkpoint
        "b": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=good["b"].sharding),  # shape
        "n": jax.ShapeDtypeStruct((), jnp.float32, sharding=good["n"].sharding),  # dtype
        "rng": good["rng"],
        "extra": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=good["b"].sharding),  # extra
        # "step" is left out: missing from the target
    }
    began = time.monotonic()
    try:
        distckpt.restore(directory, wrong, timeout_s=timeout_s)
    except distckpt.errors.DistckptError as e:
        return _seen(e, began)
    return {"type": None}


def stall_then_continue(root: str, cases: list, timeout_s: float) -> dict:
    """Each case: one process stalls or freezes (SIGSTOP) in a save; then training goes on.

    A frozen process is thawed (SIGCONT) by process 0 once process 0 has
    seen the timeout, so that the job can continue.
    """
    import jax

    import distckpt
    from distckpt import _multihost

    client = _multihost.client()
    me = jax.process_index()
    client.key_value_set(f"faults-test/pid/{me}", str(os.getpid()))
    sync("pids")
    pids = [int(client.blocking_key_value_get(f"faults-test/pid/{p}", 10_000)) for p in (0, 1)]
    results = {}
    for i, (name, fault, frozen) in enumerate(cases):
        arm(fault)
        began = time.monotonic()
        try:
            distckpt.save(os.path.join(root, name), state(i + 1), timeout_s=timeout_s)
            results[name] = {"type": None, "seconds": time.monotonic() - began}
        except distckpt.errors.DistckptError as e:
            results[name] = _seen(e, began)
        disarm()
        if frozen is not None and me != frozen:
            os.kill(pids[frozen], signal.SIGCONT)
        sync(name)
    # Training goes on, and so does checkpointing.
    after = os.path.join(root, "after")
    distckpt.save(after, state(7), timeout_s=timeout_s)
    check(distckpt.restore(after, target(), timeout_s=timeout_s), 7)
    return results


# --------------------------------------------------------------------------- async


def async_faults(directory: str, timeout_s: float) -> dict:
    """A second save while one is in flight; an error in a background save."""
    import distckpt

    out = {}
    mgr = distckpt.CheckpointManager(directory, timeout_s=timeout_s)  # async saves
    arm("save.write:stall=1.5*1")  # the first background save takes a while
    mgr.save(1, state(1))
    began = time.monotonic()
    mgr.save(2, state(2))  # waits for step 1 first
    out["second_save_waited_s"] = time.monotonic() - began
    out["step1_committed_then"] = distckpt.is_committed(os.path.join(directory, "step_00000001"))

    mgr.wait_until_finished()  # step 2 is written before the next fault is armed
    arm("write.chunk:raise@1*1")  # process 1 fails writing step 3, in the background
    mgr.save(3, state(3))
    errors = []
    for _ in range(2):
        try:
            mgr.save(4, state(4))  # the first call raises step 3's error and does not save
        except distckpt.errors.DistckptError as e:
            errors.append(_seen(e, time.monotonic()))
    try:
        mgr.wait_until_finished()
    except distckpt.errors.DistckptError as e:  # the error must surface only once
        errors.append(_seen(e, time.monotonic()))
    disarm()
    mgr.save(5, state(5))
    mgr.close()
    out["errors"] = errors
    out["steps"] = mgr.all_steps()
    for step in mgr.all_steps():
        check(mgr.restore(step, target()), step)
    return out


# --------------------------------------------------------------------------- preemption


def train_until_preempted(directory: str, marker_dir: str, timeout_s: float) -> None:
    """Trains with async saves every 4 steps until a preemption notice (SIGTERM
    sent by the test to process 1 once it reached step 6)."""
    import jax

    import distckpt

    me = jax.process_index()
    with open(os.path.join(marker_dir, f"pid{me}"), "w") as f:
        f.write(str(os.getpid()))
    mgr = distckpt.CheckpointManager(
        directory, save_interval_steps=4, max_to_keep=2, timeout_s=timeout_s
    )
    for step in range(1, 400):
        current = state(step)  # "training": the state after `step` steps
        if step == 6 and me == 1:
            open(os.path.join(marker_dir, "ready"), "w").close()
        if mgr.reached_preemption(step):
            mgr.save(step, current, force=True, blocking=True)
            mgr.close()
            print(json.dumps({"preempted_at": step}), flush=True)
            sys.exit(distckpt.PREEMPTED_EXIT_CODE)
        mgr.save(step, current)
        time.sleep(0.05)
    raise AssertionError("never reached the preemption sync point")


# --------------------------------------------------------------------------- two jobs


def concurrent_job(directory: str, job: str, overwrite: bool) -> dict:
    """One of two single-process jobs saving into the same directory.

    Job "B" runs under a stall fault (set by the test) and saves first; job
    "A" saves while B is stalled.
    """
    import distckpt

    if job == "A":  # wait until B has written its data: B is then stalled before its commit
        deadline = time.monotonic() + 60
        while not glob.glob(os.path.join(directory, "attempt-*", "*.bin")):
            assert time.monotonic() < deadline, "job B never wrote its data"
            time.sleep(0.02)
        time.sleep(0.5)
    began = time.monotonic()
    try:
        distckpt.save(directory, {**state(1), "job": job}, overwrite=overwrite, timeout_s=30)
    except distckpt.errors.DistckptError as e:
        return _seen(e, began)
    return {"type": None, "seconds": time.monotonic() - began}


def freeze_in_save(directory: str, marker_dir: str, fault: str, timeout_s: float) -> dict:
    """Saves under ``fault`` (a SIGSTOP); the test watches the processes from outside."""
    import jax

    import distckpt

    with open(os.path.join(marker_dir, f"pid{jax.process_index()}"), "w") as f:
        f.write(str(os.getpid()))
    sync("pids")
    arm(fault)
    began = time.monotonic()
    try:
        distckpt.save(directory, state(1), timeout_s=timeout_s)
    except distckpt.errors.DistckptError as e:
        seen = _seen(e, began)
        print(json.dumps({"error": seen}), flush=True)
        return seen
    return {"type": None}
