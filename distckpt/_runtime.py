"""Process-level settings that save and restore adjust while they run."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Holds off Python's cyclic garbage collector for the duration.

    Saving or restoring thousands of leaves allocates many small objects,
    which triggers full collections; JAX hooks a callback into each of those
    that costs tens of milliseconds. Nothing we allocate forms cycles, so
    collecting afterwards loses nothing.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
