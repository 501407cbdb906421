"""Random corruption, property-based (docs/reliability.md, case 9).

One checkpoint is saved per test; every example damages a fresh copy of it:
flips a bit, truncates, or zeroes a range, in a file chosen at random among
all of its files (data files and manifest.json). Every byte of a checkpoint
is covered by a checksum (chunks by theirs, the manifest by its own), so:

* if the damaged file's bytes differ from the original, ``verify`` and
  ``restore`` raise ``CorruptCheckpointError`` naming that file;
* if they do not (zeroing bytes that were zero, truncating to the full
  length), both succeed and ``restore`` returns exactly what was saved.

Never a wrong value, never another exception.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _knobs
from distckpt.errors import CorruptCheckpointError

# (kind, which file, where in it, which bit, how many bytes): fractions, so
# that the strategy needs no checkpoint to exist when the module loads.
FRACTION = st.floats(0, 1, exclude_max=True, allow_nan=False)
DAMAGE = st.tuples(
    st.sampled_from(["flip", "truncate", "zero"]),
    FRACTION,
    FRACTION,
    st.integers(0, 7),
    st.integers(1, 512),
)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # the checkout is shared: keep no example database in it
        suppress_health_check=[HealthCheck.too_slow],
    )


def _tree() -> dict:
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[:4] = 0  # zeros: zeroing them changes nothing, and must pass
    return {
        "w": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
        "h": jax.device_put(
            jnp.asarray(w[:8, :8], jnp.bfloat16), NamedSharding(mesh, P(None, "y"))
        ),
        "i8": jax.device_put(np.arange(40, dtype=np.int8), NamedSharding(mesh, P())),
        "flag": jax.device_put(np.array([True, False, True])),
        "key": jax.random.key(3),
        "table": np.arange(10, dtype=np.int64),
        "step": 12,
        "name": "run-1",
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption") / "c"
    tree = _tree()
    # Small chunks and segments: many chunks, several data files.
    with _knobs.override(chunk_bytes=256, segment_bytes=700):
        distckpt.save(root, tree)
    files = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )
    assert len(files) >= 4 and "manifest.json" in files
    expected = distckpt.restore(root)
    return root, files, expected


def _damage(path: str, kind: str, where: float, bit: int, length: int) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        if not data:
            return
        at = int(where * len(data))
        if kind == "flip":
            data[at] ^= 1 << bit
        elif kind == "zero":
            data[at : at + length] = bytes(len(data[at : at + length]))
        else:  # truncate to `at` bytes
            del data[at:]
        f.seek(0)
        f.truncate()
        f.write(data)


def _same(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if isinstance(x, (np.ndarray, jax.Array)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()  # bit for bit (NaNs included)
        else:
            assert type(x) is type(y) and x == y


def _check(root, original_root, damaged: set[str], expected) -> None:
    """The property: damage is reported, naming a damaged file; no damage, no error."""
    changed = sorted(
        rel
        for rel in damaged
        if open(os.path.join(root, rel), "rb").read()
        != open(os.path.join(original_root, rel), "rb").read()
    )
    names = [os.path.basename(rel) for rel in changed]
    for read in (distckpt.verify, distckpt.restore):
        if not changed:
            out = read(root)
            if read is distckpt.restore:
                _same(out, expected)
            continue
        with pytest.raises(CorruptCheckpointError) as info:
            read(root)
        text = str(info.value) + "\n".join(getattr(info.value, "problems", []))
        assert any(n in text for n in names), (names, text)


def _fresh_copy(saved_root) -> str:
    work = tempfile.mkdtemp(prefix="distckpt-corrupt-")
    shutil.copytree(saved_root, os.path.join(work, "c"))
    return work


@_settings(500)
@given(damage=DAMAGE)
def test_one_random_damage_is_detected_or_harmless(saved, damage):
    root, files, expected = saved
    kind, which, where, bit, length = damage
    rel = files[int(which * len(files))]
    work = _fresh_copy(root)
    try:
        copy = os.path.join(work, "c")
        _damage(os.path.join(copy, rel), kind, where, bit, length)
        _check(copy, root, {rel}, expected)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@_settings(150)
@given(damages=st.lists(DAMAGE, min_size=2, max_size=4))
def test_several_random_damages_are_detected_or_harmless(saved, damages):
    root, files, expected = saved
    work = _fresh_copy(root)
    try:
        copy = os.path.join(work, "c")
        hit = set()
        for kind, which, where, bit, length in damages:
            rel = files[int(which * len(files))]
            _damage(os.path.join(copy, rel), kind, where, bit, length)
            hit.add(rel)
        _check(copy, root, hit, expected)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@_settings(100)
@given(damage=DAMAGE)
def test_a_resharded_restore_never_returns_damaged_data(saved, damage):
    """The device path (sharded targets, adopted buffers) obeys the same property."""
    root, files, expected = saved
    kind, which, where, bit, length = damage
    data_files = [f for f in files if f.endswith(".bin")]
    rel = data_files[int(which * len(data_files))]
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    target = {
        "w": jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=NamedSharding(mesh, P("b", "a"))),
        "h": jax.ShapeDtypeStruct((8, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("a"))),
    }
    work = _fresh_copy(root)
    try:
        copy = os.path.join(work, "c")
        _damage(os.path.join(copy, rel), kind, where, bit, length)
        changed = open(os.path.join(copy, rel), "rb").read() != open(root / rel, "rb").read()
        try:
            out = distckpt.restore(copy, target, partial=True)
        except CorruptCheckpointError as e:
            assert changed and os.path.basename(rel) in str(e)
            return
        # It returned: every value it gave back is exactly what was saved
        # (the damage, if any, was in chunks this restore did not need).
        for name in ("w", "h"):
            np.testing.assert_array_equal(
                np.asarray(out[name]).view(np.uint8), np.asarray(expected[name]).view(np.uint8)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
