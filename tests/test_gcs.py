"""Object storage against a real GCS emulator (fake-gcs-server on loopback, tests/gcs.py).

The same cases as tests/test_s3.py, on ``gs://``. The emulator does not
enforce ``ifGenerationMatch``, so the race between two commits is tested
through the enforcing proxy of tests/wire_proxy.py (tests/test_wire.py),
not here; test_the_emulator_does_not_enforce_preconditions pins that limit.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _faults
from distckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    NotCommittedError,
    StorageUnavailableError,
)
from tests import gcs as _gcs
from tests.gcs import GcsProcess, GcsServer, server_env
from tests.mp import run_processes
from tests.test_s3 import _put, _target, _value, _wait_for_hit

gcs_server = _gcs.gcs_server
gcs_url = _gcs.gcs_url


def _bucket_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return bucket, prefix


@pytest.mark.multiprocess
def test_two_processes_save_restore_reshard_and_manager(gcs_server, gcs_url):
    results = run_processes(
        "tests.test_s3:_w_save_restore_manager", 2, 4, args={"url": gcs_url}, env=gcs_server.env
    )
    for r in results:
        assert r.value == {
            "ok": True,
            "step": 3,
            "steps": [2, 3],
            "reopened": [2, 3],
            "restored_step": 3,
        }
    bucket, prefix = _bucket_prefix(gcs_url)
    keys = gcs_server.keys(bucket, prefix + "/")
    data = [k for k in keys if k.startswith(f"{prefix}/one/attempt-")]
    assert {k.rsplit("/", 1)[1] for k in data} == {
        "p00000.s000.bin",
        "p00001.s000.bin",
        "p00000.idx",
        "p00001.idx",
    }
    assert {k.split("/")[2] for k in keys if "/run/" in k} == {"step_00000002", "step_00000003"}
    # One process, 8 devices, another mesh: reshards what two processes wrote.
    out = distckpt.restore(gcs_url + "/one", _target((2, 4), ("p", "q"), P(("q", "p"), None)))
    np.testing.assert_array_equal(np.asarray(out["w"]), _value())
    info = distckpt.metadata(gcs_url + "/one")
    assert info.process_count == 2 and info.user_metadata == {"k": 1}
    assert distckpt.verify(gcs_url + "/one").leaves == 2


def test_roundtrip_and_manager_retention(gcs_server, gcs_url):
    x = _put((8,), ("x",), P("x"))
    distckpt.save(gcs_url + "/c", {"w": x, "step": 5})
    assert distckpt.is_committed(gcs_url + "/c")
    out = distckpt.restore(gcs_url + "/c", _target((2, 4), ("a", "b"), P("b", "a")))
    np.testing.assert_array_equal(np.asarray(out["w"]), _value())
    with pytest.raises(CheckpointExistsError, match="already exists"):
        distckpt.save(gcs_url + "/c", {"w": x, "step": 6})
    distckpt.save(gcs_url + "/c", {"w": x, "step": 7}, overwrite=True)
    assert distckpt.restore(gcs_url + "/c")["step"] == 7

    with distckpt.CheckpointManager(
        gcs_url + "/run", max_to_keep=2, keep_every_n_steps=4, async_save=True
    ) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"w": x, "step": step})
        assert mgr.path(4) == gcs_url + "/run/step_00000004"
    bucket, prefix = _bucket_prefix(gcs_url)
    steps = {k.split("/")[2] for k in gcs_server.keys(bucket, f"{prefix}/run/")}
    assert steps == {"step_00000004", "step_00000005", "step_00000006"}
    reopened = distckpt.CheckpointManager(gcs_url + "/run")
    assert reopened.all_steps() == [4, 5, 6]
    reopened.delete(5)
    assert {k.split("/")[2] for k in gcs_server.keys(bucket, f"{prefix}/run/")} == {
        "step_00000004",
        "step_00000006",
    }


def test_spec_dict_location(gcs_server, gcs_url):
    bucket, prefix = _bucket_prefix(gcs_url)
    # With a driver option, as docs/storage.md shows it.
    spec = {
        "driver": "gcs",
        "bucket": bucket,
        "path": prefix + "/spec/",
        "gcs_request_concurrency": {"limit": 4},
    }
    distckpt.save(spec, {"w": _put((8,), ("x",), P("x"))})
    out = distckpt.restore(gcs_url + "/spec")  # the same place, named by URL
    np.testing.assert_array_equal(out["w"], _value())


def test_prefix_without_marker_and_foreign_attempts_are_ignored(gcs_server, gcs_url):
    bucket, prefix = _bucket_prefix(gcs_url)
    gcs_server.put(bucket, f"{prefix}/u/attempt-0123456789abcdef/p00000.s000.bin", b"x" * 64)
    with pytest.raises(NotCommittedError, match="interrupted before it committed"):
        distckpt.restore(gcs_url + "/u")
    assert not distckpt.is_committed(gcs_url + "/u")

    with distckpt.CheckpointManager(gcs_url + "/run") as mgr:
        mgr.save(1, {"w": _put((8,), ("x",), P("x"))}, blocking=True)
    stray = f"{prefix}/run/step_00000001/attempt-00000000000000aa/p00000.s000.bin"
    partial = f"{prefix}/run/step_00000002/attempt-00000000000000bb/p00000.s000.bin"
    foreign = f"{prefix}/run/notes.txt"
    for key in (stray, partial, foreign):
        gcs_server.put(bucket, key, b"junk")
    mgr = distckpt.CheckpointManager(gcs_url + "/run", clean_on_start=False)
    assert mgr.all_steps() == [1]
    np.testing.assert_array_equal(np.asarray(mgr.restore(1)["w"]), _value())
    mgr = distckpt.CheckpointManager(gcs_url + "/run")  # cleans our leftovers only
    keys = gcs_server.keys(bucket, prefix)
    assert stray not in keys and partial not in keys and foreign in keys
    assert mgr.all_steps() == [1]


def test_flipped_bit_in_an_object_is_detected(gcs_server, gcs_url):
    url = gcs_url + "/c"
    distckpt.save(url, {"w": _put((8,), ("x",), P("x"))})
    bucket, prefix = _bucket_prefix(url)
    [key] = [k for k in gcs_server.keys(bucket, prefix + "/") if k.endswith(".bin")]
    body = bytearray(gcs_server.get(bucket, key))
    body[100] ^= 0x10
    gcs_server.put(bucket, key, bytes(body))
    with pytest.raises(CorruptCheckpointError, match="p00000.s000.bin"):
        distckpt.restore(url)
    with pytest.raises(CorruptCheckpointError):
        distckpt.verify(url)


def test_server_stopped_mid_save(gcs_server, tmp_path, monkeypatch):
    """A second server, keeping its objects in files, is stopped while the
    save writes: a typed error after the (short) retries; started again on
    the same files, it holds no commit."""
    root = str(tmp_path / "objects")
    process = GcsProcess(root)
    stopped = False
    bucket = "t-stopped-mid-save"  # the bucket names the driver TensorStore opens
    try:
        GcsServer(process.endpoint, {}).create_bucket(bucket)
        for k, v in server_env(process.endpoint).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTCKPT_FAULT", "write.fsync:stall=1*1")
        _faults.reset()
        url = f"gs://{bucket}/c"

        def stop_when_writing() -> None:
            nonlocal stopped
            _wait_for_hit("write.fsync")
            process.stop()
            stopped = True

        stopper = threading.Thread(target=stop_when_writing)
        stopper.start()
        began = time.monotonic()
        with pytest.raises(StorageUnavailableError) as info:
            distckpt.save(url, {"w": _put((8,), ("x",), P("x"))})
        stopper.join(timeout=30)
        assert stopped and time.monotonic() - began < 20
        message = str(info.value)
        assert f"gs://{bucket}/c/attempt-" in message and "process 0" in message
        assert "retry attempts failed" in message and "TENSORSTORE_GCS_HTTP_URL" in message
        assert isinstance(info.value, ConnectionError)
    finally:
        process.stop()
    back = GcsProcess(root)
    try:
        keys = GcsServer(back.endpoint, {}).keys(bucket)
        assert any("/attempt-" in k for k in keys), keys  # the save had begun writing
        assert not [k for k in keys if k.endswith("manifest.json")], keys
    finally:
        back.stop()


def test_unreachable_endpoint_is_typed(gcs_server, monkeypatch):
    from tests.mp import free_port

    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailableError, match="manifest.json"):
        distckpt.restore("gs://nowhere-bucket/c")


def test_cli_on_gcs(gcs_server, gcs_url, capsys):
    from distckpt.cli import main

    x = _put((8,), ("x",), P("x"))
    with distckpt.CheckpointManager(gcs_url + "/run") as mgr:
        mgr.save(1, {"w": x}, metrics={"loss": 0.5}, blocking=True)
        mgr.save(2, {"w": x}, metrics={"loss": 0.25}, blocking=True)
    bucket, prefix = _bucket_prefix(gcs_url)
    leftover = f"{prefix}/run/step_00000003/attempt-00000000000000cc/p.bin"
    gcs_server.put(bucket, leftover, b"x")
    assert main(["ls", gcs_url + "/run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()[1:4]]
    assert rows == [["1", "committed"], ["2", "committed"], ["3", "uncommitted"]], out
    assert main(["verify", "--all", gcs_url + "/run"]) == 0
    assert main(["inspect", gcs_url + "/run/step_00000002"]) == 0
    capsys.readouterr()
    assert main(["gc", gcs_url + "/run"]) == 0  # lists leftovers on an object store, keeps them
    assert leftover in gcs_server.keys(bucket)


def test_the_emulator_does_not_enforce_preconditions(gcs_server, gcs_url):
    """Why tests/test_wire.py exists: fake-gcs-server lets a second
    create-only upload (``ifGenerationMatch=0``) replace the first. Should a
    release start answering 412, the docs' note on the emulator's limits
    (docs/storage.md) is out of date."""
    bucket, _ = _bucket_prefix(gcs_url)
    upload = f"{gcs_server.endpoint}/upload/storage/v1/b/{bucket}/o?" + urllib.parse.urlencode(
        {"uploadType": "media", "name": "k", "ifGenerationMatch": "0"}
    )
    for body in (b"first", b"second"):
        with urllib.request.urlopen(urllib.request.Request(upload, data=body, method="POST")) as r:
            assert r.status == 200
    assert gcs_server.get(bucket, "k") == b"second"
