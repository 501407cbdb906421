"""Writes the checkpoints in this folder with datarax itself, and what datarax restores from them.

Not run by the tests (datarax depends on TensorFlow, 2 GB that CI does not
install; 0.1.0 imports it). To remake, in an environment with a datarax
release and this repository's dependencies::

    python tests/data/datarax_written/make_fixture.py

It writes, in a folder named by the datarax version (``0.1.0``: the release
the reference pages describe, which keeps steps in ``<step>/default/``;
``0.1.4``: one that writes ``ckpt-<step>/``):

- ``dict_state/``: a dict state saved by ``OrbaxCheckpointHandler.save`` at
  steps 100 and 200 (``keep=5``), with metadata;
- ``pipeline/``: a ``CheckpointableIterator``'s state saved by
  ``PipelineCheckpoint.save`` at steps 100..400 with ``keep=3``;
- ``unstepped/``: a state saved without a step (``unstepped/checkpoint``);
- ``expected.json``: what datarax's own handler returns for each of them
  (listing, latest step, each step's state and metadata), in the form
  ``describe`` gives, which tests/test_compat_datarax.py compares with what
  ``distckpt.compat.datarax`` returns;
- ``signatures.json``: the positional parameters (names and defaults) of
  each public method of datarax's ``OrbaxCheckpointHandler``,
  ``IteratorCheckpoint`` and ``PipelineCheckpoint``, which the compat
  classes must accept in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def describe(value: Any) -> Any:
    """A restored state as JSON: each leaf's kind (jax, key, numpy, int, float, str,
    bool, None), dtype, shape and values; containers kept."""
    if isinstance(value, dict):
        return {"dict": {str(k): describe(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {type(value).__name__: [describe(v) for v in value]}
    if isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(value))
            return {
                "key": str(jax.random.key_impl(value)),
                "shape": list(value.shape),
                "data": data.tolist(),
            }
        return {
            "jax": str(value.dtype),
            "shape": list(value.shape),
            "values": np.asarray(value).tolist(),
        }
    if isinstance(value, np.ndarray):
        return {"numpy": str(value.dtype), "shape": list(value.shape), "values": value.tolist()}
    if isinstance(value, np.generic):
        return {"numpy scalar": str(value.dtype), "values": value.item()}
    if value is None or isinstance(value, bool | int | float | str):
        return {type(value).__name__: value}
    raise TypeError(f"cannot describe {type(value)}")


def state(step: int) -> dict[str, Any]:
    return {
        "model_weights": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) * step,
        "position": step * 10,
        "epoch": step // 100,
        "name": f"run at {step}",
        "rng_key": jax.random.key(step),
        "split_keys": jax.random.split(jax.random.key(0), 4),
        "counts": np.arange(5, dtype=np.int64) + step,
        "nested": {"lr": 0.5, "flags": np.array([True, False])},
    }


class SimplePipeline:
    """The quickref's pipeline state (rng as key data, epoch, position)."""

    def __init__(self, seed: int, epoch: int, position: int):
        self.rng, self.epoch, self.position = jax.random.key(seed), epoch, position

    def get_state(self) -> dict:
        return {
            "rng": jax.random.key_data(self.rng),
            "epoch": self.epoch,
            "position": self.position,
        }

    def set_state(self, state: dict) -> None:
        self.rng = jax.random.wrap_key_data(state["rng"])
        self.epoch, self.position = state["epoch"], state["position"]


def signatures(module: Any) -> dict[str, list[list[str]]]:
    """``{"Class.method": [[parameter, repr(default) or ""], ...]}``: the parameters that can
    be passed by position (``self`` left out), for each public method."""
    import inspect

    out = {}
    for cls in ("OrbaxCheckpointHandler", "IteratorCheckpoint", "PipelineCheckpoint"):
        for name, fn in inspect.getmembers(getattr(module, cls), inspect.isfunction):
            if name.startswith("_") and name != "__init__":
                continue
            params = inspect.signature(fn).parameters.values()
            out[f"{cls}.{name}"] = [
                [p.name, "" if p.default is p.empty else repr(p.default)]
                for p in params
                if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
    return out


def write_signatures() -> None:
    import datarax
    import datarax.checkpoint

    with open(os.path.join(HERE, datarax.__version__, "signatures.json"), "w") as f:
        json.dump(signatures(datarax.checkpoint), f, indent=1, sort_keys=True)
        f.write("\n")


def main() -> None:
    import datarax
    from datarax.checkpoint import OrbaxCheckpointHandler, PipelineCheckpoint

    version = datarax.__version__
    out_dir = os.path.join(HERE, version)
    expected: dict[str, Any] = {"datarax": version}
    shutil.rmtree(out_dir, ignore_errors=True)

    def record(name: str, steps: list[int | None]) -> None:
        directory = os.path.join(out_dir, name)
        with OrbaxCheckpointHandler() as h:
            out: dict[str, Any] = {
                "steps": h.get_checkpoint_steps(directory),
                "latest": h.latest_step(directory),
                "latest_state": describe(h.restore(directory)),
                "by_step": {},
            }
            for s in steps:
                if s is not None:
                    out["by_step"][str(s)] = {
                        "state": describe(h.restore(directory, step=s)),
                        "metadata": h.restore(directory, step=s, metadata_only=True),
                    }
        expected[name] = out

    with OrbaxCheckpointHandler() as h:
        save = getattr(h, "save", None) or h.save_to_directory  # later releases: save_to_directory
        for s in (100, 200):
            save(
                os.path.join(out_dir, "dict_state"),
                state(s),
                step=s,
                keep=5,
                metadata={"description": "Training checkpoint", "step": s},
            )
        save(os.path.join(out_dir, "unstepped"), state(7))
    record("dict_state", [100, 200])
    record("unstepped", [])

    ckpt = PipelineCheckpoint(os.path.join(out_dir, "pipeline"))
    save_it = getattr(ckpt, "save", None) or ckpt.save_to_directory
    for s in (100, 200, 300, 400):
        save_it(SimplePipeline(42, s // 150, s * 10), step=s, keep=3, metadata={"epoch": s // 150})
    record("pipeline", [200, 300, 400])
    restored = ckpt.restore_latest(SimplePipeline(0, 0, 0))
    expected["pipeline"]["restore_latest"] = describe(restored.get_state())

    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    write_signatures()
    print("wrote", out_dir, file=sys.stderr)


if __name__ == "__main__":
    main()
