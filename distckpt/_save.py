"""``save``: flatten -> plan -> stage -> write -> report -> commit, as phases on every process."""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import crc32c
import jax
import numpy as np

from distckpt import _commit, _knobs, _multihost, _plan, _reshard, _stage, _tree
from distckpt._plan import ChunkRecord, FileWrite, LeafSpec
from distckpt._storage import Storage, open_storage
from distckpt.errors import TreeMismatchError


def save(
    directory: Any,
    tree: Any,
    *,
    overwrite: bool = False,
    metadata: Any = None,
    timeout_s: float | None = None,
) -> None:
    """Saves ``tree`` to ``directory``; collective: every process calls it.

    Each process writes only the shards it owns (the ``replica_id == 0``
    copies), so replicated data is stored once; the primary process commits.
    Returns once the checkpoint is committed and visible to every process.

    Args:
      directory: a filesystem path (shared by all processes), ``memory://name``
        or a TensorStore kvstore spec.
      tree: a pytree of ``jax.Array`` (any sharding, typed PRNG keys
        included), numpy arrays, int, float, bool, str and None. Numpy and
        Python leaves are taken from the primary process.
      overwrite: replace a committed checkpoint at ``directory``. The old one
        stays readable until the new one commits.
      metadata: JSON-serialisable user data stored in the manifest.
      timeout_s: longest wait for the slowest process at any synchronisation
        point (default 300 s or ``DISTCKPT_TIMEOUT_S``).

    Raises:
      CheckpointExistsError: a checkpoint is there and ``overwrite`` is False.
      TreeMismatchError: processes passed trees of different structure.
      BarrierTimeoutError: a process did not arrive in time (named).
      ProcessFailure: a process raised (named, with its error), on every process.

    Example::

      mesh = jax.make_mesh((jax.device_count(),), ("x",))
      x = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, P("x")))
      distckpt.save("/ckpt/step_1", {"x": x, "step": 1})
    """
    storage = open_storage(directory)
    timeout = _knobs.get("timeout_s", timeout_s)
    coll = _multihost.Collective("save", storage.display, timeout)
    multiprocess = coll.count > 1
    job: dict[str, Any] = {}

    def prepare() -> dict:
        items, _ = _tree.flatten(tree)
        specs, problems = [], []
        for path, leaf in items:
            spec, problem = _stage.describe(path, leaf)
            if problem:
                problems.append(problem)
            specs.append(spec)
        if problems:
            raise TypeError("the tree has leaves distckpt cannot save:\n  " + "\n  ".join(problems))
        _check_unique_paths(specs)
        user_metadata = _json_roundtrip(metadata)
        job.update(items=items, specs=specs, metadata=user_metadata)
        out = {"fingerprint": _fingerprint(specs)}
        if coll.is_primary:
            estimate = sum(_nbytes(s) for s in specs)
            _commit.preflight(storage, overwrite=overwrite, estimated_bytes=estimate)
            job["attempt"] = out["attempt"] = _commit.new_attempt()
            storage.prepare_attempt(job["attempt"])
        return out

    def write() -> None:
        attempt = job["attempt"]
        storage.check_attempt_visible(attempt)
        records, files = _write_shards(
            storage,
            attempt,
            job["items"],
            job["specs"],
            process=coll.pid,
            is_primary=coll.is_primary,
            multiprocess=multiprocess,
        )
        storage.finish_attempt_writes(attempt)
        coll.put_blob(f"report/{coll.pid}", _commit.report_json(records, files, coll.pid))

    def commit() -> None:
        if not coll.is_primary:
            return
        reports = [coll.get_blob(f"report/{p}") for p in range(coll.count)]
        manifest = _commit.build_manifest(
            attempt=job["attempt"],
            specs=job["specs"],
            reports=reports,
            process_count=coll.count,
            device_count=jax.device_count(),
            user_metadata=job["metadata"],
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            versions=_versions(),
        )
        _commit.commit(storage, manifest)

    try:
        prepared = coll.run("prepare", prepare)
        _check_same_tree(prepared, storage.display)
        job["attempt"] = prepared[0]["attempt"]
        coll.run("write", write)
        coll.run("commit", commit)
    except BaseException:
        if coll.is_primary and "attempt" in job:
            _commit.discard_unless_committed(storage, job["attempt"])
        raise


