"""examples/train_mlp.py: a resumed run continues exactly where an uninterrupted one goes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

import distckpt
from tests.mp import run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_example"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_mlp.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_mlp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _w_train(directory: str, steps: int) -> int:
    argv = ["--dir", directory, "--steps", str(steps), "--save-every", "10", "--quiet"]
    return _example().main(argv + ["--batch", "64"])


def _w_train_each(runs: list) -> list[int]:
    """``_w_train`` for each ``[directory, steps]`` in turn, in one job: fresh runs
    (nothing saved there yet) need no job of their own."""
    return [_w_train(directory, steps) for directory, steps in runs]


def _loss(directory: Path, step: int) -> float:
    return distckpt.metadata(directory / f"step_{step:08d}").metrics["loss"]


@pytest.mark.timeout(300)
def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    whole, pieces, moved = tmp_path / "whole", tmp_path / "pieces", tmp_path / "moved"
    runs = [[str(whole), 30], [str(pieces), 20]]  # both start afresh
    results = run_processes(f"{HERE}:_w_train_each", 2, 4, args={"runs": runs})
    assert [r.value for r in results] == [[0, 0], [0, 0]]
    shutil.copytree(pieces, moved)
    run_processes(f"{HERE}:_w_train", 2, 4, args={"directory": str(pieces), "steps": 30})
    # Same topology: parameters, optimizer moments and data position all came
    # back, so the loss is the same to the last bit.
    assert _loss(pieces, 30) == _loss(whole, 30)
    # Another topology (4 processes x 2 devices) resumes the same run.
    run_processes(f"{HERE}:_w_train", 4, 2, args={"directory": str(moved), "steps": 30})
    assert _loss(moved, 30) == pytest.approx(_loss(whole, 30), rel=1e-4)
