"""The data-pipeline state in the local tier: its arrays kept as leaves, the rest gathered.

A local save splits a ``Checkpointable``'s state as the persistent tier does
(``_statearrays``): its arrays become leaves after the tree's, kept,
checksummed and copied to peers like any leaf of the step; only the small
rest (a ``_procstate.Ref`` in place of each array) is gathered from every
process into every process's record, so that a process whose directory was
lost gets its own state back from a peer's. A global state
(``checkpoint_global``) is the same on every process (the save's agreement
checks its digest), so each keeps it once and nothing is gathered.

Recovery joins this process's record with the arrays the step gave back,
each as its type. A step written before the arrays were data (local format
version 1) holds every state whole in JSON, its arrays inside; it decodes
as it always did (a ``jax.Array`` as numpy). See docs/local_tier.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from distckpt import _local, _multihost, _procstate, _statearrays
from distckpt.errors import DistckptError

# The keys of a step's record (``_local.Step.extra``) that hold the states: the
# current one (``_procstate.manifest_entry``), and version 1's list of JSON texts.
RECORD = "process_state"
RECORD_V1 = "pipeline_states"
NO_PIPELINE = {"pipeline": None}  # the agreement summary of a save without pipeline=


@dataclass(frozen=True)
class Captured:
    """One process's pipeline state, split for a local save."""

    leaves: list[Any]  # the state's arrays: leaves after the tree's (``_statearrays.split``)
    holder: _statearrays.Holder
    raw: bytes  # the rest, encoded (``_procstate.capture``)
    summary: dict[str, Any]  # what every process must agree on (``_procstate.summary``)


def capture(pipeline: Any, process: int) -> Captured:
    """``pipeline.get_state()`` now, split into its arrays and the rest."""
    leaves, holder = _statearrays.split(pipeline)
    raw = _procstate.capture(holder, process)
    return Captured(leaves, holder, raw, _procstate.summary(holder, raw))


def record(captured: Captured | None, step: int, timeout_s: float) -> dict[str, Any] | None:
    """The step's record of the pipeline states: every process's, gathered through a
    collective (bounded by ``timeout_s``) for a per-process state in a job of several
    processes; the one state of a global state. None without a pipeline.

    Called by every process after the save's agreement, which makes the kind
    of state (none, per-process, global) the same on all of them.
    """
    if captured is None:
        return None
    mode = captured.summary["pipeline"]
    text = captured.raw.decode()
    if mode == "global" or jax.process_count() == 1:
        return _procstate.manifest_entry(mode, [text])
    states = _multihost.bounded(
        lambda: _gather(text, step),
        timeout_s=timeout_s,
        what=f"local save of step {step}: gathering the pipeline states",
    )
    return _procstate.manifest_entry(mode, states)


def _gather(text: str, step: int) -> list[str]:
    """Every process's ``text``, on every process; refuses processes at different steps."""
    raw = text.encode()
    head = np.asarray(
        multihost_utils.process_allgather(np.asarray([step, len(raw)], np.int64))
    ).reshape(-1, 2)
    if (head[:, 0] != step).any():  # every process sees the same table: all raise alike
        steps = {p: int(s) for p, s in enumerate(head[:, 0])}
        raise DistckptError(
            f"local save: the processes gather their pipeline states for different steps "
            f"{steps}; every process must save the same step. Nothing was kept."
        )
    sizes = head[:, 1]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(raw)] = np.frombuffer(raw, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [everyone[p, : int(sizes[p])].tobytes().decode() for p in range(len(sizes))]


def restored(
    st: _local.Step, arrays: dict[int, Any], values: dict[int, np.ndarray], process: int
) -> Any:
    """Process ``process``'s pipeline state in step ``st`` (None if it has none), its
    arrays put back as their types from the step's recovered leaves: ``arrays`` (on
    their saved layouts) and ``values`` (whole on the host), by leaf."""
    if RECORD_V1 in st.extra:  # version 1: every state whole in JSON
        states = st.extra[RECORD_V1]
        raw = states[process] if states else None
        return None if raw is None else _procstate.decode(raw)
    entry = st.extra.get(RECORD)
    if entry is None:
        return None
    state = _procstate.decode(
        _procstate.saved_state(entry, process, st.process_count, f"local step {st.path}")
    )
    if not st.state_arrays:
        return state
    per_process = entry["mode"] != "global"
    first = len(st.tree_leaves)
    got = [arrays[i] if i in arrays else values[i] for i in range(first, len(st.leaves))]
    return _statearrays.join(state, _statearrays.own(got, per_process), per_process)
