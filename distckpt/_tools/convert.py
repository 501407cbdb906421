"""``distckpt convert``: between distckpt, Orbax, npz and safetensors.

The source format is detected (an Orbax PyTree directory has ``_METADATA``;
a distckpt checkpoint has ``manifest.json``; safetensors files end in
``.safetensors``). npz and safetensors are
written slab by slab (``_export``); distckpt and Orbax destinations are
written by ``distckpt.save`` and Orbax's ``StandardCheckpointer``, which take
a whole tree, so those hold the checkpoint in host memory, read one leaf at
a time.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from distckpt import _sources, _storage, _tree
from distckpt._sources import orbax as _orbax
from distckpt._tools import export as _export
from distckpt.errors import CheckpointExistsError

FORMATS = ("distckpt", "orbax", "npz", "safetensors")


def load_tree(source: _sources.Source) -> Any:
    """The whole checkpoint as plain dicts and lists, read one leaf at a time.

    ``array`` leaves become ``jax.Array`` on the first CPU device (Orbax then
    records them as jax.Array, distckpt as arrays), numpy leaves stay numpy,
    PRNG keys become key arrays, Python values and ``None`` stay as they are.
    """
    cpu = jax.devices("cpu")[0]
    items = []
    for i, spec in enumerate(source.leaves):
        if spec.kind == _tree.PYTHON:
            value = spec.value
        elif spec.kind == _tree.NONE:
            value = None
        else:
            value = source.read_all(i)
            if spec.kind == _tree.PRNG_KEY:
                value = jax.random.wrap_key_data(jax.device_put(value, cpu), impl=spec.impl)
            elif spec.kind == _tree.ARRAY:
                value = jax.device_put(value, cpu)
        items.append((spec.path, value))
    return _tree.unflatten_plain(items)


def convert(
    src: str,
    dst: str,
    *,
    to: str,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> dict:
    """Converts ``src`` into ``dst`` in format ``to``; returns a summary.

    One process reads ``src`` (any format ``distckpt.restore`` reads) and
    writes ``dst``. ``to="safetensors"`` writes one file if ``dst`` ends in
    ``.safetensors`` (names joined with ``/``, docs/cli.md), else the
    Hugging Face sharded layout in the directory ``dst``
    (``model-0000k-of-0000N.safetensors`` and
    ``model.safetensors.index.json``; names joined with ``.``; shards of at
    most ``max_shard_bytes``, default 5 GB).

    Example::

      distckpt.convert("/ckpt/step_1000", "hf_weights", to="safetensors",
                       max_shard_bytes=2 * 10**9)

    Raises:
      NotCommittedError: ``src`` is neither a committed distckpt checkpoint
        nor an Orbax checkpoint.
      CheckpointExistsError / FileExistsError: ``dst`` exists and not ``overwrite``.
      ValueError: a leaf the destination format cannot hold (named).
    """
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    if max_shard_bytes is not None and (to != "safetensors" or dst.endswith(".safetensors")):
        raise ValueError(
            "a maximum shard size applies to the sharded safetensors layout only "
            "(--to safetensors with a DST directory not ending in .safetensors)"
        )
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"SRC and DST are the same path ({src}); write to another path")
    with _sources.open_source(src) as source:
        summary = {
            "from": source.format,
            "src": source.display,
            "dst": os.path.abspath(dst),
            "leaves": len(source.leaves),
            "bytes": sum(s.nbytes for s in source.leaves),
        }
        if to == "npz":
            _export.to_npz(source, dst, overwrite=overwrite)
        elif to == "safetensors" and dst.endswith(".safetensors"):
            _export.to_safetensors(source, dst, overwrite=overwrite)
        elif to == "safetensors":
            _export.to_hf_safetensors(
                source,
                dst,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes or _export.HF_DEFAULT_SHARD_BYTES,
            )
        elif to == "orbax":
            _write_orbax(source, dst, overwrite=overwrite)
        else:
            from distckpt._save import save

            if not overwrite:
                _refuse_committed(dst)  # before the whole source is read into memory
            tree = load_tree(source)
            save(dst, tree, overwrite=overwrite, metadata=source.user_metadata)
    return summary


def _refuse_committed(dst: str) -> None:
    """What ``save``'s preflight refuses without ``overwrite``: a committed checkpoint at ``dst``."""
    storage = _storage.open_storage(dst)
    if storage.read_manifest() is not None:
        raise CheckpointExistsError(
            f"a committed checkpoint already exists at {storage.display}; pass --overwrite to "
            "replace it (the old one stays readable until the new one commits) or choose "
            "another path"
        )


def _write_orbax(source: _sources.Source, dst: str, *, overwrite: bool) -> None:
    ocp = _orbax.import_orbax()
    strings = [
        s.display for s in source.leaves if s.kind == _tree.PYTHON and isinstance(s.value, str)
    ]
    if strings:
        raise ValueError(
            f"{source.display}: Orbax cannot store Python str leaves ({', '.join(strings)}); "
            "remove them from the tree, or export with --to npz, which keeps them"
        )
    dst = os.path.abspath(dst)
    _export.check_destination(dst, overwrite)
    tree = load_tree(source)
    metadata = source.user_metadata
    if metadata is not None and not isinstance(metadata, dict):
        metadata = {"user_metadata": metadata}  # Orbax's custom_metadata is a dict
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst, tree, force=overwrite, custom_metadata=metadata)
        ckptr.wait_until_finished()
