"""Real training state round-trips exactly: optax, flax NNX and linen, PRNG keys.

Each case saves a state from a live, sharded training step, restores it into
an abstract target, checks types and values, and runs the next jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.errors import TreeMismatchError


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))


@pytest.fixture(scope="module")
def param_shardings(mesh):
    return {
        "w": NamedSharding(mesh, P("x", "y")),
        "b": NamedSharding(mesh, P("y")),
        "emb": NamedSharding(mesh, P(None, "x")),
    }


@pytest.fixture(scope="module")
def params(param_shardings):
    rng = np.random.default_rng(0)
    host = {
        "w": rng.standard_normal((8, 16), np.float32),
        "b": rng.standard_normal((16,), np.float32),
        "emb": rng.standard_normal((4, 6), np.float32),
    }
    return jax.device_put(host, param_shardings)


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "lion": lambda: optax.lion(1e-4),
    "adafactor": lambda: optax.adafactor(1e-3),
    "chain_clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "masked": lambda: optax.masked(optax.adam(1e-3), {"w": True, "b": False, "emb": True}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2),
}


def _grads(params):
    return jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("how", ["from_live_state", "from_eval_shape"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optax_state_round_trips_and_the_next_update_runs(
    tmp_path, params, param_shardings, name, how
):
    opt = OPTIMIZERS[name]()
    state = opt.init(params)
    grads = _grads(params)
    _, state = opt.update(grads, state, params)  # a live, eager step: count is uncommitted
    distckpt.save(tmp_path / "c", state)

    if how == "from_live_state":
        target = distckpt.abstract_like(state)
    else:  # the moments take their parameter's sharding
        target = distckpt.abstract_like(jax.eval_shape(opt.init, params), param_shardings)
    restored = distckpt.restore(tmp_path / "c", target)

    _assert_same(restored, state)  # exact types: named tuples, EmptyState, MaskedNode
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        if leaf.shape == params["w"].shape:  # a moment of w is laid out like w
            assert leaf.sharding.is_equivalent_to(param_shardings["w"], 2), path
    update = jax.jit(opt.update)
    updates, _ = update(grads, restored, params)
    expected, _ = update(grads, state, params)
    _assert_same(updates, expected)


def test_a_single_device_count_in_a_hand_built_target_is_the_trap_abstract_like_avoids(
    tmp_path, params
):
    opt = optax.adam(1e-3)
    grads = _grads(params)
    _, state = opt.update(grads, opt.init(params), params)
    distckpt.save(tmp_path / "c", state)
    # The obvious hand-built target copies each leaf's sharding; count's is
    # one device, so the restored count is committed there.
    naive = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    restored = distckpt.restore(tmp_path / "c", naive)
    assert isinstance(restored[0].count.sharding, SingleDeviceSharding)
    with pytest.raises(ValueError, match="incompatible devices"):
        jax.jit(opt.update)(grads, restored, params)
    # abstract_like replicates such leaves on the state's mesh.
    target = distckpt.abstract_like(state)
    assert target[0].count.sharding.mesh.shape == {"x": 2, "y": 4}
    assert target[0].count.sharding.spec == P()
    fixed = distckpt.restore(tmp_path / "c", target)
    jax.jit(opt.update)(grads, fixed, params)


def test_abstract_like_accepts_one_sharding_and_keeps_host_leaves(mesh):
    tree = {"a": jax.ShapeDtypeStruct((4, 8), jnp.float32), "n": np.arange(3), "s": "x", "z": None}
    replicated = NamedSharding(mesh, P())
    out = distckpt.abstract_like(tree, replicated)
    assert out["a"].sharding == replicated
    assert out["n"] is tree["n"] and out["s"] == "x" and out["z"] is None
    # No sharding at all, single process: the first device.
    bare = distckpt.abstract_like({"a": jax.ShapeDtypeStruct((2,), jnp.int32)})
    assert bare["a"].sharding == SingleDeviceSharding(jax.devices()[0])


def test_abstract_like_says_what_is_wrong(mesh):
    other = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    tree = {
        "p": jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P("x"))),
        "q": jax.device_put(jnp.ones((4, 4)), NamedSharding(other, P("a"))),
        "count": jnp.zeros((), jnp.int32),
    }
    with pytest.raises(ValueError, match="2 different meshes.*pass mesh="):
        distckpt.abstract_like(tree)
    assert distckpt.abstract_like(tree, mesh=mesh)["count"].sharding.mesh is mesh
    with pytest.raises(ValueError, match="matches no leaf"):
        distckpt.abstract_like(tree, {"nothing_like_it": NamedSharding(mesh, P())})
    with pytest.raises(TypeError, match=r"\['f'\].*object"):
        distckpt.abstract_like({"f": object()})


def test_prng_keys_round_trip_exactly(tmp_path, mesh):
    keys = {
        "threefry": jax.random.key(1),
        "rbg": jax.random.key(2, impl="rbg"),
        "unsafe_rbg": jax.random.key(3, impl="unsafe_rbg"),
        "split": jax.random.split(jax.random.key(4), 8),
        "sharded": jax.device_put(
            jax.random.split(jax.random.key(5), 8), NamedSharding(mesh, P("x"))
        ),
        "old_style": jax.random.PRNGKey(6),  # a uint32 array: stays one
    }
    distckpt.save(tmp_path / "k", keys)
    restored = distckpt.restore(tmp_path / "k", distckpt.abstract_like(keys))
    _assert_same(restored, keys)
    for name in keys:
        assert restored[name].dtype == keys[name].dtype, name
    assert restored["sharded"].sharding.spec == P("x")
    # Keys drive the same random numbers after the round trip.
    np.testing.assert_array_equal(
        jax.random.normal(restored["rbg"], (3,)), jax.random.normal(keys["rbg"], (3,))
    )
    # Without a target they come back as typed keys too.
    plain = distckpt.restore(tmp_path / "k")
    assert plain["split"].dtype == keys["split"].dtype


def test_flax_nnx_state_round_trips_into_the_abstract_model(tmp_path):
    from flax import nnx

    class Counter(nnx.Variable):
        pass

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.inp = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.blocks = nnx.data({0: nnx.Linear(8, 8, rngs=rngs), 1: nnx.Linear(8, 2, rngs=rngs)})
            self.calls = Counter(jnp.array(0))
            self.rngs = rngs

        def __call__(self, x):
            self.calls[...] += 1
            x = self.drop(self.bn(self.inp(x)))
            return self.blocks[1](nnx.relu(self.blocks[0](x)))

    model = Model(nnx.Rngs(0, dropout=1))
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    model(x)  # train mode: batch stats, dropout key and the counter move
    graphdef, state = nnx.split(model)
    distckpt.save(tmp_path / "m", state)

    abstract = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0, dropout=1))))
    restored = distckpt.restore(tmp_path / "m", distckpt.abstract_like(abstract))
    twin = nnx.merge(graphdef, restored)
    assert isinstance(twin.calls, Counter) and int(twin.calls[...]) == 1
    assert list(twin.blocks) == [0, 1]  # integer keys stay integers
    assert isinstance(twin.bn.mean, nnx.BatchStat)
    # nnx.update into a fresh model gives the same model too.
    fresh = Model(nnx.Rngs(5, dropout=6))
    nnx.update(fresh, distckpt.restore(tmp_path / "m", distckpt.abstract_like(abstract)))
    for m in (model, twin, fresh):
        m.eval()
    for m in (twin, fresh):  # the restored batch statistics are in use
        np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(model(x)))
    for m in (model, twin):
        m.train()
    # Train mode draws from the restored dropout RNG: equal outputs prove it matches.
    np.testing.assert_array_equal(np.asarray(twin(x)), np.asarray(model(x)))
    # Without a target, integer keys are still integers.
    assert list(distckpt.restore(tmp_path / "m")["blocks"]) == [0, 1]


def test_flax_linen_train_state_round_trips(tmp_path):
    from flax import linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    model = MLP()
    x = jnp.ones((2, 5))
    ts = train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), x), tx=optax.adamw(1e-2)
    )

    def loss(p):
        return jnp.mean(model.apply(p, x) ** 2)

    ts = ts.apply_gradients(grads=jax.grad(loss)(ts.params))
    distckpt.save(tmp_path / "ts", ts)
    restored = distckpt.restore(tmp_path / "ts", distckpt.abstract_like(ts))
    assert restored.step == 1 and type(restored) is type(ts)
    _assert_same(restored.params, ts.params)
    _assert_same(restored.opt_state, ts.opt_state)
    nxt = restored.apply_gradients(grads=jax.grad(loss)(restored.params))
    ref = ts.apply_gradients(grads=jax.grad(loss)(ts.params))
    _assert_same(nxt.params, ref.params)


def test_params_only_out_of_a_full_train_state(tmp_path, params):
    opt = optax.adamw(1e-3)
    state = {"params": params, "opt_state": opt.init(params), "step": 7}
    distckpt.save(tmp_path / "full", state)
    target = {"params": distckpt.abstract_like(params)}
    got = distckpt.restore(tmp_path / "full", target, partial=True)
    _assert_same(got["params"], params)
    with pytest.raises(TreeMismatchError, match="pass partial=True"):
        distckpt.restore(tmp_path / "full", target)


def test_a_changed_optimizer_lists_every_difference(tmp_path, params):
    adam = optax.adam(1e-3)
    distckpt.save(tmp_path / "a", {"params": params, "opt": adam.init(params)})
    sgd = optax.sgd(0.1, momentum=0.9)
    target = distckpt.abstract_like({"params": params, "opt": sgd.init(params)})
    with pytest.raises(TreeMismatchError) as info:
        distckpt.restore(tmp_path / "a", target)
    text = str(info.value)
    for expected in ["['opt'][0].trace['w']", "['opt'][0].mu['w']", "['opt'][0].nu['b']"]:
        assert expected in text, text
    assert "['opt'][0].count" in text
    # The problems are also there one by one, for programs.
    assert len(info.value.problems) == 3 + 3 + 3 + 1  # trace x3 missing; mu, nu x3 and count extra
    # Moving to the new optimizer: restore the params alone, start it afresh.
    got = distckpt.restore(tmp_path / "a", {"params": target["params"]}, partial=True)
    _assert_same(got["params"], params)
