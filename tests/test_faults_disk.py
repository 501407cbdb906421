"""Fault injection on the disk, in one process (docs/reliability.md, cases 6, 7, 8, 14).

Disk full and read-only roots use a real tmpfs (``mount -t tmpfs``), which
needs root and a container that allows it; the tests skip, saying why,
where it does not. EIO is injected with the ``DISTCKPT_FAULT`` hook.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt import _faults, _knobs


@pytest.fixture
def fault(monkeypatch):
    """``fault("point:action")`` arms the hook in this process; undone after the test."""

    def arm(spec: str | None) -> None:
        _faults.reset()
        if spec is None:
            monkeypatch.delenv(_faults.ENV, raising=False)
        else:
            monkeypatch.setenv(_faults.ENV, spec)

    yield arm
    _faults.reset()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size, ro=False)`` mounts a fresh tmpfs under tmp_path; always unmounted."""
    mounted = []

    def mount(name: str, size: str, *, ro: bool = False):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        path = tmp_path / name
        path.mkdir()
        options = f"size={size},mode=0755" + (",ro" if ro else "")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _tree(n: int, value: float) -> dict:
    """``n`` float32 elements sharded over the 8 devices, plus a Python leaf."""
    mesh = jax.make_mesh((8,), ("d",))
    x = np.full(n, value, np.float32)
    return {"x": jax.device_put(x, NamedSharding(mesh, P("d"))), "value": value}


def _attempts(directory) -> list[str]:
    return sorted(e for e in os.listdir(directory) if e.startswith("attempt-"))


def _assert_holds(directory, n: int, value: float) -> None:
    distckpt.verify(directory)
    out = distckpt.restore(directory)
    np.testing.assert_array_equal(out["x"], np.full(n, value, np.float32))
    assert out["value"] == value


# --------------------------------------------------------------------------- 7 and 14


FAILURES = {
    "write-eio": ("write.chunk:eio*1", OSError, errno.EIO),
    "fsync-eio": ("write.fsync:eio*1", OSError, errno.EIO),
    "rename-eio": ("commit.rename:eio*1", OSError, errno.EIO),
    "report-raise": ("save.report:raise*1", _faults.InjectedFault, None),
    "commit-raise": ("save.commit:raise*1", _faults.InjectedFault, None),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_overwrite_keeps_the_old_step_and_is_not_retried_in_place(tmp_path, fault, case):
    """Cases 7 and 14. Each fault fires once only (``*1``): had the save
    retried in place, it would have succeeded."""
    spec, error, code = FAILURES[case]
    directory = tmp_path / "c"
    distckpt.save(directory, _tree(64, 1.0))
    (old,) = _attempts(directory)
    fault(spec)
    with pytest.raises(error) as info:
        distckpt.save(directory, _tree(64, 2.0), overwrite=True)
    if code is not None:
        assert info.value.errno == code
    fault(None)
    _assert_holds(directory, 64, 1.0)  # the old step is intact, nothing new committed
    assert _attempts(directory) == [old]  # the failed attempt is gone
    # A new save (a new attempt) works.
    distckpt.save(directory, _tree(64, 2.0), overwrite=True)
    _assert_holds(directory, 64, 2.0)
    (new,) = _attempts(directory)
    assert new != old


def test_eio_on_a_first_save_commits_nothing(tmp_path, fault):
    fault("write.fsync:eio*1")
    with pytest.raises(OSError) as info:
        distckpt.save(tmp_path / "c", _tree(64, 1.0))
    assert info.value.errno == errno.EIO
    assert not distckpt.is_committed(tmp_path / "c")
    assert os.listdir(tmp_path / "c") == []


# --------------------------------------------------------------------------- 6: disk full


def test_disk_full_before_writing_is_refused_in_preflight(tmpfs, fault):
    disk = tmpfs("small", "256k")
    distckpt.save(disk / "step_1", _tree(1024, 1.0))
    fault("save.write:raise")  # proves the error comes before the write phase
    with pytest.raises(OSError) as info:
        distckpt.save(disk / "step_2", _tree(128 * 1024, 2.0))  # 512 KiB
    assert isinstance(info.value, distckpt.errors.OutOfSpaceError)
    assert info.value.errno == errno.ENOSPC
    assert "not enough free space" in str(info.value)
    fault(None)
    assert not (disk / "step_2").exists() or os.listdir(disk / "step_2") == []
    _assert_holds(disk / "step_1", 1024, 1.0)


def test_disk_full_while_writing(tmpfs):
    """The free-space estimate passes, the disk fills up while writing: a
    real ENOSPC from write(2). Older steps stay intact, space is given back,
    and training can continue with the next save."""
    disk = tmpfs("small", "1m")
    with distckpt.CheckpointManager(disk / "run", async_save=False) as mgr:
        mgr.save(1, _tree(1024, 1.0))
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        # 6000-byte files on 4 KiB pages use 8 KiB each: ~36% more than the
        # bytes the estimate counts. So 90% of the free space does not fit.
        n = (int(free * 0.9) // 4 // 12000) * 12000
        with _knobs.override(chunk_bytes=4096, segment_bytes=6000):
            with pytest.raises(OSError) as info:
                mgr.save(2, _tree(n, 2.0))
        assert isinstance(info.value, distckpt.errors.OutOfSpaceError)
        assert info.value.errno == errno.ENOSPC
        assert "out of space on process 0" in str(info.value)
        assert "not enough free space" not in str(info.value)  # write(2) said it, not preflight
        assert mgr.all_steps() == [1]
        st = os.statvfs(disk)
        assert st.f_bavail * st.f_frsize >= free - 64 * 1024  # the failed attempt is gone
        _assert_holds(disk / "run" / "step_00000001", 1024, 1.0)
        mgr.save(3, _tree(1024, 3.0))  # training goes on
        assert mgr.all_steps() == [1, 3]
    _assert_holds(disk / "run" / "step_00000003", 1024, 3.0)


# --------------------------------------------------------------------------- 8: bad roots


def test_read_only_root_fails_before_any_data_is_written(tmpfs, fault):
    disk = tmpfs("ro", "64k", ro=True)
    fault("save.write:raise")  # reaching the write phase would raise this instead
    for root in (disk, disk / "ckpt", disk / "a" / "b"):
        with pytest.raises(OSError) as info:
            distckpt.save(root, _tree(64, 1.0))
        assert info.value.errno == errno.EROFS, info.value
    assert os.listdir(disk) == []


def test_missing_or_blocked_root(tmp_path, fault):
    # Nothing to read at a missing path: a clear NotCommittedError.
    for read in (distckpt.restore, distckpt.verify, distckpt.metadata):
        with pytest.raises(distckpt.errors.NotCommittedError, match="does not exist"):
            read(tmp_path / "missing")
    # A path through a regular file cannot be created: refused before writing.
    (tmp_path / "file").write_text("x")
    fault("save.write:raise")
    with pytest.raises(NotADirectoryError):
        distckpt.save(tmp_path / "file" / "ckpt", _tree(64, 1.0))
    assert (tmp_path / "file").read_text() == "x"
    # A missing root is created (with its parents) by save.
    fault(None)
    distckpt.save(tmp_path / "new" / "deep" / "ckpt", _tree(64, 1.0))
    _assert_holds(tmp_path / "new" / "deep" / "ckpt", 64, 1.0)
