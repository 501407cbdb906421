"""Host buffers to ``jax.Array``s: one batched call per leaf.

Restore ends with one host buffer per addressable device for each leaf. The
public way to turn those into a global array (``jax.device_put`` onto each
device, then ``jax.make_array_from_single_device_arrays``) costs tens of
microseconds of Python per array and per device, which dominates a restore of
thousands of small leaves: 2,000 replicated 1 KiB leaves on 8 CPU devices
spent 150 ms there, against 40 ms for the copies themselves.

So the first leaf of each (shape, dtype, sharding) goes through the public
API, and the others of the same kind are built the way JAX builds the result
of ``device_put`` of a numpy array: one call of the runtime's batched
``device_put`` with the abstract value JAX gave the first. Without that entry
point (a JAX that moved it), everything takes the public path and a warning
says so once. Nothing here
communicates across processes: each process builds its own shards.

Buffers are taken without a copy where the runtime allows (aligned host
memory on CPU); devices holding the same box share one host buffer, as they
do after ``jax.device_put``. The runtime never donates such a buffer: a
donating computation writes its output elsewhere (tests/test_roundtrip.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from distckpt._reshard import Box

try:  # the call jax.device_put of a numpy array ends in; not public API
    from jax._src.lib import xla_client as _xc

    _batched_device_put = _xc.batched_device_put
except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
    _batched_device_put = None
    logging.getLogger("distckpt").warning(
        "jax %s has no jax._src.lib.xla_client.batched_device_put: restore builds every "
        "array through the public API, which is slower for many small leaves "
        "(distckpt/_put.py)",
        jax.__version__,
    )


def arrays(
    jobs: Sequence[
        tuple[tuple[int, ...], np.dtype, Any, Sequence[tuple[Any, Box]], Mapping[Box, np.ndarray]]
    ],
) -> list[jax.Array]:
    """Builds one array per ``(shape, dtype, sharding, device_boxes, hosts)``.

    ``device_boxes`` pairs each of the sharding's addressable devices (in the
    order of ``sharding.addressable_devices_indices_map``) with the box it
    holds; ``hosts`` maps each of those boxes to its host buffer. A process
    with none of the sharding's devices gets the global array with no local
    shards. The buffers go to the sharding's memory kind (``pinned_host``
    for offloaded state).
    """
    avals: dict[tuple, Any] = {}
    out: list[jax.Array] = []
    for shape, dtype, sharding, device_boxes, hosts in jobs:
        devices = [d for d, _ in device_boxes]
        blocks = [hosts[box] for _, box in device_boxes]
        if not blocks:  # the array lives on other processes' devices only
            dtype = jax.dtypes.canonicalize_dtype(dtype)  # what device_put gives the others
            out.append(jax.make_array_from_single_device_arrays(shape, sharding, [], dtype=dtype))
            continue
        key = (shape, dtype, sharding)
        aval = avals.get(key)
        if aval is not None:  # the runtime call honours the sharding's memory kind
            out.append(_batched_device_put(aval, sharding, blocks, devices, True))
            continue
        kind = getattr(sharding, "memory_kind", None)
        if kind is not None and kind != devices[0].default_memory().kind:
            # device_put onto bare devices would land in device memory, which
            # make_array_from_single_device_arrays refuses for a host sharding.
            devices = [SingleDeviceSharding(d, memory_kind=kind) for d in devices]
        arr = jax.make_array_from_single_device_arrays(
            shape, sharding, jax.device_put(blocks, devices, may_alias=True)
        )
        if _batched_device_put is not None and jax_holds(dtype):
            avals[key] = arr.aval
        out.append(arr)
    return out


def jax_holds(dtype: np.dtype) -> bool:
    """False for dtypes JAX would convert (64-bit ones without ``jax_enable_x64``)."""
    return jax.dtypes.canonicalize_dtype(dtype) == dtype
