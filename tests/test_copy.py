"""distckpt.copy and `distckpt copy`: between storages, checked, committed like a save."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _knobs
from distckpt.cli import main
from distckpt.errors import CheckpointExistsError, CorruptCheckpointError, NotCommittedError
from tests.gcs import gcs_server, gcs_url  # noqa: F401 - fixtures
from tests.s3 import s3_server, s3_url  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def source(tmp_path):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    tree = {
        "w": jax.device_put(
            np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32),
            NamedSharding(mesh, P("x", "y")),
        ),
        "n": np.arange(1000, dtype=np.int64),
        "step": 7,
        "key": jax.random.key(3),
    }
    # Small chunks and segments: several files, many chunks.
    with _knobs.override(chunk_bytes=1024, segment_bytes=4096):
        distckpt.save(tmp_path / "src", tree, metadata={"note": "orig"})
    return tmp_path / "src", tree


def _same(a_path, b_path):
    a, b = distckpt.restore(a_path), distckpt.restore(b_path)
    a["key"], b["key"] = jax.random.key_data(a["key"]), jax.random.key_data(b["key"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert distckpt.metadata(b_path).user_metadata == {"note": "orig"}


def test_copy_between_directories_is_an_identical_verified_checkpoint(source, tmp_path):
    src, _ = source
    report = distckpt.copy(src, tmp_path / "dst")
    assert report.files == distckpt.metadata(src).files > 1
    assert report.bytes == distckpt.metadata(src).total_bytes
    distckpt.verify(tmp_path / "dst")
    _same(src, tmp_path / "dst")
    with pytest.raises(CheckpointExistsError):
        distckpt.copy(src, tmp_path / "dst")
    distckpt.copy(src, tmp_path / "dst", overwrite=True)
    assert len([p for p in os.listdir(tmp_path / "dst") if p.startswith("attempt-")]) == 1
    with pytest.raises(NotCommittedError):
        distckpt.copy(tmp_path / "nothing", tmp_path / "dst2")


def test_a_corrupt_source_chunk_fails_the_copy_and_commits_nothing(source, tmp_path):
    src, _ = source
    data = sorted(src.glob("attempt-*/*.bin"))[1]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"fails its crc32c.*nothing was committed"):
        distckpt.copy(src, tmp_path / "dst")
    assert not distckpt.is_committed(tmp_path / "dst")
    assert not [p for p in os.listdir(tmp_path / "dst") if p.startswith("attempt-")]
    # Without verification the bytes are copied as they are: verify still sees it.
    distckpt.copy(src, tmp_path / "raw", verify=False)
    with pytest.raises(CorruptCheckpointError):
        distckpt.verify(tmp_path / "raw")


def test_a_killed_copy_is_not_a_checkpoint(source, tmp_path):
    src, _ = source
    code = "import sys, distckpt; distckpt.copy(sys.argv[1], sys.argv[2])"
    env = {**os.environ, "DISTCKPT_FAULT": "copy.file:kill", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "dst")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    assert not distckpt.is_committed(tmp_path / "dst")
    # The next copy succeeds and cleans the leftover attempt.
    distckpt.copy(src, tmp_path / "dst")
    assert len([p for p in os.listdir(tmp_path / "dst") if p.startswith("attempt-")]) == 1
    _same(src, tmp_path / "dst")


def test_copy_to_s3_and_back(source, tmp_path, s3_url):  # noqa: F811
    src, _ = source
    distckpt.copy(src, s3_url)
    distckpt.verify(s3_url)
    distckpt.copy(s3_url, tmp_path / "back")
    _same(src, tmp_path / "back")
    distckpt.copy(src, "memory://copy-test")
    _same(src, "memory://copy-test")


def test_copy_s3_to_gcs_to_local(source, tmp_path, s3_url, gcs_url):  # noqa: F811
    src, _ = source
    distckpt.copy(src, s3_url)
    report = distckpt.copy(s3_url, gcs_url)
    assert report.files == distckpt.metadata(src).files
    distckpt.verify(gcs_url)
    assert main(["copy", gcs_url, str(tmp_path / "back")]) == 0
    _same(src, tmp_path / "back")
    with pytest.raises(CheckpointExistsError):
        distckpt.copy(s3_url, gcs_url)


def test_copy_command(source, tmp_path, capsys):
    src, _ = source
    assert main(["copy", str(src), str(tmp_path / "dst")]) == 0
    assert "every checksum checked" in capsys.readouterr().out
    assert main(["copy", str(src), str(tmp_path / "dst")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_corrupt_source_never_commits_on_s3(source, s3_url, s3_server):  # noqa: F811
    src, _ = source
    data = sorted(src.glob("attempt-*/*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="fails its crc32c"):
        distckpt.copy(src, s3_url)
    assert not distckpt.is_committed(s3_url)
    bucket, prefix = s3_url[len("s3://") :].split("/", 1)
    assert not [k for k in s3_server.keys(bucket, prefix) if k.endswith("manifest.json")]
