"""``restore(dir)`` without a target gives the saved structure back (the manifest's
``structure`` record): empty containers, positions, list vs tuple, dict key order
and kinds, namedtuples, optax and flax states, and trees nested thousands deep.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _manifest, _tree
from distckpt.errors import CorruptCheckpointError
from tests.mp import run_processes

DATA = Path(__file__).resolve().parent / "data"
HERE = "tests.test_structure"


class Point(NamedTuple):  # importable: restore finds the class itself
    x: object
    y: object


def assert_same(got, want) -> None:
    """Exact types, keys in order and values, without recursion (trees may be deep)."""
    stack = [(got, want, "<root>")]
    while stack:
        g, w, where = stack.pop()
        if isinstance(w, jax.Array | np.ndarray | np.generic):
            assert isinstance(g, np.ndarray | np.generic | jax.Array), (where, type(g))
            assert np.asarray(g).dtype == np.asarray(w).dtype, where
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=where)
            continue
        assert type(g) is type(w), (where, type(g), type(w))
        if isinstance(w, dict):
            assert list(g) == list(w), (where, list(g), list(w))
            stack.extend((g[k], w[k], f"{where}[{k!r}]") for k in w)
        elif isinstance(w, list | tuple):
            assert len(g) == len(w), (where, len(g), len(w))
            stack.extend((a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(g, w, strict=True)))
        else:
            assert g == w, (where, g, w)


def roundtrip(tmp_path, tree, name="c"):
    directory = tmp_path / name
    distckpt.save(directory, tree)
    return distckpt.restore(directory)


# --------------------------------------------------------------------------- item 6


def test_empty_containers_keep_their_places(tmp_path):
    x, y = np.arange(4.0), jnp.arange(3, dtype=jnp.int32)
    tree = {
        "layers": [{"w": x}, {}, {"w": y}],
        "holes": [{"w": x}, None, {"w": y}],
        "empty_list": [],
        "empty_tuple": (),
        "nested": {"a": {}, "b": [[], (), {}], "c": ((), [x])},
        "tail": [x, [], ()],
    }
    got = roundtrip(tmp_path, tree)
    assert_same(got, tree)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    np.testing.assert_array_equal(got["layers"][2]["w"], np.asarray(y))  # not renumbered


def test_lists_and_tuples_stay_what_they_were(tmp_path):
    tree = {"l": [1, 2.5], "t": (1, "s"), "mixed": ([np.ones(2)], (np.zeros(1),)), "one": (7,)}
    got = roundtrip(tmp_path, tree)
    assert_same(got, tree)
    assert type(got["t"]) is tuple and type(got["l"]) is list


def test_dict_key_order_and_key_kinds(tmp_path):
    tree = {
        "zeta": 1,
        "alpha": {10: np.ones(1), 2: np.zeros(2), 7: {}},
        "mid": {"1": "a string key", "0": "another"},
    }
    got = roundtrip(tmp_path, tree)
    assert_same(got, tree)
    assert list(got) == ["zeta", "alpha", "mid"]
    assert list(got["alpha"]) == [10, 2, 7] and all(type(k) is int for k in got["alpha"])
    assert list(got["mid"]) == ["1", "0"]


def test_namedtuple_with_its_class_imported_is_that_class(tmp_path):
    tree = {"p": Point(np.arange(3), ()), "q": [Point({}, 2)]}
    got = roundtrip(tmp_path, tree)
    assert_same(got, tree)
    assert type(got["p"]) is Point and jax.tree.structure(got) == jax.tree.structure(tree)


def test_namedtuple_without_its_class_is_rebuilt_from_name_and_fields(tmp_path):
    Local = collections.namedtuple("Local", "mu nu count")  # not reachable by module path
    tree = {"a": Local({"w": np.ones(2)}, (), 3), "b": Local({}, [], 4)}
    got = roundtrip(tmp_path, tree)
    for key in "ab":
        cls = type(got[key])
        assert cls is not Local and issubclass(cls, tuple)
        assert cls.__name__ == "Local" and cls._fields == ("mu", "nu", "count")
    assert type(got["a"]) is type(got["b"])  # one class per name and fields
    np.testing.assert_array_equal(got["a"].mu["w"], np.ones(2))
    assert got["a"].nu == () and got["a"].count == 3
    assert got["b"].mu == {} and got["b"].nu == [] and got["b"].count == 4
    again = distckpt.restore(tmp_path / "c")  # a second restore gives the same structure
    assert jax.tree.structure(again) == jax.tree.structure(got)


def test_optax_chain_state(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    shardings = {"w": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P("y"))}
    params = jax.device_put(
        {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.linspace(0, 1, 8)}, shardings
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)  # count 1, non-zero moments
    got = roundtrip(tmp_path, {"params": params, "opt_state": state})
    restored = got["opt_state"]
    # (EmptyState(), (ScaleByAdamState(count, mu, nu), EmptyState())), classes and all.
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert type(restored[0]) is optax.EmptyState
    assert type(restored[1][0]) is optax.ScaleByAdamState
    assert_same(got, {"params": params, "opt_state": state})
    updates, _ = jax.jit(opt.update)(grads, restored, got["params"])
    expected, _ = opt.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_flax_style_nested_params(tmp_path):
    rng = np.random.default_rng(0)
    variables = {
        "params": {
            "Dense_0": {"kernel": rng.standard_normal((3, 4), np.float32), "bias": np.zeros(4)},
            "LayerNorm_0": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
            "Dense_1": {"kernel": rng.standard_normal((4, 2), np.float32), "bias": np.zeros(2)},
        },
        "batch_stats": {},
        "cache": {"Attention_0": {}},
    }
    got = roundtrip(tmp_path, variables)
    assert_same(got, variables)
    assert list(got["params"]) == ["Dense_0", "LayerNorm_0", "Dense_1"]  # module order
    assert list(got["params"]["Dense_0"]) == ["kernel", "bias"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Holder:
    weights: object
    extra: object


class _NoKeys:
    """A pytree node with no key names; its unflatten must never run on restore."""

    def __init__(self, a, b):
        self.a, self.b = a, b


def _refuse_unflatten(aux, children):
    raise AssertionError("restore ran a node's unflatten: code named by a checkpoint")


jax.tree_util.register_pytree_node(_NoKeys, lambda n: ((n.a, n.b), None), _refuse_unflatten)


def test_custom_nodes_come_back_as_dicts_of_their_fields(tmp_path):
    tree = {
        "h": _Holder(np.arange(2), {}),
        "n": _NoKeys(1, ()),
        "od": collections.OrderedDict(z=1, a=2),
    }
    got = roundtrip(tmp_path, tree)
    assert type(got["h"]) is dict and list(got["h"]) == ["weights", "extra"]
    np.testing.assert_array_equal(got["h"]["weights"], np.arange(2))
    assert got["h"]["extra"] == {}
    assert got["n"] == [1, ()]  # children without names: a list
    assert got["od"] == {"z": 1, "a": 2} and type(got["od"]) is dict
    doc = json.loads((tmp_path / "c" / "manifest.json").read_bytes())
    names = {node[4] for node in doc["structure"] if node[2] == "node"}
    assert names == {
        f"{HERE}:_Holder",
        f"{HERE}:_NoKeys",
        "collections:OrderedDict",
    }


def test_walk_flattens_exactly_like_jax():
    """The save-side walk gives jax.tree_util's leaves, paths and order for every kind of node."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(2, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(3, rngs=rngs)

    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    trees = [
        {"b": 1, "a": {}, "c": [1, {}, (), None, [2]]},
        {3: "x", 1: {"z": None}},
        Point(1, {}),
        _Holder({}, [2, 3]),
        _NoKeys(1, [2]),
        collections.OrderedDict(z=1, a=2),
        collections.defaultdict(int, {"q": 1, "c": 2}),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params),
        optax.masked(optax.adam(1e-3), {"w": True, "b": False}).init(params),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-3).init(params),
        nnx.state(MLP(nnx.Rngs(0))),
        5,
        None,
        {},
    ]
    for tree in trees:
        items, _ = _tree.walk(tree)
        expected, _ = _tree.flatten(tree)
        assert [p for p, _ in items] == [p for p, _ in expected]
        assert all(a is b for (_, a), (_, b) in zip(items, expected, strict=True))


