"""``distckpt.convert`` (and ``distckpt convert``): between distckpt, Orbax, npz and safetensors.

In the engine rather than among the one-process tools: it is public, and
``--to distckpt`` in a multi-process job is collective (``convert_collectively``).

The source format is detected (an Orbax PyTree directory has ``_METADATA``;
a distckpt checkpoint has ``manifest.json``; safetensors files end in
``.safetensors``). npz and safetensors are written slab by slab
(``_export``); distckpt and Orbax destinations are written by
``distckpt.save`` and Orbax's ``StandardCheckpointer``, which take a whole
tree, so those hold the checkpoint in host memory, read one leaf at a time
(or, collectively, each process its share).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distckpt import _export, _plan, _put, _sources, _storage, _tree
from distckpt._plan import LeafSpec
from distckpt._sources import orbax as _orbax
from distckpt.errors import CheckpointExistsError

FORMATS = ("distckpt", "orbax", "npz", "safetensors")


def load_tree(source: _sources.Source) -> Any:
    """The whole checkpoint as plain dicts and lists, read one leaf at a time.

    ``array`` leaves become ``jax.Array`` on the first CPU device (Orbax then
    records them as jax.Array, distckpt as arrays) unless JAX would narrow
    their dtype (64-bit ones with ``jax_enable_x64`` off: they stay numpy
    arrays, values intact), numpy leaves stay numpy,
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
            elif spec.kind == _tree.ARRAY and _put.jax_holds(value.dtype):
                value = jax.device_put(value, cpu)  # else numpy: JAX would narrow it
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
    writes ``dst``; with ``to="distckpt"`` in a multi-process job, every
    process calls it and each reads and writes its part
    (``convert_collectively``). ``to="safetensors"`` writes one file if ``dst`` ends in
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
    if jax.process_count() > 1:
        if to != "distckpt":
            raise ValueError(
                f"convert --to {to} runs in one process (one writer of DST); only --to "
                "distckpt runs in a multi-process job"
            )
        return convert_collectively(src, dst, overwrite=overwrite)
    with _sources.open_source(src) as source:
        summary = _summary(source, dst)
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


def convert_collectively(
    src: str, dst: str, *, overwrite: bool = False, timeout_s: float | None = None
) -> dict:
    """``convert --to distckpt`` by every process of a job, each converting its part.

    Every process reads ``src``'s metadata and asks for each leaf split
    across the job's processes (``job_target``): ``restore`` then has each
    process read only its part, and ``distckpt.save`` has each write it. Host
    memory per process: about its share of the checkpoint (1/N of the
    arrays that split evenly; leaves that split along no dimension are read
    whole by every process and written once).

    Raises:
      What ``distckpt.restore`` and ``distckpt.save`` raise, on every process.
    """
    from distckpt._save import save
    from distckpt._source_restore import restore_source

    if not overwrite:
        _refuse_committed(dst)
    with _sources.open_source(src) as source:
        summary = _summary(source, dst)
        target = _tree.unflatten_plain([(s.path, job_target(s)) for s in source.leaves])
        metadata = source.user_metadata
    if source.format == _sources.DISTCKPT:
        # A distckpt source goes through the engine's own restore (checksums, sharing).
        from distckpt._restore import restore

        tree = restore(src, target, timeout_s=timeout_s)
    else:
        tree = restore_source(
            src, target, partial=False, cast=False, migration=None, timeout_s=timeout_s
        )
    save(dst, tree, overwrite=overwrite, metadata=metadata, timeout_s=timeout_s)
    summary["processes"] = jax.process_count()
    return summary


def job_target(spec: LeafSpec) -> Any:
    """What to ask ``restore`` for one leaf so that each process holds its part.

    Arrays: split along their first dimension that the job's device count
    divides (else the process count, each process's devices then sharing
    its part), else replicated. numpy leaves stay numpy (the primary writes
    them), Python values and None are taken as they are.
    """
    if spec.kind == _tree.PYTHON:
        return spec.value
    if spec.kind == _tree.NONE:
        return None
    if spec.kind == _tree.NUMPY or not _put.jax_holds(_plan.np_dtype(spec.array_dtype)):
        # numpy leaves, and 64-bit ones JAX would narrow (jax_enable_x64 off): read
        # whole on the host, written by the primary.
        return np.zeros(spec.array_shape, _plan.np_dtype(spec.array_dtype))
    procs, local = jax.process_count(), jax.local_device_count()
    mesh = _job_mesh(procs, local)
    shape = spec.array_shape
    if spec.kind == _tree.PRNG_KEY:
        key = jax.random.key(0, impl=spec.impl)
        trailing = len(jax.random.key_data(key).shape)
        shape, dtype = shape[: len(shape) - trailing], key.dtype
    else:
        dtype = _plan.np_dtype(spec.array_dtype)
    parts: list[Any] = [None] * len(shape)
    for axes, n in ((("p", "l"), procs * local), ("p", procs)):
        dim = next((d for d, size in enumerate(shape) if size and size % n == 0), None)
        if dim is not None:
            parts[dim] = axes
            break
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*parts)))


@functools.cache
def _job_mesh(procs: int, local: int) -> Mesh:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(procs, local), ("p", "l"))


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


def _summary(source: _sources.Source, dst: str) -> dict:
    """What ``convert`` reports: the source's format and size, and where it went."""
    return {
        "from": source.format,
        "src": source.display,
        "dst": os.path.abspath(dst),
        "leaves": len(source.leaves),
        "bytes": sum(s.nbytes for s in source.leaves),
    }
