"""Restoring safetensors written by the safetensors library: one file, shards with an index."""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _sources
from distckpt._sources import safetensors as _st
from distckpt.errors import (
    CorruptCheckpointError,
    TreeMismatchError,
    UnsupportedCheckpointError,
)
from tests.mp import run_processes

st = pytest.importorskip("safetensors.numpy")

HERE = "tests.test_safetensors"


def _weights() -> dict[str, np.ndarray]:
    """A small model's weights, as a Hugging Face checkpoint names them."""
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((512, 256)).astype(ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(32).astype(np.float16),
        "model.layers.1.mlp.up.weight": rng.standard_normal((16, 256, 16)).astype(np.float32),
        "model.norm.step": np.array(7, np.int64),
        "model.mask": rng.standard_normal(12) > 0,
    }


def _save_sharded(directory: str, weights: dict[str, np.ndarray], groups: list[list[str]]) -> None:
    """Shards as the Hugging Face tools lay them out: model-0000k-of-0000N + index."""
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for k, names in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        st.save_file({n: weights[n] for n in names}, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(names, file))
    total = sum(w.nbytes for w in weights.values())
    with open(os.path.join(directory, _st.INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


_GROUPS = [
    ["model.embed_tokens.weight", "model.mask"],
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"],
    ["model.layers.1.mlp.up.weight", "model.norm.step"],
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("st")
    weights = _weights()
    one = str(base / "model.safetensors")
    st.save_file(weights, one)
    sharded = str(base / "sharded")
    _save_sharded(sharded, weights, _GROUPS)
    return {"one": one, "sharded": sharded, "weights": weights}


def _nested(weights: dict) -> dict:
    out: dict = {}
    for name, value in weights.items():
        node = out
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _same(got, want) -> None:
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, path
        np.testing.assert_array_equal(
            g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8), err_msg=str(path)
        )


@pytest.mark.parametrize("which", ["one", "sharded"])
def test_restore_without_target_gives_the_nested_tree(files, which):
    got = distckpt.restore(files[which])
    want = _nested(files["weights"])
    _same(got, jax.tree.map(lambda x: x, want))
    assert type(got["model"]["norm"]["step"]) is np.ndarray


def _target(mesh) -> dict:
    def arr(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    return {
        "embed": arr((512, 256), jnp.float32, P("x", "y")),  # bf16 saved: cast=True
        "layers": {
            "0": {
                "q": {
                    "weight": arr((32, 32), jnp.float32, P(None, ("x", "y"))),
                    "bias": arr((32,), jnp.float16, P("y")),
                }
            },
            "1": {"up": arr((16, 256, 16), jnp.float32, P(None, "x", "y"))},
        },
        "step": np.zeros((), np.int64),
    }


def _check_target(got, weights) -> None:
    for leaf, name, dtype in [
        (got["embed"], "model.embed_tokens.weight", np.float32),
        (got["layers"]["0"]["q"]["weight"], "model.layers.0.self_attn.q_proj.weight", None),
        (got["layers"]["0"]["q"]["bias"], "model.layers.0.self_attn.q_proj.bias", None),
        (got["layers"]["1"]["up"], "model.layers.1.mlp.up.weight", None),
    ]:
        want = weights[name].astype(dtype) if dtype else weights[name]
        for shard in leaf.addressable_shards:
            data = np.asarray(shard.data)
            assert data.dtype == want.dtype
            np.testing.assert_array_equal(data, want[shard.index])
    assert got["step"] == 7 and got["step"].dtype == np.int64


_RENAME = {
    r"model/embed_tokens/weight": "embed",
    r"model/layers/(\d+)/self_attn/q_proj/(.*)": r"layers/\1/q/\2",
    r"model/layers/(\d+)/mlp/up/weight": r"layers/\1/up",
    r"model/norm/step": "step",
}


@pytest.mark.parametrize("which", ["one", "sharded"])
def test_restore_onto_a_mesh_with_rename_drop_and_cast(files, which):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    got = distckpt.restore(
        files[which], _target(mesh), rename=_RENAME, drop=[r"model/mask"], cast=True
    )
    _check_target(got, files["weights"])
    assert got["layers"]["1"]["up"].sharding.spec == P(None, "x", "y")


def test_a_bf16_weight_needs_cast_for_an_f32_target(files):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    with pytest.raises(TreeMismatchError) as e:
        distckpt.restore(files["one"], _target(mesh), rename=_RENAME, drop=[r"model/mask"])
    assert "['embed']: target dtype float32, checkpoint has bfloat16[512, 256]" in str(e.value)
    assert "cast=True" in str(e.value)


def test_any_box_reads_exactly_its_bytes(files):
    """Boxes cut along every dimension (runs apart, adjacent, merged across a page)."""
    rng = np.random.default_rng(1)
    with _sources.open_source(files["one"]) as src:
        assert src.format == "safetensors" and src.info["tensors"] == 6
        for i, spec in enumerate(src.leaves):
            name, _ = src.tensor_of(i)
            full = files["weights"][name]
            for _ in range(25 if full.ndim else 1):
                box = []
                for n in full.shape:
                    a = int(rng.integers(0, n))
                    box.append((a, int(rng.integers(a, n + 1))))
                got = src.read_box(i, tuple(box))
                want = full[tuple(slice(a, b) for a, b in box)].copy()
                assert got.dtype == want.dtype and got.shape == want.shape, spec.display
                np.testing.assert_array_equal(
                    got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)
                )


def test_directory_with_one_file_is_found(files, tmp_path):
    shutil.copy(files["one"], tmp_path / "model.safetensors")
    assert _sources.format_of(tmp_path) == "safetensors"
    _same(distckpt.restore(tmp_path), _nested(files["weights"]))


def test_names_that_cannot_nest_need_a_target(tmp_path):
    path = str(tmp_path / "x.safetensors")
    st.save_file({"a.b": np.zeros(2, np.float32), "a.b.c": np.ones(3, np.float32)}, path)
    with pytest.raises(TreeMismatchError, match=r"\['a'\]\['b'\] is a leaf and also holds"):
        distckpt.restore(path)
    got = distckpt.restore(
        path, {"x": np.zeros(3, np.float32)}, rename={"a/b/c": "x"}, drop=["a/b"]
    )
    np.testing.assert_array_equal(got["x"], np.ones(3, np.float32))


# --------------------------------------------------------------------------- damaged files


def _rewrite_header(src: str, dst: str, edit) -> None:
    """Copies a safetensors file with its JSON header changed by ``edit``."""
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _lie(field, name, value):
    def edit(header):
        header[name][field] = value(header[name][field])

    return edit


BF = "model.embed_tokens.weight"


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("truncated", "ends at byte"),
        ("short_offsets", "takes 262144 bytes"),
        ("past_the_end", "ends at byte"),
        ("overlap", "overlap"),
        ("header_length", "the header says it is"),
        ("not_json", "not valid JSON"),
        ("shape_lies", "takes"),
    ],
)
def test_damaged_files_are_refused_with_the_file_and_tensor(files, tmp_path, damage, expect):
    src, dst = files["one"], str(tmp_path / "bad.safetensors")
    size = os.path.getsize(src)
    if damage == "truncated":
        shutil.copy(src, dst)
        os.truncate(dst, size - 100)
    elif damage == "short_offsets":
        _rewrite_header(src, dst, _lie("data_offsets", BF, lambda o: [o[0], o[1] - 2]))
    elif damage == "past_the_end":
        _rewrite_header(src, dst, _lie("data_offsets", BF, lambda o: [o[0] + size, o[1] + size]))
    elif damage == "overlap":
        # Shift the second tensor's range back over the first one's.
        def edit(header):
            names = sorted(
                (n for n in header if n != "__metadata__"),
                key=lambda n: header[n]["data_offsets"][0],
            )
            a, b = names[0], names[1]
            begin = header[a]["data_offsets"][1] - 4
            nbytes = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
            header[b]["data_offsets"] = [begin, begin + nbytes]

        _rewrite_header(src, dst, edit)
    elif damage == "header_length":
        with open(src, "rb") as f:
            data = bytearray(f.read())
        data[:8] = struct.pack("<Q", size)
        open(dst, "wb").write(data)
    elif damage == "not_json":
        with open(src, "rb") as f:
            data = bytearray(f.read())
        data[8] = ord("[") + 7  # 'b' instead of '{'
        open(dst, "wb").write(data)
    elif damage == "shape_lies":
        _rewrite_header(src, dst, _lie("shape", BF, lambda s: [s[0] + 1, s[1]]))
    with pytest.raises(CorruptCheckpointError) as e:
        distckpt.restore(dst)
    msg = str(e.value)
    assert dst in msg and expect in msg, msg
    if damage not in ("header_length", "not_json", "overlap"):
        assert BF in msg or damage == "truncated"
    assert "Nothing was restored" in msg
    assert e.value.problems


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(files, tmp_path):
    directory = str(tmp_path / "s")
    shutil.copytree(files["sharded"], directory)
    index_path = os.path.join(directory, _st.INDEX_NAME)
    index = json.load(open(index_path))
    index["weight_map"]["model.extra"] = "model-00001-of-00003.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CorruptCheckpointError, match="'model.extra' \\(in model-00001-of-00003"):
        distckpt.restore(directory)
    os.unlink(os.path.join(directory, "model-00002-of-00003.safetensors"))
    with pytest.raises(distckpt.errors.NotCommittedError, match="model-00002-of-00003"):
        distckpt.restore(directory)


def test_a_dtype_distckpt_does_not_read_is_named(files, tmp_path):
    dst = str(tmp_path / "f4.safetensors")
    _rewrite_header(files["one"], dst, _lie("dtype", "model.mask", lambda _: "F4"))
    with pytest.raises(UnsupportedCheckpointError, match="'model.mask' has dtype F4"):
        distckpt.restore(dst)


# --------------------------------------------------------------------------- multi-process


def _read_bytes() -> int:
    """Bytes this process has read through read/pread system calls (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _w_restore(paths: list[str], weights_path: str) -> list[int]:
    import jax

    import distckpt

    weights = dict(np.load(weights_path))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].view(
        ml_dtypes.bfloat16
    )
    mesh = jax.make_mesh((2, 4), ("x", "y"))  # x spans the two processes
    reads = []
    for path in paths:
        before = _read_bytes()
        got = distckpt.restore(
            path, _target(mesh), rename=_RENAME, drop=[r"model/mask"], cast=True, timeout_s=30
        )
        reads.append(_read_bytes() - before)
        _check_target(got, weights)
    return reads


@pytest.fixture(scope="module")
def weights_npz(files, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "w.npz")
    w = dict(files["weights"])
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"].view(np.uint16)
    np.savez(path, **w)
    return path


@pytest.mark.multiprocess
def test_two_processes_each_read_their_shards(files, weights_npz):
    paths = [files["one"], files["sharded"]]
    results = run_processes(
        f"{HERE}:_w_restore", 2, 4, args={"paths": paths, "weights_path": weights_npz}
    )
    total = sum(w.nbytes for w in files["weights"].values())
    for r in results:
        # Each process holds half of the two large weights (x spans the
        # processes); what it reads is that half, the headers and the small ones.
        for read in r.value:
            assert read < 0.55 * total, (r.value, total)


def _w_restore_each(cases: list[list[str]]) -> list[dict]:
    """Restores ``paths[process]`` for each case in turn; what each raised. Last,
    process 1 stalls in the restore past the timeout."""
    import time

    import jax

    import distckpt

    out = []
    for i, paths in enumerate([*cases, cases[-1]]):
        timeout_s = 30.0
        if i == len(cases):
            timeout_s = 1.5
            if jax.process_index() == 1:
                os.environ["DISTCKPT_FAULT"] = "restore.restore:stall=4"
        start = time.monotonic()
        try:
            distckpt.restore(paths[jax.process_index()], timeout_s=timeout_s)
        except distckpt.errors.DistckptError as e:
            out.append(
                {
                    "type": type(e).__name__,
                    "message": str(e),
                    "processes": e.processes,
                    "missing": getattr(e, "missing", None),
                    "seconds": time.monotonic() - start,
                }
            )
        else:
            out.append({"type": None})
    return out


@pytest.mark.multiprocess
def test_one_process_failing_reading_another_file_or_stalling_fails_every_process(files, tmp_path):
    bad = str(tmp_path / "bad.safetensors")
    shutil.copy(files["one"], bad)
    os.truncate(bad, os.path.getsize(bad) - 10)
    other = str(tmp_path / "other.safetensors")
    st.save_file({"x": np.zeros(3, np.float32)}, other)
    cases = [[files["one"], bad], [files["one"], other], [files["one"], files["one"]]]
    results = run_processes(f"{HERE}:_w_restore_each", 2, 2, args={"cases": cases})
    for r in results:
        damaged, different, fine, stalled = r.value
        assert damaged["type"] == "CorruptCheckpointError", damaged
        assert damaged["processes"] == [1] and bad in damaged["message"]
        assert different["type"] == "InconsistentProcessesError", different
        assert "did not read the same checkpoint" in different["message"]
        assert fine["type"] is None  # the job goes on after both
        assert stalled["type"] == "BarrierTimeoutError", stalled  # nothing waits forever
    first = results[0].value[-1]
    assert first["missing"] == [1] and first["seconds"] < 1.5 + 3, first


# --------------------------------------------------------------------------- Hugging Face layout out


def _state() -> dict:
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    w = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
            "b": jnp.arange(32, dtype=jnp.bfloat16),
            "layers": [np.arange(6, dtype=np.int16).reshape(2, 3), np.ones(3, np.float16)],
        },
        "rng": jax.random.key(3),
        "step": 42,
        "lr": 0.125,
        "name": "run",
        "skip": None,
    }


def test_distckpt_to_hf_shards_and_back_is_exact(tmp_path, capsys):
    from distckpt.cli import main

    state = _state()
    distckpt.save(tmp_path / "d", state)
    hf = tmp_path / "hf"
    code = main(
        ["convert", str(tmp_path / "d"), str(hf), "--to", "safetensors"]
        + ["--max-shard-size", "4KiB"]
    )
    assert code == 0, capsys.readouterr().err
    index = json.load(open(hf / _st.INDEX_NAME))
    files = sorted(os.listdir(hf))
    n = len(files) - 1
    assert n == 3 and files[:n] == [
        f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
    ]
    assert index["weight_map"]["params.w"] == "model-00002-of-00003.safetensors"  # 8 KiB: alone
    assert set(index["weight_map"]) == {
        "params.w",
        "params.b",
        "params.layers.0",
        "params.layers.1",
        "rng",
    }
    # Every file as the safetensors library reads it.
    loaded = {}
    for f in files[:n]:
        loaded.update(st.load_file(str(hf / f)))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in loaded.values())
    np.testing.assert_array_equal(loaded["params.w"], np.asarray(state["params"]["w"]))
    np.testing.assert_array_equal(loaded["params.b"], np.asarray(state["params"]["b"]))
    np.testing.assert_array_equal(loaded["rng"], np.asarray(jax.random.key_data(state["rng"])))

    # Back: the export record gives the exact tree (lists, PRNG key, Python values, None).
    back = distckpt.restore(hf)
    assert back["step"] == 42 and back["lr"] == 0.125 and back["name"] == "run"
    assert back["skip"] is None and isinstance(back["params"]["layers"], list)
    np.testing.assert_array_equal(back["params"]["layers"][1], state["params"]["layers"][1])
    assert distckpt.convert(str(hf), str(tmp_path / "d2"), to="distckpt")["from"] == "safetensors"
    assert main(["diff", str(tmp_path / "d"), str(tmp_path / "d2"), "--values"]) == 0
    assert "0 different" in capsys.readouterr().out
    got = distckpt.restore(tmp_path / "d2", distckpt.abstract_like(state))
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.asarray(state["params"]["w"]))
    assert got["params"]["w"].sharding == state["params"]["w"].sharding
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(got["rng"])), np.asarray(jax.random.key_data(state["rng"]))
    )


def test_hf_shards_without_the_record_split_names_at_dots(tmp_path):
    distckpt.save(tmp_path / "d", {"a": {"b": np.arange(4.0)}, "c": [np.ones(2, np.int8)]})
    distckpt.convert(str(tmp_path / "d"), str(tmp_path / "hf"), to="safetensors")
    index_path = tmp_path / "hf" / _st.INDEX_NAME
    index = json.load(open(index_path))
    del index["metadata"]["distckpt"]
    json.dump(index, open(index_path, "w"))
    got = distckpt.restore(tmp_path / "hf")
    assert list(got) == ["a", "c"] and list(got["c"]) == ["0"]
    np.testing.assert_array_equal(got["a"]["b"], np.arange(4.0))
    np.testing.assert_array_equal(got["c"]["0"], np.ones(2, np.int8))


def test_hf_export_refuses_clashing_names_and_bad_sizes(tmp_path, capsys):
    from distckpt.cli import main

    distckpt.save(tmp_path / "d", {"a.b": np.ones(2), "a": {"b": np.zeros(2)}})
    with pytest.raises(ValueError, match="both map to the safetensors name 'a.b'"):
        distckpt.convert(str(tmp_path / "d"), str(tmp_path / "hf"), to="safetensors")
    assert not os.path.exists(tmp_path / "hf")
    args = ["convert", str(tmp_path / "d"), str(tmp_path / "hf2"), "--to", "safetensors"]
    assert main([*args, "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size must be a positive size" in capsys.readouterr().err


def test_hf_export_streams_with_bounded_memory(tmp_path):
    import tracemalloc

    from distckpt import _export

    big = np.arange(4 << 20, dtype=np.float64).reshape(4096, 1024)  # 32 MiB
    distckpt.save(tmp_path / "d", {"big": big, "small": np.ones(8)})
    del big
    with _sources.open_source(tmp_path / "d") as src:
        tracemalloc.start()
        _export.to_hf_safetensors(
            src, str(tmp_path / "hf"), max_shard_bytes=8 << 20, slab_bytes=1 << 20
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes for a 32 MiB leaf"
    with _sources.open_source(tmp_path / "hf") as src:
        i = [s.display for s in src.leaves].index("['big']")
        assert src.read_box(i, ((4095, 4096), (1023, 1024)))[0, 0] == (4 << 20) - 1
    assert sorted(os.listdir(tmp_path / "hf"))[:2] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_shard_plan_keeps_order_and_bound():
    from distckpt._export import shard_plan

    assert shard_plan([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert shard_plan([], 6) == []
    assert shard_plan([7], 6) == [[0]]


def test_inspect_lists_the_tensors_and_their_files(files, capsys):
    from distckpt.cli import main

    assert main(["inspect", files["sharded"]]) == 0
    out = capsys.readouterr().out
    assert "safetensors, 6 tensor(s) in 3 file(s)" in out and "split at '.'" in out
    row = next(line for line in out.splitlines() if line.startswith("model.embed_tokens.weight"))
    assert "(512, 256)" in row and "bfloat16" in row and "model-00001-of-00003" in row
    assert main(["inspect", files["one"], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "safetensors" and doc["files"] == 1
    by_name = {leaf["tensor"]: leaf for leaf in doc["leaves"]}
    assert by_name["model.norm.step"]["shape"] == [] and by_name["model.mask"]["dtype"] == "bool"
    assert by_name["model.layers.0.self_attn.q_proj.bias"]["key_path"] == [
        ["key", p] for p in ["model", "layers", "0", "self_attn", "q_proj", "bias"]
    ]


def _w_convert(src: str, dst: str) -> int:
    import jax

    import distckpt

    assert distckpt.convert(src, dst, to="distckpt")["processes"] == 2
    return jax.process_index()


@pytest.mark.multiprocess
def test_two_processes_convert_hf_shards_to_distckpt(files, tmp_path):
    dst = str(tmp_path / "d")
    results = run_processes(f"{HERE}:_w_convert", 2, 2, args={"src": files["sharded"], "dst": dst})
    assert [r.value for r in results] == [0, 1]
    assert distckpt.metadata(dst).process_count == 2
    _same(distckpt.restore(dst), _nested(files["weights"]))