def test_unsortable_dict_keys_are_refused_with_the_path(tmp_path):
    with pytest.raises(TypeError, match=r"\['outer'\]"):
        distckpt.save(tmp_path / "c", {"outer": {1: np.ones(1), "a": np.ones(1)}})


# --------------------------------------------------------------------------- item 17


def _deep(depth: int, leaf):
    tree = leaf
    for i in range(depth):
        tree = {"d": tree, "i": i} if i % 3 == 0 else ([tree] if i % 3 == 1 else (tree, ()))
    return tree


@pytest.mark.parametrize("depth", [600, 2000])
def test_deeply_nested_tree_round_trips(tmp_path, depth):
    tree = _deep(depth, np.arange(5, dtype=np.int16))
    directory = tmp_path / "c"
    distckpt.save(directory, tree)
    assert_same(distckpt.restore(directory), tree)
    info = distckpt.metadata(directory)  # its plain tree is rebuilt without recursion too
    assert len(info.leaves) == sum(1 for i in range(depth) if i % 3 == 0) + 1


def test_deep_checkpoint_without_record_restores(tmp_path):
    tree = {"x": _deep(2000, np.ones(2))}
    directory = tmp_path / "c"
    distckpt.save(directory, tree)
    _drop_record(directory)
    got = distckpt.restore(directory)
    node, depth = got["x"], 0
    while not isinstance(node, np.ndarray):  # plain dicts and lists, positions renumbered
        node = node["d"] if isinstance(node, dict) else node[0]
        depth += 1
    assert depth == 2000
    np.testing.assert_array_equal(node, np.ones(2))


