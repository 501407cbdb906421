"""``initialize``: join the job's processes into one JAX job, however it was launched."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax

log = logging.getLogger("distckpt")

# Set by `distckpt launch` (and accepted from users); JAX_* spellings work too.
ENV_COORDINATOR = "DISTCKPT_COORDINATOR"
ENV_NUM_PROCESSES = "DISTCKPT_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTCKPT_PROCESS_ID"

HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 120
INITIALIZATION_TIMEOUT_S = 300


def initialize(*, fail_fast: bool = True, **overrides: Any) -> str:
    """Calls ``jax.distributed.initialize`` when the job has several processes.

    What it joins, in this order:

    1. explicit settings: ``overrides`` (``coordinator_address``,
       ``num_processes``, ``process_id``), else ``DISTCKPT_COORDINATOR`` /
       ``DISTCKPT_NUM_PROCESSES`` / ``DISTCKPT_PROCESS_ID`` (set by
       ``distckpt launch``), else ``JAX_COORDINATOR_ADDRESS`` /
       ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
    2. a cluster JAX detects itself: SLURM, Open MPI, Cloud TPU pods and
       GKE, Kubernetes;
    3. otherwise a plain single process: nothing is done.

    Heartbeat (60 s), shutdown (120 s) and initialization (300 s) timeouts
    are set unless given in ``overrides``; any other keyword goes to
    ``jax.distributed.initialize``. On CPU, cross-process collectives use
    gloo. Safe to call twice. Logs one line saying what it found.

    With ``fail_fast`` (the default), an uncaught exception prints its
    traceback and ends the process at once with exit code 1. Otherwise
    JAX's shutdown barrier would hold the failed process for up to the
    shutdown timeout, and launchers (``distckpt launch``, ``srun
    --kill-on-bad-exit``) would not see the failure until then.

    Returns:
      What was detected: ``"explicit"``, the cluster's name (``"slurm"``,
      ``"ompi"``, ...), ``"single process"`` or ``"already initialized"``.
    """
    if _initialized():
        log.info("distckpt.initialize: jax.distributed is already initialized")
        return "already initialized"
    explicit = {
        "coordinator_address": _env(ENV_COORDINATOR, "JAX_COORDINATOR_ADDRESS"),
        "num_processes": _int(_env(ENV_NUM_PROCESSES, "JAX_NUM_PROCESSES")),
        "process_id": _int(_env(ENV_PROCESS_ID, "JAX_PROCESS_ID")),
    }
    # Keyword arguments of jax.distributed.initialize, of its several types.
    kwargs: dict[str, Any] = {k: v for k, v in explicit.items() if v is not None}
    kwargs.update(overrides)
    found: str | None
    if "coordinator_address" in kwargs:
        found = "explicit"
    else:
        found = _detected_cluster()
        if found is None:
            log.info("distckpt.initialize: no cluster found, running as a single process")
            return "single process"
    kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT_S)
    kwargs.setdefault("shutdown_timeout_seconds", SHUTDOWN_TIMEOUT_S)
    kwargs.setdefault("initialization_timeout", INITIALIZATION_TIMEOUT_S)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    if fail_fast:
        _exit_on_uncaught_exception()
    log.info(
        "distckpt.initialize: %s: process %d of %d, %d local device(s), coordinator %s",
        found,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        kwargs.get("coordinator_address", "chosen by JAX"),
    )
    return found


def _exit_on_uncaught_exception() -> None:
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)

    sys.excepthook = hook


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _initialized() -> bool:
    from distckpt import _multihost

    return _multihost.client() is not None


def _detected_cluster() -> str | None:
    """The name of the cluster JAX's own detection would use, if any."""
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - JAX moved its detection
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return getattr(env, "name", "") or env.__name__
        except Exception:  # noqa: BLE001 - a detector that cannot tell is not this cluster
            continue
    return None
