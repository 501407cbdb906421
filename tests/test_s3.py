"""Object storage against a real S3 server (moto on loopback, tests/s3.py).

Single-process tests run here on the 8 fake devices of conftest.py; the
multi-process ones pass the server's endpoint and credentials to their
workers through the environment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _faults
from distckpt.errors import (
    CheckpointExistsError,
    NotCommittedError,
    StorageUnavailableError,
)
from tests import s3 as _s3
from tests.s3 import server_env, start_server

# The fixtures, here so that pytest finds them (conftest.py is shared).
s3_server = _s3.s3_server
s3_url = _s3.s3_url

HERE = "tests.test_s3"
SHAPE = (16, 12)


def _bucket_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def _value() -> np.ndarray:
    return np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)


def _put(mesh_shape, names, spec) -> jax.Array:
    mesh = jax.make_mesh(mesh_shape, names)
    v = _value()
    return jax.make_array_from_callback(SHAPE, NamedSharding(mesh, spec), lambda i: v[i])


def _target(mesh_shape, names, spec) -> dict:
    mesh = jax.make_mesh(mesh_shape, names)
    return {
        "w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=NamedSharding(mesh, spec)),
        "step": 0,
    }


def _wait_for_hit(point: str, timeout_s: float = 20.0) -> None:
    """Until a ``DISTCKPT_FAULT`` point of this process has been reached."""
    deadline = time.monotonic() + timeout_s
    while not any(k.startswith(f"{point}:") for k in _faults._hits):
        if time.monotonic() > deadline:
            raise AssertionError(f"fault point {point} was not reached in {timeout_s} s")
        time.sleep(0.01)


# --------------------------------------------------------------------------- two processes


def save_while_the_server_stops(url: str, stop: Callable[[], None]) -> str:
    """Saves to ``url`` and calls ``stop`` once the save writes (``DISTCKPT_FAULT`` stalls
    the first fsync): the save must fail with a typed error within the retries. Returns
    its message."""
    stopped = threading.Event()

    def stop_when_writing() -> None:
        _wait_for_hit("write.fsync")
        stop()
        stopped.set()

    stopper = threading.Thread(target=stop_when_writing)
    stopper.start()
    began = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        distckpt.save(url, {"w": _put((8,), ("x",), P("x"))})
    stopper.join(timeout=30)
    assert stopped.is_set() and time.monotonic() - began < 20
    message = str(info.value)
    assert f"{url}/attempt-" in message and "process 0" in message
    assert "retry attempts failed" in message
    assert isinstance(info.value, ConnectionError)
    return message


def _w_save_restore_manager(url: str) -> dict:
    """2 processes x 4 devices: save, resharded restore, and a manager with retention."""
    save_mesh = ((2, 4), ("x", "y"), P("x", "y"))
    distckpt.save(url + "/one", {"w": _put(*save_mesh), "step": 3}, metadata={"k": 1})
    from jax.experimental import multihost_utils

    out = distckpt.restore(url + "/one", _target((4, 2), ("a", "b"), P("b", "a")))
    gathered = multihost_utils.process_allgather(out["w"], tiled=True)
    ok = bool(np.array_equal(np.asarray(gathered), _value()))
    with distckpt.CheckpointManager(url + "/run", max_to_keep=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": _put(*save_mesh), "step": step}, metrics={"loss": 1.0 / step})
        mgr.wait_until_finished()
        steps = mgr.all_steps()
    again = distckpt.CheckpointManager(url + "/run")
    back = again.restore(None, _target((8,), ("z",), P("z")))
    return {
        "ok": ok,
        "step": out["step"],
        "steps": steps,
        "reopened": again.all_steps(),
        "restored_step": back["step"],
    }


# --------------------------------------------------------------------------- one process


def test_spec_dict_location(s3_server, s3_url):
    bucket, prefix = _bucket_prefix(s3_url)
    spec = {
        "driver": "s3",
        "bucket": bucket,
        "path": prefix + "/spec/",
        "endpoint": s3_server.endpoint,
        "aws_region": "us-east-1",
    }
    distckpt.save(spec, {"w": _put((8,), ("x",), P("x"))})
    out = distckpt.restore(s3_url + "/spec")  # the same place, named by URL
    np.testing.assert_array_equal(out["w"], _value())
    with distckpt.CheckpointManager({**spec, "path": prefix + "/mspec"}) as mgr:
        mgr.save(1, {"w": _put((8,), ("x",), P("x"))}, blocking=True)
        assert mgr.path(1)["path"] == prefix + "/mspec/step_00000001/"
    assert distckpt.CheckpointManager(s3_url + "/mspec").all_steps() == [1]


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_commits_of_one_step(s3_server, s3_url, monkeypatch, overwrite):
    """Save A stalls just before its conditional commit; save B commits meanwhile.

    A's create-only (or generation-conditional) write then fails, and A gets
    CheckpointExistsError; B's checkpoint is intact and its data kept.
    """
    url = s3_url + "/c"
    if overwrite:
        distckpt.save(url, {"w": _put((8,), ("x",), P("x")), "who": "first"})
    monkeypatch.setenv("DISTCKPT_FAULT", "commit.rename:stall=1.5*1")
    _faults.reset()
    outcome: dict = {}

    def save_a() -> None:
        try:
            distckpt.save(url, {"w": _put((8,), ("x",), P("x")), "who": "A"}, overwrite=overwrite)
            outcome["A"] = None
        except Exception as e:  # noqa: BLE001 - inspected below
            outcome["A"] = e

    a = threading.Thread(target=save_a)
    a.start()
    _wait_for_hit("commit.rename")  # A has written its data and waits to commit
    distckpt.save(url, {"w": _put((8,), ("x",), P("x")), "who": "B"}, overwrite=overwrite)
    a.join(timeout=30)
    assert not a.is_alive()
    assert isinstance(outcome["A"], CheckpointExistsError), outcome["A"]
    expected = "was replaced by another save" if overwrite else "appeared while this save"
    assert expected in str(outcome["A"]) and "manifest.json" in str(outcome["A"])
    monkeypatch.delenv("DISTCKPT_FAULT")
    assert distckpt.restore(url)["who"] == "B"
    assert distckpt.verify(url).leaves == 2
    bucket, prefix = _bucket_prefix(url)
    attempts = {k.split("/")[2] for k in s3_server.keys(bucket, prefix + "/") if "/attempt-" in k}
    assert len(attempts) == 1  # A's attempt was discarded, B's is the committed one


def test_server_stopped_mid_save(s3_server, monkeypatch):
    """A second server is stopped while the save writes: a typed error after
    the (short) retries, and nothing committed once the store is back."""
    server, endpoint = start_server()
    stopped = False
    try:
        bucket = "t-stopped-mid-save"
        s3_server.client(endpoint).create_bucket(Bucket=bucket)
        for k, v in server_env(endpoint).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTCKPT_FAULT", "write.fsync:stall=1*1")
        _faults.reset()
        message = save_while_the_server_stops(f"s3://{bucket}/c", server.stop)
        stopped = True
        assert "AWS_ENDPOINT_URL" in message
    finally:
        if not stopped:
            server.stop()
    # moto keeps its state in this process: the session server shows the bucket.
    keys = s3_server.keys(bucket)
    assert not [k for k in keys if k.endswith("manifest.json")], keys
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.delenv("DISTCKPT_FAULT")
    with pytest.raises(NotCommittedError):
        distckpt.restore(f"s3://{bucket}/c")


def test_unreachable_endpoint_is_typed(s3_server, monkeypatch):
    from tests.mp import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailableError, match="manifest.json"):
        distckpt.restore("s3://nowhere-bucket/c")


def test_handler_api_on_s3(s3_url):
    import numpy as np

    import distckpt

    with distckpt.CheckpointHandler() as h:
        for step in (1, 2, 3):
            h.save(s3_url, {"v": np.full(4, float(step))}, step=step, keep=2)
        assert h.get_checkpoint_steps(s3_url) == [2, 3]
        assert h.restore(s3_url)["v"][0] == 3.0
        h.save(s3_url + "/single", {"v": np.arange(3)})
        assert h.restore(s3_url + "/single")["v"].tolist() == [0, 1, 2]
