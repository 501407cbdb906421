"""State that differs per process (a data pipeline's position): the protocol and its encoding.

Each process's state is small host data. It travels to the primary through
the coordination service and is committed inside the manifest, one entry
per process, so it is covered by the manifest's checksum and committed with
the arrays. The encoding is JSON with tagged values for what JSON lacks:
tuples, dicts with non-string keys, numpy arrays and scalars, typed PRNG
keys and bytes, so ``set_state`` gets back exactly the types ``get_state``
gave (a ``jax.Array`` comes back as a host numpy array, a typed PRNG key as
a typed key on the default device).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax
import numpy as np

from distckpt.errors import CorruptCheckpointError, TreeMismatchError

T = TypeVar("T", covariant=True)

_TAG = "__distckpt__"


@runtime_checkable
class Checkpointable(Protocol):
    """An object whose state distckpt saves and gives back.

    ``get_state`` returns a dict of host data: Python scalars and strings,
    lists, tuples, dicts, numpy arrays, small jax arrays and PRNG keys.
    ``set_state`` receives a dict equal to what ``get_state`` returned.

    The state is *per process* (each process reads its own shard of the
    data, so its position differs): every process's state is saved, and on
    restore each process gets its own back, which needs the same process
    count. A class whose state is the same on every process (for example a
    global sample index from which each process derives its shard) sets the
    class attribute ``checkpoint_global = True``: the state is then checked
    to be identical on all processes when saved, stored once, and given to
    every process on restore, whatever the process count.
    """

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class CheckpointableIterator(Checkpointable, Protocol[T]):
    """A ``Checkpointable`` that is also an iterator (a data loader)."""

    def __iter__(self) -> Iterator[T]: ...

    def __next__(self) -> T: ...


@dataclasses.dataclass(frozen=True)
class Ref:
    """Where an array of a state went: leaf ``leaf`` of the saved tree (``_statetree``).

    ``kind`` is what to give back: ``"jax"`` (a ``jax.Array``), ``"numpy"``
    or ``"key"`` (a typed PRNG key of implementation ``impl``, stored as its
    key data). ``dtype`` and ``shape`` are the stored array's (a per-process
    array is stored as its bytes). ``digest`` fingerprints the value of a
    global state's array, so that the processes' agreement check covers it
    ("" for per-process).
    """

    leaf: int
    kind: str
    impl: str | None = None
    digest: str = ""
    dtype: str = ""
    shape: tuple[int, ...] = ()


# State fields that say which data an iterator walks (as grain and datarax
# record them). A saved state is given only to an iterator whose state has
# the same values for the fields both have; ``shard_index`` may differ.
IDENTITY_FIELDS: tuple[str, ...] = (
    "sampler_repr",
    "data_source_repr",
    "shard_count",
    "worker_count",
)


def has_identity(state: Any) -> bool:
    return isinstance(state, dict) and any(f in state for f in IDENTITY_FIELDS)


def check_identity(
    current: dict[str, Any], saved: dict[str, Any], force_name: str = "force"
) -> None:
    """Raises TreeMismatchError naming each ``IDENTITY_FIELDS`` field whose saved value
    differs from the iterator's (``current``: its ``get_state()``)."""
    if not isinstance(current, dict) or not isinstance(saved, dict):
        return  # nothing to compare
    differ = [
        f"{field}: the checkpoint has {saved[field]!r}, this iterator has {current[field]!r}"
        for field in IDENTITY_FIELDS
        if field in current and field in saved and not _same(current[field], saved[field])
    ]
    if differ:
        raise TreeMismatchError(
            f"the saved iterator state on process {jax.process_index()} was recorded for "
            "other data than this iterator walks; resuming it would not continue the same "
            "sequence:\n  "
            + "\n  ".join(differ)
            + "\nBuild the iterator as it was when saved, restore another checkpoint, or pass "
            f"{force_name}=True to apply the state anyway.",
            differ,
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray | jax.Array) or isinstance(b, np.ndarray | jax.Array):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def is_global(obj: Any) -> bool:
    return bool(getattr(obj, "checkpoint_global", False))


