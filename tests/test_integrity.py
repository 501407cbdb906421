"""Corruption is always detected: bit flips, truncation and missing files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _knobs
from distckpt._storage import open_storage
from distckpt.errors import CorruptCheckpointError
from tests import indexes


def _data_files(directory) -> list[str]:
    return sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(directory)
        for f in files
        if f.endswith(".bin")
    )


@pytest.fixture
def saved(tmp_path):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    tree = {
        "w": jax.device_put(
            np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32),
            NamedSharding(mesh, P("x", "y")),
        ),
        "small": np.arange(7, dtype=np.int16),
        "flag": jax.device_put(np.array([True, False, True])),
        "step": 1234,
    }
    # Small segments: several data files, so every file can be damaged in turn.
    with _knobs.override(segment_bytes=512, chunk_bytes=256):
        distckpt.save(tmp_path / "c", tree)
    assert len(_data_files(tmp_path / "c")) >= 4
    return tmp_path / "c"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_flipped_bit_in_any_data_file_is_detected(saved, tmp_path):
    rng = np.random.default_rng(1)
    for i, path in enumerate(_data_files(saved)):
        size = os.path.getsize(path)
        for trial in range(3):
            work = _copy(saved, tmp_path / f"flip{i}_{trial}")
            victim = os.path.join(work, os.path.relpath(path, saved))
            with open(victim, "r+b") as f:
                offset = int(rng.integers(size))
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ (1 << int(rng.integers(8)))]))
            name = os.path.basename(victim)
            with pytest.raises(CorruptCheckpointError, match=name) as info:
                distckpt.verify(work)
            assert "crc32c" in str(info.value) and "['" in str(info.value)  # names the leaf
            with pytest.raises(CorruptCheckpointError, match="crc32c"):
                distckpt.restore(work)


def test_truncated_file_is_detected(saved, tmp_path):
    work = _copy(saved, tmp_path / "t")
    victim = _data_files(work)[0]
    os.truncate(victim, os.path.getsize(victim) - 3)
    with pytest.raises(CorruptCheckpointError, match="truncated|bytes, the manifest says"):
        distckpt.verify(work)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        distckpt.restore(work)


def test_deleted_file_is_detected(saved, tmp_path):
    work = _copy(saved, tmp_path / "d")
    victim = _data_files(work)[-1]
    os.unlink(victim)
    with pytest.raises(CorruptCheckpointError, match=f"{os.path.basename(victim)}.*missing"):
        distckpt.verify(work)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        distckpt.restore(work)


def test_damaged_manifest_is_reported(saved, tmp_path):
    work = _copy(saved, tmp_path / "m")
    manifest = os.path.join(work, "manifest.json")
    with open(manifest, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="manifest"):
        distckpt.metadata(work)


def test_newer_format_is_refused(saved, tmp_path):
    work = _copy(saved, tmp_path / "v")
    manifest = os.path.join(work, "manifest.json")
    doc = json.loads(open(manifest).read())
    doc["format_version"] = 99
    with open(manifest, "w") as f:
        json.dump(doc, f)
    with pytest.raises(CorruptCheckpointError, match="format version 99.*Upgrade distckpt"):
        distckpt.restore(work)


def test_verify_cli(saved, tmp_path, capsys):
    from distckpt.cli import main

    assert main(["verify", str(saved)]) == 0
    assert "OK" in capsys.readouterr().out
    work = _copy(saved, tmp_path / "cli")
    os.unlink(_data_files(work)[0])
    assert main(["verify", str(work)]) == 1
    assert "missing" in capsys.readouterr().err


def test_damaged_chunk_table_is_refused_not_filled_with_garbage(saved, tmp_path):
    work = _copy(saved, tmp_path / "table")
    leaf = next(
        i
        for i, s in enumerate(distckpt._commit.load(open_storage(str(work))).leaves)
        if s.display == "['w']"
    )

    def drop_one(
        records,
    ):  # a valid index, re-sealed as a faulty writer would, but part of ['w'] is nowhere
        gone = next(i for i, c in enumerate(records) if c.leaf == leaf)
        return records[:gone] + records[gone + 1 :]

    indexes.rewrite_index(Path(work), drop_one)
    with pytest.raises(CorruptCheckpointError, match=r"\['w'\].*written by no process"):
        distckpt.restore(work)
    with pytest.raises(CorruptCheckpointError, match=r"\['w'\].*written by no process"):
        distckpt.verify(work)


@pytest.mark.parametrize("where", ["value", "crc"])
def test_a_flipped_bit_in_the_manifest_is_caught(saved, tmp_path, where):
    work = _copy(saved, tmp_path / where)
    manifest = os.path.join(work, "manifest.json")
    raw = bytearray(open(manifest, "rb").read())
    # A digit of the first chunk's crc, or of the saved Python value: still
    # valid JSON, so only the manifest's own checksum can tell.
    needle = b'"crc32c":' if where == "crc" else b'"value":'
    at = raw.index(needle) + len(needle)
    while not chr(raw[at]).isdigit():
        at += 1
    raw[at] = ord("1") if raw[at] != ord("1") else ord("2")
    open(manifest, "wb").write(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="manifest's checksum does not match"):
        distckpt.restore(work)
    with pytest.raises(CorruptCheckpointError, match="manifest's checksum does not match"):
        distckpt.verify(work)


def test_failure_after_the_commit_point_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    from distckpt import _storage

    distckpt.save(tmp_path / "c", {"v": np.zeros(3)})
    original = _storage.PosixStorage.commit_manifest

    def rename_then_fail(self, raw, attempt, preflight):
        original(self, raw, attempt, preflight)
        raise OSError(5, "injected EIO after the rename")

    monkeypatch.setattr(_storage.PosixStorage, "commit_manifest", rename_then_fail)
    with pytest.raises(OSError, match="after the rename"):
        distckpt.save(tmp_path / "c", {"v": np.ones(3)}, overwrite=True)
    monkeypatch.undo()
    # The manifest named the new attempt before the error: its data must stay.
    np.testing.assert_array_equal(distckpt.restore(tmp_path / "c")["v"], np.ones(3))
    distckpt.verify(tmp_path / "c")
