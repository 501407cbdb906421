"""Locations (``_location.parse``) and the kvstore commit on ``memory://``: fast, no server."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import distckpt
from distckpt import _location, _storage
from distckpt.errors import CheckpointExistsError


def test_parse_urls_and_specs(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    loc = _location.parse("s3://bkt/a/b/")
    assert loc.display == "s3://bkt/a/b"
    assert loc.spec == {
        "driver": "s3",
        "bucket": "bkt",
        "path": "a/b/",
        "endpoint": "http://127.0.0.1:9000",
        "aws_region": "eu-west-1",
        "use_conditional_write": True,
    }
    assert loc.child("step_00000001").spec["path"] == "a/b/step_00000001/"
    assert loc.child("step_00000001").display == "s3://bkt/a/b/step_00000001"
    monkeypatch.setenv("DISTCKPT_S3_CONDITIONAL_WRITE", "0")
    assert _location.parse("s3://bkt").spec["use_conditional_write"] is False
    assert _location.parse("gs://g/x").spec == {"driver": "gcs", "bucket": "g", "path": "x/"}
    assert _location.parse("memory://m").spec == {"driver": "memory", "path": "m/"}
    assert _location.parse("file:///tmp/x").path == "/tmp/x"
    assert _location.parse({"driver": "gcs", "bucket": "g", "path": "p/"}).display == "gs://g/p"
    with pytest.raises(ValueError, match="names no bucket"):
        _location.parse("s3:///x")
    with pytest.raises(ValueError, match="hdfs:// scheme is not supported"):
        _location.parse("hdfs://x/y")
    with pytest.raises(ValueError, match="'driver'"):
        _location.parse({"bucket": "b"})
    with pytest.raises(TypeError, match="kvstore spec"):
        _location.parse(3)


def test_retry_settings_become_a_context(monkeypatch):
    monkeypatch.setenv("DISTCKPT_STORAGE_RETRIES", "3")
    monkeypatch.setenv("DISTCKPT_STORAGE_RETRY_DELAY_S", "0.1")
    policy = {"max_retries": 3, "initial_delay": "100ms", "max_delay": "800ms"}
    assert _location.context_spec() == {"s3_request_retries": policy, "gcs_request_retries": policy}
    monkeypatch.setenv("DISTCKPT_STORAGE_RETRIES", "0")
    with pytest.raises(ValueError, match="DISTCKPT_STORAGE_RETRIES"):
        _location.context_spec()


def test_memory_commit_is_create_only():
    """A commit that finds a manifest preflight did not see loses, cleanly."""
    url = f"memory://{uuid.uuid4().hex}"
    a, b = _storage.open_storage(url), _storage.open_storage(url)
    pa, pb = (s.preflight(overwrite=False) for s in (a, b))
    assert pa.manifest is None and pb.manifest is None
    b.commit_manifest(b'{"attempt": "attempt-b"}', "attempt-b", pb)
    with pytest.raises(CheckpointExistsError, match="appeared while this save was writing"):
        a.commit_manifest(b'{"attempt": "attempt-a"}', "attempt-a", pa)
    assert a.read_manifest() == b'{"attempt": "attempt-b"}'
    # overwrite=True: conditional on the generation preflight read.
    c, d = _storage.open_storage(url), _storage.open_storage(url)
    pc, pd = (s.preflight(overwrite=True) for s in (c, d))
    assert pc.manifest is not None and pd.manifest is not None
    d.commit_manifest(b'{"attempt": "attempt-d"}', "attempt-d", pd)
    with pytest.raises(CheckpointExistsError, match="was replaced by another save"):
        c.commit_manifest(b'{"attempt": "attempt-c"}', "attempt-c", pc)
    assert c.read_manifest() == b'{"attempt": "attempt-d"}'


def test_memory_manager_retention_and_cleanup():
    url = f"memory://{uuid.uuid4().hex}"
    with distckpt.CheckpointManager(url, max_to_keep=2, async_save=False) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"x": np.arange(4) + step})
        assert mgr.path(3) == f"{url}/step_00000003"
    root = _storage.open_storage(url)
    assert root.entries() == ["step_00000003", "step_00000004"]
    # A deletion that stopped between marker and data: not a step, cleaned on start.
    root.child("step_00000003").kv.write("manifest.json", None).result()
    mgr = distckpt.CheckpointManager(url)
    assert mgr.all_steps() == [4]
    assert root.entries() == ["step_00000004"]
    np.testing.assert_array_equal(mgr.restore(4)["x"], np.arange(4) + 4)
