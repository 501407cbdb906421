"""Tunables, in one place.

Each knob has a default, an environment variable that overrides the default,
and (where it makes sense) a function argument that wins over both. Tests
override knobs with :func:`override`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Knob:
    env: str
    default: float | str | bool | None  # None: unset unless given (the library's default)
    kind: type  # float, int, bool or str
    minimum: float
    help: str
    choices: tuple[str, ...] = ()  # for str knobs


_KNOBS: dict[str, _Knob] = {
    "timeout_s": _Knob(
        "DISTCKPT_TIMEOUT_S",
        300.0,
        float,
        0.001,
        "seconds any barrier or key/value wait may take before it fails",
    ),
    "chunk_bytes": _Knob(
        "DISTCKPT_CHUNK_BYTES",
        256 << 10,
        int,
        1,
        "target size of a checksummed chunk; smaller chunks cut read "
        "amplification when restoring onto another sharding",
    ),
    "max_chunks_per_shard": _Knob(
        "DISTCKPT_MAX_CHUNKS_PER_SHARD",
        64,
        int,
        1,
        "most chunks a saved shard is cut into: a shard larger than this many times "
        "chunk_bytes gets larger chunks (up to 16 MiB), so the number of chunk records "
        "follows the number of shards, not the bytes",
    ),
    "segment_bytes": _Knob(
        "DISTCKPT_SEGMENT_BYTES",
        256 << 20,
        int,
        1,
        "size at which a process starts a new data file",
    ),
    "io_threads": _Knob(
        "DISTCKPT_IO_THREADS",
        4,
        int,
        1,
        "threads per process that read or write data files",
    ),
    "memory_bytes": _Knob(
        "DISTCKPT_MEMORY_BYTES",
        1 << 30,
        int,
        1,
        "host memory a synchronous save or a restore may use on each process beyond "
        "the state itself (fetched pieces of shards, write and read buffers, staged "
        "restore output); an async save's copy of the state is outside it",
    ),
    "read_batch_bytes": _Knob(
        "DISTCKPT_READ_BATCH_BYTES",
        None,
        int,
        1,
        "restore reads at most about this many bytes before placing them on "
        "devices (unset: what memory_bytes leaves after the reading threads' buffers)",
    ),
    "restore_share": _Knob(
        "DISTCKPT_RESTORE_SHARE",
        "auto",
        str,
        0,
        "restore of leaves replicated across processes: auto (each byte is read by one "
        "process and gathered through the job's collectives, for leaves where that saves "
        "each process at least 4 MiB of reads), on (every such leaf), off (every process "
        "reads all it needs); restore(share=) wins",
        choices=("auto", "on", "off"),
    ),
    "live_attempt_s": _Knob(
        "DISTCKPT_LIVE_ATTEMPT_S",
        3600.0,
        float,
        0.0,
        "age below which an unfinished save attempt on an object store (which "
        "has no locks) counts as a save in progress that clean-up must not touch",
    ),
    "io_backend": _Knob(
        "DISTCKPT_IO_BACKEND",
        "posix",
        str,
        0,
        "backend for filesystem paths: posix (direct I/O, the default) or tensorstore "
        "(through TensorStore's file kvstore)",
        choices=("posix", "tensorstore"),
    ),
    "s3_conditional_write": _Knob(
        "DISTCKPT_S3_CONDITIONAL_WRITE",
        True,
        bool,
        0,
        "whether commits to S3 use conditional writes (If-None-Match / If-Match); turn "
        "off only for a store that rejects them, losing the protection against two "
        "concurrent commits",
    ),
    "storage_retries": _Knob(
        "DISTCKPT_STORAGE_RETRIES",
        None,
        int,
        1,
        "times TensorStore retries a failed object-store request before the operation "
        "fails with StorageUnavailableError (unset: TensorStore's default)",
    ),
    "storage_retry_delay_s": _Knob(
        "DISTCKPT_STORAGE_RETRY_DELAY_S",
        None,
        float,
        1e-6,
        "first delay between object-store retries, in seconds (unset: TensorStore's default)",
    ),
}

_overrides: dict[str, Any] = {}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def get(name: str, value: Any = None) -> Any:
    """Returns the knob's value: ``value`` if given, else override, env, default.

    The value has the knob's type; a knob whose default is None returns None
    when nothing sets it.
    """
    knob = _KNOBS[name]
    source = "argument"
    if value is None:
        if name in _overrides:
            value, source = _overrides[name], "knobs.override"
        elif knob.env in os.environ:
            value, source = _parse(knob, os.environ[knob.env]), f"environment variable {knob.env}"
        else:
            value, source = knob.default, "default"
    if value is None:
        return None
    if knob.kind is str:
        if value not in knob.choices:
            raise ValueError(
                f"{name} must be one of {', '.join(knob.choices)}, got {value!r} (from "
                f"{source}); it sets the {knob.help}."
            )
        return value
    if knob.kind is bool:
        return bool(value)
    if value < knob.minimum:
        raise ValueError(
            f"{name} must be >= {knob.minimum}, got {value} (from {source}); "
            f"it sets the {knob.help}."
        )
    return knob.kind(value)


def _parse(knob: _Knob, raw: str) -> Any:
    if knob.kind is str:
        return raw.strip()
    if knob.kind is bool:
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(f"{knob.env}={raw!r} is not 0 or 1; it sets the {knob.help}.")
        return word in _TRUE
    try:
        return knob.kind(float(raw))
    except ValueError:
        raise ValueError(f"{knob.env}={raw!r} is not a number; it sets the {knob.help}.") from None


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Temporarily sets knobs (for tests): ``with override(chunk_bytes=4096): ...``."""
    unknown = set(values) - set(_KNOBS)
    if unknown:
        raise KeyError(f"unknown knobs {sorted(unknown)}; known: {sorted(_KNOBS)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
