"""``abstract_like``: the restore target for a state, with a sharding on every array."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import (
    AbstractMesh,
    Mesh,
    NamedSharding,
    PartitionSpec,
    Sharding,
    SingleDeviceSharding,
)

from distckpt import _tree
from distckpt.errors import TreeMismatchError


def abstract_like(tree: Any, shardings: Any = None, *, mesh: Mesh | None = None) -> Any:
    """The restore target for a state shaped like ``tree``.

    Every ``jax.Array`` or ``jax.ShapeDtypeStruct`` leaf becomes a
    ``ShapeDtypeStruct`` with a sharding; numpy arrays, Python values and
    ``None`` stay as they are (``restore`` returns them on the host). The
    structure, named tuples and ``optax.EmptyState``/``MaskedNode`` included,
    is kept, so the restored state has the exact types of ``tree``.

    Args:
      tree: a live state (its arrays carry their shardings), or an abstract
        one such as ``jax.eval_shape(opt.init, params)`` or
        ``nnx.eval_shape(...)``'s state.
      shardings: where each array goes. ``None``: each leaf's own sharding.
        A ``Sharding``: every array. A tree of shardings shaped like
        ``tree``: leaf by leaf. A tree shaped like a *part* of ``tree`` (the
        params): applied to every part of ``tree`` with that structure, so
        optimizer moments (``mu``, ``nu``, momentum traces) get their
        parameter's sharding.
      mesh: the mesh of the state. Found from the shardings when they use one
        mesh (else the mesh set by ``jax.set_mesh``); needed when they use
        several. Shardings on an abstract mesh (``jax.eval_shape`` under
        ``jax.set_mesh``) are placed on the mesh set by ``jax.set_mesh``.

    Leaves with no sharding, or on a single device (optax's step ``count``
    and other scalars are created uncommitted on one device), become
    *replicated on the mesh*: a leaf committed to one device next to arrays
    on a mesh would make the next jitted step fail with "incompatible
    devices". Without any mesh such leaves go to the first device in a
    single-process job and are replicated over all devices in a
    multi-process one.

    Example::

      opt = optax.adamw(1e-3)
      target = distckpt.abstract_like(
          {"params": jax.eval_shape(init, key), "opt": jax.eval_shape(opt.init, params)},
          shardings=param_shardings)   # params and moments share shardings
      state = distckpt.restore(path, target)
    """
    if shardings is None:
        per_leaf = jax.tree.map(_own_sharding, tree, is_leaf=_tree.is_none)
    elif isinstance(shardings, Sharding):
        per_leaf = jax.tree.map(lambda _: shardings, tree, is_leaf=_tree.is_none)
    else:
        per_leaf = _spread(tree, shardings)
    items, treedef = _tree.flatten(tree)
    found, _ = _tree.flatten(per_leaf)  # mirrors tree: zip(strict=True) checks it
    resolved, problems = [], []
    for path, sharding in found:
        try:
            resolved.append((path, concrete(sharding, _tree.display(path), "abstract_like")))
        except TreeMismatchError as e:
            problems.append(str(e))
    if problems:
        raise TreeMismatchError(
            f"abstract_like: cannot place {len(problems)} leaf(s) on devices:\n  "
            + "\n  ".join(problems),
            problems,
        )
    mesh = mesh or _the_mesh(tree, [s for _, s in resolved]) or _set_mesh()
    out = [
        _abstract(path, leaf, sharding, mesh)
        for (path, leaf), (_, sharding) in zip(items, resolved, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def concrete(sharding: Any, where: str, call: str) -> Any:
    """``sharding`` on a concrete mesh: an abstract mesh is resolved against the one set.

    ``jax.eval_shape`` under ``jax.set_mesh`` (explicit sharding) gives
    shardings over an ``AbstractMesh``, which names axes but no devices; the
    devices come from the mesh set by ``jax.set_mesh``. Raises
    ``TreeMismatchError`` naming ``where`` when no mesh is set, or when the
    set one has other axes.
    """
    if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, AbstractMesh):
        return sharding
    want = dict(sharding.mesh.shape)
    mesh = _set_mesh()
    if mesh is None:
        raise TreeMismatchError(
            f"{where}: the target's sharding is on an abstract mesh {want} (what jax.eval_shape "
            f"gives under jax.set_mesh) and no mesh is set now; call {call} inside "
            "`with jax.set_mesh(mesh):` or give a concrete NamedSharding"
        )
    if tuple(mesh.shape.items()) != tuple(sharding.mesh.shape.items()):
        raise TreeMismatchError(
            f"{where}: the target's sharding is on an abstract mesh {want}, but the mesh set "
            f"by jax.set_mesh is {dict(mesh.shape)}; call {call} under the mesh the target "
            "was built with, or give a concrete NamedSharding"
        )
    return NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


def _set_mesh() -> Mesh | None:
    """The mesh set by ``jax.set_mesh``, if any."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def _is_array_like(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))


