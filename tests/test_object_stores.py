"""The cases every object store must pass, on S3 (moto) and GCS (fake-gcs-server), both
on loopback: tests/s3.py and tests/gcs.py. Cases of one store only stay in
tests/test_s3.py and tests/test_gcs.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.errors import CheckpointExistsError, CorruptCheckpointError, NotCommittedError
from tests import gcs as _gcs
from tests import s3 as _s3
from tests.mp import run_processes
from tests.test_s3 import _put, _target, _value

s3_server, s3_url = _s3.s3_server, _s3.s3_url
gcs_server, gcs_url = _gcs.gcs_server, _gcs.gcs_url


@dataclass
class Store:
    url: str  # s3://<fresh bucket>/ckpt or gs://...
    server: Any  # keys(bucket, prefix), get(bucket, key), put(bucket, key, data)

    def bucket_prefix(self, url: str) -> tuple[str, str]:
        bucket, _, prefix = url.split("://", 1)[1].partition("/")
        return bucket, prefix


@pytest.fixture(params=["s3", "gcs"])
def store(request) -> Store:
    return Store(
        request.getfixturevalue(f"{request.param}_url"),
        request.getfixturevalue(f"{request.param}_server"),
    )


@pytest.mark.multiprocess
def test_two_processes_save_restore_reshard_and_manager(store):
    results = run_processes(
        "tests.test_s3:_w_save_restore_manager", 2, 4, args={"url": store.url}, env=store.server.env
    )
    for r in results:
        assert r.value == {
            "ok": True,
            "step": 3,
            "steps": [2, 3],
            "reopened": [2, 3],
            "restored_step": 3,
        }
    bucket, prefix = store.bucket_prefix(store.url)
    keys = store.server.keys(bucket, prefix + "/")
    data = [k for k in keys if k.startswith(f"{prefix}/one/attempt-")]
    assert {k.rsplit("/", 1)[1] for k in data} == {
        "p00000.s000.bin",
        "p00001.s000.bin",
        "p00000.idx",
        "p00001.idx",
    }
    # Retention deleted step 1 entirely: marker and data.
    assert not [k for k in keys if "/run/step_00000001/" in k]
    assert {k.split("/")[2] for k in keys if "/run/" in k} == {"step_00000002", "step_00000003"}
    # One process, 8 devices, another mesh: reshards what two processes wrote.
    out = distckpt.restore(store.url + "/one", _target((2, 4), ("p", "q"), P(("q", "p"), None)))
    np.testing.assert_array_equal(np.asarray(out["w"]), _value())
    info = distckpt.metadata(store.url + "/one")
    assert info.process_count == 2 and info.user_metadata == {"k": 1}
    assert distckpt.verify(store.url + "/one").leaves == 2


def test_roundtrip_overwrite_and_manager_retention(store):
    x = _put((8,), ("x",), P("x"))
    distckpt.save(store.url + "/c", {"w": x, "step": 5})
    assert distckpt.is_committed(store.url + "/c")
    out = distckpt.restore(store.url + "/c", _target((2, 4), ("a", "b"), P("b", "a")))
    np.testing.assert_array_equal(np.asarray(out["w"]), _value())
    with pytest.raises(CheckpointExistsError, match="already exists"):
        distckpt.save(store.url + "/c", {"w": x, "step": 6})
    distckpt.save(store.url + "/c", {"w": x, "step": 7}, overwrite=True)
    assert distckpt.restore(store.url + "/c")["step"] == 7

    with distckpt.CheckpointManager(
        store.url + "/run", max_to_keep=2, keep_every_n_steps=4, async_save=True
    ) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"w": x, "step": step})
        assert mgr.path(4) == store.url + "/run/step_00000004"
    bucket, prefix = store.bucket_prefix(store.url)

    def steps() -> set[str]:
        return {k.split("/")[2] for k in store.server.keys(bucket, f"{prefix}/run/")}

    assert steps() == {"step_00000004", "step_00000005", "step_00000006"}
    reopened = distckpt.CheckpointManager(store.url + "/run")
    assert reopened.all_steps() == [4, 5, 6]
    reopened.delete(5)
    assert steps() == {"step_00000004", "step_00000006"}


def test_prefix_without_marker_and_foreign_attempts_are_ignored(store):
    bucket, prefix = store.bucket_prefix(store.url)
    # Data of a save that never committed: no manifest.json.
    store.server.put(bucket, f"{prefix}/u/attempt-0123456789abcdef/p00000.s000.bin", b"x" * 64)
    with pytest.raises(NotCommittedError, match="interrupted before it committed"):
        distckpt.restore(store.url + "/u")
    assert not distckpt.is_committed(store.url + "/u")

    # A manager directory: a committed step, an uncommitted one, and a
    # stray attempt inside the committed step.
    with distckpt.CheckpointManager(store.url + "/run") as mgr:
        mgr.save(1, {"w": _put((8,), ("x",), P("x"))}, blocking=True)
    stray = f"{prefix}/run/step_00000001/attempt-00000000000000aa/p00000.s000.bin"
    partial = f"{prefix}/run/step_00000002/attempt-00000000000000bb/p00000.s000.bin"
    foreign = f"{prefix}/run/notes.txt"
    for key in (stray, partial, foreign):
        store.server.put(bucket, key, b"junk")
    mgr = distckpt.CheckpointManager(store.url + "/run", clean_on_start=False)
    assert mgr.all_steps() == [1]
    assert stray in store.server.keys(bucket, prefix)
    np.testing.assert_array_equal(np.asarray(mgr.restore(1)["w"]), _value())
    mgr = distckpt.CheckpointManager(store.url + "/run")  # cleans our leftovers only
    keys = store.server.keys(bucket, prefix)
    assert stray not in keys and partial not in keys and foreign in keys
    assert mgr.all_steps() == [1]


def test_flipped_bit_in_an_object_is_detected(store):
    url = store.url + "/c"
    distckpt.save(url, {"w": _put((8,), ("x",), P("x"))})
    bucket, prefix = store.bucket_prefix(url)
    [key] = [k for k in store.server.keys(bucket, prefix + "/") if k.endswith(".bin")]
    body = bytearray(store.server.get(bucket, key))
    body[100] ^= 0x10
    store.server.put(bucket, key, bytes(body))
    with pytest.raises(CorruptCheckpointError, match="p00000.s000.bin"):
        distckpt.restore(url)
    with pytest.raises(CorruptCheckpointError):
        distckpt.verify(url)


def test_cli(store, capsys):
    from distckpt.cli import main

    x = _put((8,), ("x",), P("x"))
    with distckpt.CheckpointManager(store.url + "/run") as mgr:
        mgr.save(1, {"w": x}, metrics={"loss": 0.5}, blocking=True)
        mgr.save(2, {"w": x}, metrics={"loss": 0.25}, blocking=True)
    bucket, prefix = store.bucket_prefix(store.url)
    leftover = f"{prefix}/run/step_00000003/attempt-00000000000000cc/p.bin"
    store.server.put(bucket, leftover, b"x")
    assert main(["ls", store.url + "/run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()[1:4]]
    assert rows == [["1", "committed"], ["2", "committed"], ["3", "uncommitted"]], out
    assert main(["verify", "--all", store.url + "/run"]) == 0
    assert main(["inspect", store.url + "/run/step_00000002"]) == 0
    capsys.readouterr()
    assert main(["gc", store.url + "/run"]) == 0  # lists leftovers on an object store, keeps them
    assert leftover in store.server.keys(bucket)
