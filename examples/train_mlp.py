"""Train a small flax NNX MLP with optax adamw, checkpointed by distckpt, resumable.

Runs as one process or as several (``jax.distributed`` from the environment,
e.g. ``distckpt launch -n 2 -- python examples/train_mlp.py``), on a 2-axis
("data", "model") mesh: the batch is split over "data", the hidden layers
over "model". The training step is jitted with explicit in/out shardings.
Every ``--save-every`` steps the parameters, the optimizer state and each
process's position in the data are saved asynchronously; on restart the
latest step is restored, onto whatever topology the job has now, and the
loss continues where it left off. SIGTERM saves at once and exits with
``distckpt.PREEMPTED_EXIT_CODE``.

    python examples/train_mlp.py --dir /tmp/mlp --steps 200
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.pipeline import ShuffledIterator

FEATURES, HIDDEN, EXAMPLES = 32, 256, 8192


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))[:, 0]


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """A fixed regression problem; every process builds the same one."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((EXAMPLES, FEATURES), np.float32)
    w = rng.standard_normal(FEATURES, np.float32)
    return x, np.sin(x @ w / np.sqrt(FEATURES)).astype(np.float32)


def make_mesh(model_axis: int) -> Mesh:
    devices = np.array(jax.devices())
    if devices.size % model_axis:
        raise SystemExit(f"{devices.size} devices do not split into model axis {model_axis}")
    return Mesh(devices.reshape(-1, model_axis), ("data", "model"))


def param_sharding(mesh: Mesh, params: nnx.State) -> nnx.State:
    """Hidden dimensions over "model"; biases and the output replicated."""

    def place(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[0] in ("l1", "l2") and names[1] == "kernel":
            return NamedSharding(mesh, P(None, "model"))
        if names[0] == "out" and names[1] == "kernel":
            return NamedSharding(mesh, P("model", None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="checkpoint directory (shared by all processes)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--keep", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--model-axis", type=int, default=2, help="devices on the 'model' axis")
    ap.add_argument(
        "--fall-back",
        action="store_true",
        help="if the latest checkpoint is corrupt, resume from the newest intact one",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    distckpt.initialize()  # SLURM, TPU pods, `distckpt launch`, or one process
    distckpt.forward_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@120: save, then exit
    primary = jax.process_index() == 0

    def say(msg: str) -> None:
        if primary and not args.quiet:
            print(msg, flush=True)

    mesh = make_mesh(args.model_axis)
    x_all, y_all = dataset()
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = param_sharding(mesh, params)
    params = jax.device_put(params, shardings)
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    # Moments take their parameter's sharding; the step count is replicated.
    opt_state_shardings = jax.tree.map(
        lambda s: s.sharding, distckpt.abstract_like(jax.eval_shape(tx.init, params), shardings)
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings)(params)
    batch_sharding = NamedSharding(mesh, P("data"))

    def loss_fn(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def _step(p, o, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    train_step = jax.jit(
        _step,
        in_shardings=(shardings, opt_state_shardings, batch_sharding, batch_sharding),
        out_shardings=(shardings, opt_state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    data = ShuffledIterator(EXAMPLES, args.batch, seed=7)

    mgr = distckpt.CheckpointManager(
        args.dir,
        max_to_keep=args.keep,
        save_interval_steps=args.save_every,
        best_metric="loss",
        keep_best=1,
        async_save=True,
    )
    start = redo = mgr.latest_step() or 0
    if start:
        state = mgr.restore(
            None,
            distckpt.abstract_like({"params": params, "opt_state": opt_state}),
            pipeline=data,
            fall_back=args.fall_back,
        )
        if mgr.last_restored_step != start:
            say(f"step {start} is corrupt; fell back to step {mgr.last_restored_step}")
        redo, start = start, mgr.last_restored_step  # steps up to redo are saved again
        params, opt_state = state["params"], state["opt_state"]
        say(
            f"resumed from step {start} on {jax.process_count()} process(es) x "
            f"{jax.local_device_count()} device(s), mesh {dict(mesh.shape)}; "
            f"saved loss {mgr.metrics(start)['loss']:.5f}"
        )
    else:
        say(f"fresh start on {jax.process_count()} process(es), mesh {dict(mesh.shape)}")

    began, loss = time.perf_counter(), None
    for step in range(start + 1, args.steps + 1):
        idx = next(data)
        x = jax.make_array_from_process_local_data(batch_sharding, x_all[idx])
        y = jax.make_array_from_process_local_data(batch_sharding, y_all[idx])
        params, opt_state, loss = train_step(params, opt_state, x, y)
        state = {"params": params, "opt_state": opt_state}
        metrics = {"loss": float(loss)}
        if mgr.reached_preemption(step):
            mgr.save(
                step,
                state,
                pipeline=data,
                metrics=metrics,
                force=True,
                blocking=True,
                overwrite=step <= redo,
            )
            say(f"step {step}: preempted, saved, exiting with {distckpt.PREEMPTED_EXIT_CODE}")
            mgr.close()
            return distckpt.PREEMPTED_EXIT_CODE
        if mgr.should_save(step):
            mgr.save(step, state, pipeline=data, metrics=metrics, overwrite=step <= redo)
            say(f"step {step:4d}  loss {float(loss):.5f}  (checkpoint started)")
        elif step % 10 == 0:
            say(f"step {step:4d}  loss {float(loss):.5f}")
    if loss is not None and not mgr.should_save(args.steps):  # the final state, always
        mgr.save(args.steps, state, pipeline=data, metrics=metrics, force=True)
    mgr.close()
    if loss is not None:
        say(
            f"done: step {args.steps}, loss {float(loss):.5f}, "
            f"{time.perf_counter() - began:.1f} s, checkpoints {mgr.all_steps()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