def _write_shards(
    storage: Storage,
    attempt: str,
    items: list[tuple[_tree.Path, Any]],
    specs: list[LeafSpec],
    *,
    process: int,
    is_primary: bool,
    multiprocess: bool,
) -> tuple[list[ChunkRecord], dict[str, int]]:
    """Writes this process's shards; returns the chunk records and file sizes."""
    shards, hosts = [], {}
    for index, ((_, leaf), spec) in enumerate(zip(items, specs, strict=True)):
        if spec.kind not in _commit.STORED_KINDS:
            continue
        itemsize = np.dtype(jax.numpy.dtype(spec.dtype)).itemsize
        for box, to_host in _stage.owned_shards(
            leaf, spec.kind, is_primary=is_primary, multiprocess=multiprocess
        ):
            shards.append((index, box, itemsize))
            hosts[(index, box)] = to_host
    files = _plan.plan_writes(
        shards,
        process=process,
        chunk_bytes=_knobs.get("chunk_bytes"),
        segment_bytes=_knobs.get("segment_bytes"),
    )
    # Stage on this thread: device->host copies stay off the I/O threads.
    staged = {key: fn() for key, fn in hosts.items()}

    def write_file(fw: FileWrite) -> list[ChunkRecord]:
        writer = storage.writer(attempt, fw.name)
        records, offset = [], 0
        try:
            for c in fw.chunks:
                host = staged[(c.leaf, c.shard)]
                part = np.ascontiguousarray(host[_reshard.relative(c.box, c.shard)])
                view = memoryview(part.reshape(-1).view(np.uint8))
                records.append(
                    ChunkRecord(c.leaf, fw.name, offset, c.nbytes, crc32c.crc32c(view), c.box)
                )
                writer.write(view)
                offset += c.nbytes
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return records

    threads = min(_knobs.get("io_threads"), max(1, len(files)))
    with ThreadPoolExecutor(threads, thread_name_prefix="distckpt-write") as pool:
        per_file = list(pool.map(write_file, files))
    return [r for rs in per_file for r in rs], {fw.name: fw.nbytes for fw in files}


def _nbytes(spec: LeafSpec) -> int:
    if spec.kind not in _commit.STORED_KINDS:
        return 0
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(jax.numpy.dtype(spec.dtype)).itemsize


def _fingerprint(specs: list[LeafSpec]) -> str:
    doc = [[list(map(list, s.path)), s.kind, s.shape and list(s.shape), s.dtype] for s in specs]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()


def _check_same_tree(prepared: list[dict], where: str) -> None:
    differ = [p for p, d in enumerate(prepared) if d["fingerprint"] != prepared[0]["fingerprint"]]
    if differ:
        raise TreeMismatchError(
            f"save to {where}: processes {differ} passed a tree whose structure, shapes or dtypes "
            "differ from process 0's. save() is collective: every process must pass the same tree."
        )


def _check_unique_paths(specs: list[LeafSpec]) -> None:
    seen: dict[tuple[str, ...], str] = {}
    for s in specs:
        key = _tree.match_key(s.path)
        if key in seen:
            raise TypeError(
                f"leaves {seen[key]} and {s.display} have the same key path; rename one"
            )
        seen[key] = s.display


def _json_roundtrip(metadata: Any) -> Any:
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (dicts, lists, str, numbers): {e}"
        ) from None


def _versions() -> dict[str, str]:
    from distckpt import __version__

    return {
        "distckpt": __version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