def check(obj: Any) -> None:
    if not isinstance(obj, Checkpointable):
        raise TypeError(
            f"pipeline= must have get_state() and set_state(state) (distckpt.Checkpointable); "
            f"got a {type(obj).__name__}"
        )


def capture(obj: Any, process: int) -> bytes:
    """``obj.get_state()`` encoded; errors name the process and the bad entry."""
    check(obj)
    state = obj.get_state()
    if not isinstance(state, dict):
        raise TypeError(
            f"{type(obj).__name__}.get_state() on process {process} returned "
            f"{type(state).__name__}; it must return a dict"
        )
    return json.dumps(_encode(state, "state"), separators=(",", ":"), sort_keys=False).encode()


def summary(obj: Any, raw: bytes) -> dict[str, Any]:
    """What a process tells the others at save time about its captured state ``raw``."""
    if not is_global(obj):
        return {"pipeline": "per-process"}
    return {
        "pipeline": "global",
        "pipeline_state": raw[:300].decode(),  # shown if processes differ
        "pipeline_digest": hashlib.sha256(raw).hexdigest(),
    }


def check_agreement(summaries: list[dict[str, Any]], where: str) -> None:
    """Refuses a save whose processes passed pipelines of different kinds, or a
    global state that differs between them. ``summaries[p]`` is process ``p``'s
    ``summary`` (``{"pipeline": None}`` without a pipeline)."""
    modes = {p: d["pipeline"] for p, d in enumerate(summaries)}
    if len(set(modes.values())) > 1:
        raise TreeMismatchError(
            f"save to {where}: processes disagree about pipeline= (None, per-process or "
            f"global): {modes}. Every process must pass a pipeline of the same kind, or none."
        )
    if modes[0] != "global":
        return
    first = summaries[0]
    differ = [
        p for p, d in enumerate(summaries) if d["pipeline_digest"] != first["pipeline_digest"]
    ]
    if differ:
        raise TreeMismatchError(
            f"save to {where}: the pipeline state declares itself global "
            f"(checkpoint_global = True) but differs on processes {differ} from process "
            f"0's.\n  process 0: {first['pipeline_state']}\n  process {differ[0]}: "
            f"{summaries[differ[0]]['pipeline_state']}\nMake it per-process (drop "
            "checkpoint_global) or keep the processes in step."
        )


def manifest_entry(mode: str, states: list[str], arrays: int = 0) -> dict[str, Any]:
    """The manifest's ``process_state``: each process's state, or the global one once;
    ``arrays``: how many of the last leaves are the states' arrays (``_statearrays``)."""
    entry: dict[str, Any] = {"mode": mode, "states": states[:1] if mode == "global" else states}
    if arrays:
        entry["arrays"] = arrays
    return entry


# The one key of the tree the handler APIs saved a Checkpointable's arrays under
# before ``save(..., pipeline=)`` stored them itself (no ``arrays`` count then).
HANDLER_ARRAYS = "checkpointable_arrays"


def array_leaves(entry: dict[str, Any] | None, paths: list[Any], where: str) -> int:
    """How many of a manifest's last leaves (``paths``: every leaf's path) hold pipeline
    state arrays (0 in a checkpoint saved without pipeline=, or before they were data)."""
    if entry is None:
        return 0
    leaves = len(paths)
    if "arrays" not in entry:
        # A Checkpointable saved by the handler APIs before: its tree was the state's
        # arrays alone, {HANDLER_ARRAYS: [...]}, which its Refs point into.
        states = entry.get("states") or [""]
        handler_saved = (
            leaves > 0
            and all(path[:1] == (("key", HANDLER_ARRAYS),) for path in paths)
            and f'"{_TAG}":"ref"' in states[0]
        )
        return leaves if handler_saved else 0
    count = entry["arrays"]
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= leaves:
        raise CorruptCheckpointError(
            f"the manifest of {where} is damaged: its pipeline state claims {count!r} array "
            f"leaves, and it has {leaves} leaves. Restore an older step or a backup.",
            [f"{where}: process_state.arrays: {count!r}"],
        )
    return count


