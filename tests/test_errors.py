"""distckpt's errors are also the built-in exceptions Python code catches (distckpt/errors.py)."""

from __future__ import annotations

import glob

import numpy as np
import pytest

import distckpt
from distckpt import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.NotCommittedError, FileNotFoundError),
        (errors.CheckpointExistsError, FileExistsError),
        (errors.TreeMismatchError, ValueError),
        (errors.CorruptCheckpointError, ValueError),
        (errors.InconsistentProcessesError, ValueError),
        (errors.BarrierTimeoutError, TimeoutError),
        (errors.OutOfSpaceError, OSError),
        (errors.StorageUnavailableError, ConnectionError),
        (errors.ProcessFailure, RuntimeError),
    ],
)
def test_each_error_is_also_its_builtin_and_keeps_its_message(cls, builtin):
    err = cls("what happened and what to do")
    assert isinstance(err, errors.DistckptError) and isinstance(err, builtin)
    if cls is not errors.OutOfSpaceError:  # that one carries errno.ENOSPC in its text
        assert str(err) == "what happened and what to do"


def test_the_real_failures_are_caught_by_the_builtin_handlers(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*does not exist"):
        distckpt.restore(tmp_path / "nothing")
    distckpt.save(tmp_path / "c", {"w": np.arange(4.0)})
    with pytest.raises(FileExistsError):
        distckpt.save(tmp_path / "c", {"w": np.arange(4.0)})
    with pytest.raises(ValueError, match=r"\['w'\]"):
        distckpt.restore(tmp_path / "c", {"w": np.zeros(5)})
    (data,) = glob.glob(str(tmp_path / "c" / "*" / "*.bin"))
    with open(data, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="checksum|crc"):
        distckpt.restore(tmp_path / "c")