_DEEP_TARGET = """
import sys, numpy as np, distckpt
tree = np.arange(3)
for _ in range(2000):
    tree = {"d": tree}
distckpt.save(sys.argv[1], tree)
try:
    distckpt.restore(sys.argv[1], tree)
except TypeError as e:
    print("refused:", e)
sys.setrecursionlimit(5000)
back = distckpt.restore(sys.argv[1], tree)
for _ in range(2000):
    back = back["d"]
print("with a higher limit:", back.tolist())
"""


def test_a_target_deeper_than_jax_flattens_is_a_clear_error(tmp_path):
    # In a child process: jax's failed flatten leaves the thread's recursion count raised.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = subprocess.run(
        [sys.executable, "-c", _DEEP_TARGET, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    refused, restored = run.stdout.splitlines()[-2:]
    assert refused.startswith("refused: the tree is nested too deeply for jax.tree_util")
    assert "sys.setrecursionlimit" in refused
    assert restored == "with a higher limit: [0, 1, 2]"


# --------------------------------------------------------------------------- compatibility


def _drop_record(directory) -> None:
    """Makes ``directory`` what a distckpt without the structure record writes."""
    path = Path(directory) / "manifest.json"
    doc = json.loads(path.read_bytes())
    del doc["structure"], doc["manifest_crc32c"]
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))


def test_old_fixture_without_record_restores_as_before(tmp_path):
    for version in (1, 2):
        path = DATA / f"format_v{version}"
        assert "structure" not in json.loads((path / "manifest.json").read_bytes())
        got = distckpt.restore(path)
        assert list(got) == ["bf16", "name", "none", "opt", "params", "rng", "step"]
        assert type(got["opt"]) is list and type(got["opt"][1]) is list
        np.testing.assert_array_equal(got["opt"][1][0], np.arange(3, dtype=np.int32))
        assert got["none"] is None and got["step"] == 42


def test_checkpoint_without_record_gives_plain_containers(tmp_path):
    directory = tmp_path / "c"
    distckpt.save(directory, {"t": (np.ones(1), {}, np.zeros(1)), "p": Point(1, 2)})
    _drop_record(directory)
    got = distckpt.restore(directory)
    assert type(got["t"]) is list and len(got["t"]) == 2  # as before the record existed
    assert got["p"] == {"x": 1, "y": 2}


def test_record_is_a_sealed_top_level_member(tmp_path):
    directory = tmp_path / "c"
    distckpt.save(directory, {"a": [np.ones(2), ()], "b": Point({}, 3)})
    raw = (directory / "manifest.json").read_bytes()
    doc = json.loads(raw)
    assert "structure" in doc  # old readers ignore the member: it brought no version bump
    assert list(doc)[-1] == "manifest_crc32c"
    assert doc["structure"] == [
        [-1, 0, "dict", [["key", "a"], ["key", "b"]]],
        [0, 0, "list", 2],
        [1, 1, "tuple", 0],
        [0, 1, "namedtuple", ["x", "y"], f"{HERE}:Point"],
        [3, 0, "dict", []],
    ]
    # a flipped byte in the record fails the manifest's checksum
    at = raw.index(b'"namedtuple"')
    (directory / "manifest.json").write_bytes(raw[:at] + raw[at:].replace(b"x", b"q", 1))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        distckpt.restore(directory)


def test_metadata_reads_a_checkpoint_with_the_record(tmp_path):
    directory = tmp_path / "c"
    distckpt.save(directory, {"a": [np.ones(2), {}], "b": Point(np.zeros(3), ())})
    info = distckpt.metadata(directory)
    assert list(info.leaves) == ["['a'][0]", "['b'].x"]
    assert info.tree["a"][0].shape == (2,) and info.tree["b"]["x"].shape == (3,)
    assert [f.name for f in dataclasses.fields(info)] == [
        f.name for f in dataclasses.fields(distckpt.CheckpointInfo)
    ]
    distckpt.verify(directory)