def saved_state(entry: dict[str, Any] | None, process: int, count: int, where: str) -> str:
    """Process ``process``'s state in a manifest's ``process_state`` (a job of ``count``
    processes), or an error saying why there is none for it."""
    if entry is None:
        raise TreeMismatchError(
            f"restore of {where}: pipeline= was given but the checkpoint holds no pipeline "
            "state (it was saved without pipeline=). Restore without pipeline= and start "
            "the pipeline from its beginning, or pick a checkpoint saved with one."
        )
    states = entry["states"]
    if entry["mode"] == "global":
        return states[0]
    if len(states) != count:
        raise TreeMismatchError(
            f"restore of {where}: the checkpoint holds per-process pipeline states of "
            f"{len(states)} processes, and this job has {count}. "
            "Each process's data position cannot be handed to a different process count. "
            "Restore with the original process count, restore without pipeline= (and "
            "restart the data from a position you choose), or make the pipeline state "
            "global (checkpoint_global = True: a global position each process derives its "
            "shard from) for future checkpoints."
        )
    return states[process]


def restore_into(obj: Any, raw: str, *, force: bool = False) -> None:
    """Gives ``obj`` the state ``raw`` (as ``capture`` encoded it), after the identity
    check (``check_identity``) unless ``force``."""
    apply(obj, decode(raw), force=force)


def decode(raw: str) -> Any:
    r"""A state as ``capture`` encoded it (arrays of ``_statearrays`` still ``Ref``\ s)."""
    return _decode(json.loads(raw))


def identity_check(obj: Any, saved: Any, *, force: bool = False) -> None:
    """Refuses ``saved`` for ``obj`` if it was recorded for other data (unless
    ``force``, the engine's ``force_pipeline``)."""
    if not force and has_identity(saved):
        check_identity(obj.get_state(), saved, "force_pipeline")


def apply(obj: Any, state: Any, *, force: bool = False) -> None:
    identity_check(obj, state, force=force)
    obj.set_state(state)


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Ref):
        return {_TAG: "ref", **dataclasses.asdict(value)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            _TAG: "dict",
            "items": [[_encode(k, where), _encode(v, f"{where}[{k!r}]")] for k, v in value.items()],
        }
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, bytes):
        return {_TAG: "bytes", "data": base64.b64encode(value).decode()}
    if isinstance(value, jax.Array):
        if not value.is_fully_addressable:
            raise TypeError(
                f"{where} is a jax.Array sharded over several processes; per-process state "
                "must be host data (put model state in the saved tree instead)"
            )
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = _encode(np.asarray(jax.random.key_data(value)), where)
            return {_TAG: "key", "impl": str(jax.random.key_impl(value)), "data": data}
        return _encode(np.asarray(value), where)
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"{where} is a numpy array of Python objects, which is not state")
        return {
            _TAG: "array" if isinstance(value, np.ndarray) else "scalar",
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode(),
        }
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; per-process state "
        "may hold Python scalars, strings, bytes, lists, tuples, dicts, numpy arrays, "
        "jax arrays and PRNG keys"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v) for k, v in value.items()}
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in value["items"]}
    if tag == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if tag == "bytes":
        return base64.b64decode(value["data"])
    if tag == "key":
        return jax.random.wrap_key_data(_decode(value["data"]), impl=value["impl"])
    if tag == "ref":
        return Ref(
            value["leaf"],
            value["kind"],
            value.get("impl"),
            value.get("digest", ""),
            value.get("dtype", ""),
            tuple(value.get("shape", ())),
        )
    if tag in ("array", "scalar"):
        arr = np.frombuffer(base64.b64decode(value["data"]), np.dtype(value["dtype"]))
        arr = arr.reshape(value["shape"]).copy()
        return arr if tag == "array" else arr[()]
    raise ValueError(f"unknown tag {tag!r} in saved per-process state")
