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


@dataclass(frozen=True)
class _Knob:
    env: str
    default: float
    kind: type
    minimum: float
    help: str


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
    "read_batch_bytes": _Knob(
        "DISTCKPT_READ_BATCH_BYTES",
        256 << 20,
        int,
        1,
        "restore reads at most about this many bytes before placing them on "
        "devices, which bounds host memory",
    ),
    "live_attempt_s": _Knob(
        "DISTCKPT_LIVE_ATTEMPT_S",
        3600.0,
        float,
        0.0,
        "age below which an unfinished save attempt on an object store (which "
        "has no locks) counts as a save in progress that clean-up must not touch",
    ),
}

_overrides: dict[str, float] = {}


def get(name: str, value: float | None = None) -> float:
    """Returns the knob's value: ``value`` if given, else override, env, default."""
    knob = _KNOBS[name]
    source = "argument"
    if value is None:
        if name in _overrides:
            value, source = _overrides[name], "knobs.override"
        elif knob.env in os.environ:
            raw, source = os.environ[knob.env], f"environment variable {knob.env}"
            try:
                value = knob.kind(float(raw))
            except ValueError:
                raise ValueError(
                    f"{knob.env}={raw!r} is not a number; it sets the {knob.help}."
                ) from None
        else:
            value, source = knob.default, "default"
    if value < knob.minimum:
        raise ValueError(
            f"{name} must be >= {knob.minimum}, got {value} (from {source}); "
            f"it sets the {knob.help}."
        )
    return knob.kind(value)


@contextlib.contextmanager
def override(**values: float) -> Iterator[None]:
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
