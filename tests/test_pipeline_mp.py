"""Per-process pipeline state with real processes: each gets its own back, exactly."""

from __future__ import annotations

import os

import pytest

import distckpt
from distckpt.errors import TreeMismatchError
from distckpt.pipeline import ShuffledIterator
from tests.mp import case_value, run_processes

pytestmark = pytest.mark.multiprocess

HERE = "tests.test_pipeline_mp"
SAVED_AT, TOTAL = 5, 12


def _noise(indices, rng):
    return [int(i) for i in indices] + [int(v) for v in rng.integers(0, 10**6, size=2)]


def _make(per_process: bool) -> ShuffledIterator:
    # 4 batches of 16 per epoch: TOTAL steps cross two epoch boundaries.
    return ShuffledIterator(
        70,
        global_batch_size=16,
        seed=3,
        transform=_noise if per_process else None,
        transform_seed=100 if per_process else None,
    )


def _model():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("x", "y"))
    w = jax.make_array_from_callback(
        (8, 8), NamedSharding(mesh, P("x", "y")), lambda i: jnp.arange(64.0).reshape(8, 8)[i]
    )
    return {"w": w, "step": SAVED_AT}


def _as_lists(batches) -> list:
    return [b if isinstance(b, list) else b.tolist() for b in batches]


def _w_train_and_save(directory: str, per_process: bool) -> dict:
    import itertools

    uninterrupted = _as_lists(itertools.islice(_make(per_process), TOTAL))
    it = _make(per_process)
    seen = _as_lists(itertools.islice(it, SAVED_AT))
    with distckpt.CheckpointManager(directory, timeout_s=30) as mgr:
        mgr.save(SAVED_AT, _model(), pipeline=it)
    return {"uninterrupted": uninterrupted, "seen": seen, "state": it.get_state()["batch"]}


def _w_resume(directory: str, per_process: bool) -> list:
    import itertools

    it = _make(per_process)
    with distckpt.CheckpointManager(directory, timeout_s=30) as mgr:
        restored = mgr.restore(SAVED_AT, distckpt.abstract_like(_model()), pipeline=it)
    assert restored["step"] == SAVED_AT
    return _as_lists(itertools.islice(it, TOTAL - SAVED_AT))


VARIANTS = {"per-process": True, "global": False}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> tuple:
    """One job saves both variants, the next resumes both (tests/mp.py:each_case;
    tests/conftest.py runs this module on one xdist worker, so the jobs run once)."""
    root = tmp_path_factory.mktemp("pipeline_mp")
    args = {v: {"directory": str(root / v), "per_process": pp} for v, pp in VARIANTS.items()}

    def job(worker: str) -> list:
        cases = {v: [f"{HERE}:{worker}", args[v]] for v in VARIANTS}
        return run_processes("tests.mp:each_case", 2, 4, args={"cases": cases})

    first = job("_w_train_and_save")
    return root, first, job("_w_resume")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_process_resumes_its_own_batch_sequence(variants, variant):
    root, first_jobs, resumed_jobs = variants
    per_process, tmp_path = VARIANTS[variant], root / variant
    first = [case_value(r, variant) for r in first_jobs]
    resumed = [case_value(r, variant) for r in resumed_jobs]
    for p in range(2):
        assert first[p]["seen"] + resumed[p] == first[p]["uninterrupted"], f"process {p}"
    # The processes read different data (and, per process, different noise).
    assert first[0]["uninterrupted"][0] != first[1]["uninterrupted"][0]

    info = distckpt.metadata(tmp_path / "step_00000005")
    assert info.step == SAVED_AT
    # Now the same checkpoint in this test's single process.
    single = ShuffledIterator(
        70,
        16,
        seed=3,
        process_index=0,
        process_count=1,
        transform=_noise if per_process else None,
        transform_seed=100 if per_process else None,
    )
    if per_process:
        with pytest.raises(TreeMismatchError, match="pipeline states of 2 processes.*has 1"):
            distckpt.restore(tmp_path / "step_00000005", pipeline=single)
        return
    # A global position resumes on any process count: one process now reads
    # what the two read together.
    distckpt.restore(tmp_path / "step_00000005", {}, partial=True, pipeline=single)
    whole = next(single).tolist()
    assert whole == first[0]["uninterrupted"][SAVED_AT] + first[1]["uninterrupted"][SAVED_AT]


def _w_global_but_different(directory: str) -> str:
    import jax

    class Drifting:
        checkpoint_global = True

        def get_state(self):
            return {"position": jax.process_index()}

        def set_state(self, state):
            pass

    try:
        distckpt.save(directory, {}, pipeline=Drifting(), timeout_s=30)
    except distckpt.errors.DistckptError as e:
        return str(e)
    return "saved"


def test_a_global_state_that_differs_between_processes_is_refused(tmp_path):
    results = run_processes(
        f"{HERE}:_w_global_but_different", 2, 2, args={"directory": str(tmp_path / "c")}
    )
    for r in results:
        assert "declares itself global" in r.value and "differs on processes [1]" in r.value
    assert not distckpt.is_committed(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # refused before any data was written


def _w_handler(directory: str) -> dict:
    import jax

    it = _make(per_process=True)
    with distckpt.CheckpointHandler(async_checkpointing=True, timeout_s=30) as h:
        for step in (1, 2, 3):
            next(it)
            h.save(directory, {"model": _model()}, step=step, keep=2)
            h.save(os.path.join(directory, "data"), it, step=step, keep=2)
        steps = h.get_checkpoint_steps(directory)
        fresh = _make(per_process=True)
        h.restore(os.path.join(directory, "data"), fresh, step=3)
        model = h.restore(directory, {"model": _model()})["model"]
    return {
        "steps": steps,
        "same_position": fresh.get_state() == it.get_state(),
        "w_sum": float(jax.numpy.sum(model["w"])),
    }


def test_the_handler_api_agrees_across_processes(tmp_path):
    results = run_processes(f"{HERE}:_w_handler", 2, 4, args={"directory": str(tmp_path)})
    for r in results:
        assert r.value == {"steps": [2, 3], "same_position": True, "w_sum": float(sum(range(64)))}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["data", "step_00000002", "step_00000003"]