def _own_sharding(leaf: Any) -> Sharding | None:
    return getattr(leaf, "sharding", None) if _is_array_like(leaf) else None


def _spread(tree: Any, shardings: Any) -> Any:
    """A sharding (or None) per leaf of ``tree`` from a tree of shardings or arrays."""
    is_ref = lambda x: x is None or isinstance(x, Sharding) or _is_array_like(x)  # noqa: E731
    structure = jax.tree.structure(tree, is_leaf=_tree.is_none)
    # jaxlib._jax ships no stubs, so mypy cannot resolve PyTreeDef (or its ==).
    if jax.tree.structure(shardings, is_leaf=is_ref) == structure:  # type: ignore[operator]
        return jax.tree.map(_as_sharding, shardings, is_leaf=is_ref)
    # Shaped like a part of the tree (the params): a leaf whose key path ends
    # with a reference's path, and whose shape fits, gets its sharding.
    refs = {_tree.match_key(path): ref for path, ref in _tree.flatten(shardings, is_ref)[0]}
    out, matched = [], 0
    for path, leaf in _tree.flatten(tree)[0]:
        key, found = _tree.match_key(path), None
        for start in range(len(key)):
            ref = refs.get(key[start:])
            if ref is not None and _is_array_like(leaf) and _fits(ref, leaf.shape):
                found = _as_sharding(ref)
                break
        matched += found is not None
        out.append(found)
    if not matched:
        raise ValueError(
            "shardings= matches no leaf of the tree: it is not shaped like the tree, and no "
            "leaf's key path ends with one of its paths with a fitting shape.\n"
            f"  shardings: {jax.tree.structure(shardings, is_leaf=is_ref)}\n"
            f"  tree:      {structure}\n"
            "Pass a single Sharding, a tree of shardings with the tree's structure, or the "
            "params (or their shardings) to share them with the optimizer state."
        )
    return jax.tree_util.tree_unflatten(structure, out)


def _as_sharding(ref: Any) -> Sharding | None:
    return ref if ref is None or isinstance(ref, Sharding) else getattr(ref, "sharding", None)


def _fits(ref: Any, shape: tuple[int, ...]) -> bool:
    if _is_array_like(ref):
        return tuple(ref.shape) == tuple(shape)
    try:
        ref.shard_shape(tuple(shape))
    except (ValueError, TypeError, IndexError):
        return False
    return True


def _the_mesh(tree: Any, per_leaf: list[Any]) -> Mesh | None:
    meshes = {}
    for s in jax.tree.leaves([per_leaf, jax.tree.map(_own_sharding, tree)]):
        if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) and s.mesh.size > 1:
            meshes[id(s.mesh)] = s.mesh
    unique = {(m.axis_names, tuple(m.devices.flat)): m for m in meshes.values()}
    if len(unique) > 1:
        raise ValueError(
            f"the state's arrays live on {len(unique)} different meshes "
            f"({[dict(m.shape) for m in unique.values()]}); pass mesh= to say where leaves "
            "with no sharding of their own (scalars such as optax's count) should go"
        )
    return next(iter(unique.values()), None)


def _abstract(path: _tree.Path, leaf: Any, sharding: Any, mesh: Mesh | None) -> Any:
    if not _is_array_like(leaf):
        if leaf is None or isinstance(leaf, (np.ndarray, np.generic, *_tree.PYTHON_TYPES)):
            return leaf
        raise TypeError(
            f"{_tree.display(path)}: a {type(leaf).__name__} is not something distckpt restores; "
            "leaves must be arrays, ShapeDtypeStructs, numpy arrays, Python scalars or None"
        )
    if sharding is not None and not isinstance(sharding, Sharding):
        raise TypeError(f"{_tree.display(path)}: shardings gave {sharding!r}, not a Sharding")
    if sharding is None or (
        isinstance(sharding, SingleDeviceSharding) and mesh is not None and mesh.size > 1
    ):
        kind = getattr(sharding, "memory_kind", None)  # an offloaded scalar stays offloaded
        sharding = _fallback(mesh)
        if kind is not None and kind != sharding.memory_kind:
            sharding = sharding.with_memory_kind(kind)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _fallback(mesh: Mesh | None) -> Sharding:
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())
