"""Checkpoints of any format as read sources: one factory, one interface.

``open_source(path)`` gives a :class:`Source` for a distckpt checkpoint, an
Orbax one, or safetensors (a file, or a directory of shards with an index);
``format_of(path)`` says which without reading leaves. ``distckpt.restore``, ``diff``, ``export``,
``convert`` and ``inspect`` read through it.
"""

from __future__ import annotations

import os

from distckpt._layout import MANIFEST_NAME
from distckpt._location import Location
from distckpt._sources import orbax as _orbax
from distckpt._sources import safetensors as _safetensors
from distckpt._sources.base import DEFAULT_SLAB_BYTES as DEFAULT_SLAB_BYTES
from distckpt._sources.base import Rows as Rows
from distckpt._sources.base import Source as Source
from distckpt._sources.base import row_slabs as row_slabs
from distckpt._sources.base import rows_box as rows_box
from distckpt._sources.distckpt import DistckptSource as DistckptSource
from distckpt._sources.orbax import OrbaxSource as OrbaxSource
from distckpt._sources.safetensors import SafetensorsSource as SafetensorsSource

DISTCKPT, ORBAX, SAFETENSORS = "distckpt", "orbax", "safetensors"


def format_of(path: Location) -> str:
    """The format of the checkpoint at ``path``: ``"orbax"`` for a local Orbax
    checkpoint (its ``_METADATA``, and no distckpt manifest), ``"safetensors"``
    for a ``.safetensors`` file or a directory of them (``_safetensors.detect``),
    else ``"distckpt"``."""
    if isinstance(path, (str, os.PathLike)):
        local = os.fspath(path)
        if _orbax.find_root(local) is not None:
            return ORBAX
        if not os.path.isfile(os.path.join(local, MANIFEST_NAME)) and (
            _safetensors.detect(local) is not None
        ):
            return SAFETENSORS
    return DISTCKPT


def open_source(path: Location) -> Source:
    """The checkpoint at ``path`` as a source, whatever its format."""
    kind = format_of(path)
    if kind == DISTCKPT:
        return DistckptSource(path)
    assert not isinstance(path, dict)  # other formats are found at local paths only
    if kind == ORBAX:
        root = _orbax.find_root(os.fspath(path))
        assert root is not None
        return OrbaxSource(root)
    entry = _safetensors.detect(os.fspath(path))
    assert entry is not None
    return SafetensorsSource(entry)
