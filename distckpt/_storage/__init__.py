"""Where checkpoint bytes live: the interface and its two backends.

``interface`` says what the pipelines ask of a location and in what order;
``posix`` implements it for filesystems, ``kvstore`` for object stores and
everything TensorStore's kvstore reaches. :func:`open_storage` picks one.
"""

from __future__ import annotations

from distckpt import _knobs, _location
from distckpt._storage.interface import ALIGN as ALIGN
from distckpt._storage.interface import Preflight as Preflight
from distckpt._storage.interface import Reader as Reader
from distckpt._storage.interface import Storage as Storage
from distckpt._storage.interface import Writer as Writer
from distckpt._storage.interface import aligned_empty as aligned_empty
from distckpt._storage.interface import named_attempt as named_attempt
from distckpt._storage.kvstore import KvStorage as KvStorage
from distckpt._storage.posix import PosixStorage as PosixStorage


def open_storage(directory: _location.Location | _location.ParsedLocation) -> Storage:
    """The storage for a checkpoint location (see ``_location``): a path, an
    ``s3://``/``gs://``/``memory://`` URL or a kvstore spec."""
    loc = _location.parse(directory)
    if loc.spec is not None:
        return KvStorage(loc.spec, display=loc.display)
    path = loc.path
    assert path is not None
    if _knobs.get("io_backend") == "tensorstore":
        return KvStorage({"driver": "file", "path": path + "/"}, display=path, local_path=path)
    return PosixStorage(path)
