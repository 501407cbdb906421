"""Checkpoints of any format as read sources: one factory, one interface.

``open_source(path)`` gives a :class:`Source` for a distckpt checkpoint or
an Orbax one (and, later, safetensors); ``format_of(path)`` says which
without reading leaves. ``distckpt.restore``, ``diff``, ``export``,
``convert`` and ``inspect`` read through it.
"""

from __future__ import annotations

import os

from distckpt._location import Location
from distckpt._sources import orbax as _orbax
from distckpt._sources.base import DEFAULT_SLAB_BYTES as DEFAULT_SLAB_BYTES
from distckpt._sources.base import Rows as Rows
from distckpt._sources.base import Source as Source
from distckpt._sources.base import row_slabs as row_slabs
from distckpt._sources.base import rows_box as rows_box
from distckpt._sources.distckpt import DistckptSource as DistckptSource
from distckpt._sources.orbax import OrbaxSource as OrbaxSource

DISTCKPT, ORBAX = "distckpt", "orbax"


def format_of(path: Location) -> str:
    """The format of the checkpoint at ``path``: ``"orbax"`` for a local Orbax
    checkpoint (its ``_METADATA``, and no distckpt manifest), else ``"distckpt"``."""
    if isinstance(path, (str, os.PathLike)) and _orbax.find_root(os.fspath(path)) is not None:
        return ORBAX
    return DISTCKPT


def open_source(path: Location) -> Source:
    """The checkpoint at ``path`` as a source, whatever its format."""
    if format_of(path) == ORBAX:
        assert not isinstance(path, dict)  # Orbax checkpoints are found at local paths only
        root = _orbax.find_root(os.fspath(path))
        assert root is not None
        return OrbaxSource(root)
    return DistckptSource(path)
