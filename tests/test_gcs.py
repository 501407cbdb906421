"""Object storage against a real GCS emulator (fake-gcs-server on loopback, tests/gcs.py).

The same cases as tests/test_s3.py, on ``gs://``. The emulator does not
enforce ``ifGenerationMatch``, so the race between two commits is tested
through the enforcing proxy of tests/wire_proxy.py (tests/test_wire.py),
not here; test_the_emulator_does_not_enforce_preconditions pins that limit.
"""

from __future__ import annotations

import urllib.parse
import urllib.request

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _faults
from distckpt.errors import (
    StorageUnavailableError,
)
from tests import gcs as _gcs
from tests.gcs import GcsProcess, GcsServer, server_env
from tests.test_s3 import _put, _value, save_while_the_server_stops

gcs_server = _gcs.gcs_server
gcs_url = _gcs.gcs_url


def _bucket_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return bucket, prefix


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


def test_server_stopped_mid_save(gcs_server, tmp_path, monkeypatch):
    """A second server, keeping its objects in files, is stopped while the
    save writes: a typed error after the (short) retries; started again on
    the same files, it holds no commit."""
    root = str(tmp_path / "objects")
    process = GcsProcess(root)
    bucket = "t-stopped-mid-save"  # the bucket names the driver TensorStore opens
    try:
        GcsServer(process.endpoint, {}).create_bucket(bucket)
        for k, v in server_env(process.endpoint).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTCKPT_FAULT", "write.fsync:stall=1*1")
        _faults.reset()
        message = save_while_the_server_stops(f"gs://{bucket}/c", process.stop)
        assert "TENSORSTORE_GCS_HTTP_URL" in message
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