def _rewrite(directory, change) -> None:
    path = Path(directory) / "manifest.json"
    doc = json.loads(path.read_bytes())
    del doc["manifest_crc32c"]
    change(doc)
    path.write_bytes(_manifest.seal(json.dumps(doc, separators=(",", ":")).encode()))


DAMAGED = {
    "kind": (lambda s: s[0].__setitem__(2, "pickle"), "unknown container kind"),
    "hole": (lambda s: s[1].__setitem__(3, 3), "no value at slot"),
    "missing-leaf-place": (lambda s: s[1].__setitem__(3, 1), r"\['a'\]\[1\] is not in container"),
    "parent": (lambda s: s[1].__setitem__(0, 5), "not an earlier container"),
    "not-a-list": (lambda s: s.__setitem__(0, "dict"), "container 0"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_record_that_does_not_fit_is_refused(tmp_path, case):
    directory = tmp_path / "c"
    distckpt.save(directory, {"a": [np.ones(2), np.zeros(2)], "b": 1})
    change, match = DAMAGED[case]
    _rewrite(directory, lambda doc: change(doc["structure"]))
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        distckpt.restore(directory)
    assert "Restore with a target" in str(info.value)
    target = {"a": [np.zeros(2), np.zeros(2)], "b": 0}
    np.testing.assert_array_equal(distckpt.restore(directory, target)["a"][0], np.ones(2))


def test_names_in_the_record_never_run_code(tmp_path):
    directory = tmp_path / "c"
    distckpt.save(directory, {"a": Point(1, 2), "b": Point(3, 4), "c": _Holder(5, 6)})
    marker = tmp_path / "pwned"

    def change(doc):
        s = doc["structure"]
        s[1][4] = "os:system"  # a function, not a namedtuple class
        s[2][4] = "subprocess:Popen"  # a class, not a namedtuple
        s[3][4] = f"os:system('touch {marker}')"

    _rewrite(directory, change)
    got = distckpt.restore(directory)
    assert type(got["a"]).__name__ == "system" and got["a"] == (1, 2)
    assert type(got["b"]).__name__ == "Popen" and got["b"].y == 4
    assert got["c"] == {"weights": 5, "extra": 6}
    assert not marker.exists()


# --------------------------------------------------------------------------- multi-process


def _mp_tree(on_devices: bool):
    """The state both processes save (arrays sharded across them), or its host values."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y")) if on_devices else None

    def put(value, spec):
        if not on_devices:
            return value
        return jax.make_array_from_callback(
            value.shape, NamedSharding(mesh, spec), lambda i: value[i]
        )

    params = {
        "dense": {
            "kernel": put(np.arange(8 * 16, dtype=np.float32).reshape(8, 16), P("x", "y")),
            "bias": put(np.linspace(0, 1, 16, dtype=np.float32), P("y")),
        },
        "norm": {},
    }
    opt_state = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "layers": [{"w": put(np.ones((4, 8), np.float32), P("x"))}, {}, None, ()],
        "pair": Point(put(np.arange(8, dtype=np.int32), P(("x", "y"))), {3: [], 1: "one"}),
        "step": 7,
    }


def _w_save_and_restore(directory: str) -> dict:
    tree = _mp_tree(on_devices=True)
    kernel = tree["params"]["dense"]["kernel"]
    assert not kernel.is_fully_addressable and kernel.addressable_shards[0].data.shape == (4, 4)
    distckpt.save(directory, tree, timeout_s=60)
    got = distckpt.restore(directory, timeout_s=60)
    assert_same(got, _mp_tree(on_devices=False))
    opt = got["opt_state"]
    return {
        "same_structure": jax.tree.structure(got) == jax.tree.structure(tree),
        "layers": [type(x).__name__ for x in got["layers"]],
        "pair": [type(got["pair"]).__name__, list(got["pair"].y)],
        "opt": [type(opt[0]).__name__, type(opt[1][0]).__name__, type(opt[1][1]).__name__],
    }


@pytest.mark.multiprocess
def test_two_processes_sharded_state_restores_its_structure(tmp_path):
    results = run_processes(
        f"{HERE}:_w_save_and_restore", 2, 4, args={"directory": str(tmp_path / "c")}
    )
    assert [r.value for r in results] == [
        {
            "same_structure": True,
            "layers": ["dict", "dict", "NoneType", "tuple"],
            "pair": ["Point", [3, 1]],
            "opt": ["EmptyState", "ScaleByAdamState", "EmptyState"],
        }
    ] * 2
