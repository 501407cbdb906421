"""Preemption: every process stops at the same step once any of them was told to.

In a ``jax.distributed`` job this is JAX's preemption sync point (SIGTERM);
in a single process without it, a SIGTERM handler this module installs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings

from distckpt import _multihost

log = logging.getLogger("distckpt")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; a requeued job resumes from latest_step()


class Preemption:
    """Tracks the preemption notice of one manager."""

    def __init__(self) -> None:
        self.step: int | None = None  # the step every process agreed to stop at
        self._seen = threading.Event()
        self._installed = False
        warn_if_sigterm_shadowed()

    def reached(self, step: int) -> bool:
        """True, on every process at the same step, once any process got a notice."""
        if _multihost.process_count() > 1 or _multihost.client() is not None:
            from jax.experimental import multihost_utils

            reached = multihost_utils.reached_preemption_sync_point(step)
        else:
            if not self._installed:
                self._installed = _catch_sigterm(self._seen)
            reached = self._seen.is_set()
        if reached and self.step is None:
            self.step = step
            log.warning("preemption: every process agreed to stop at step %d", step)
        return reached


def forward_signal(sig: int = signal.SIGUSR1) -> None:
    """Turns signal ``sig`` into a preemption notice (SLURM's ``--signal=USR1@120``).

    JAX's notifier listens for SIGTERM; this re-sends ``sig`` to this process
    as SIGTERM so that ``reached_preemption`` sees it.
    """

    def forward(signum: int, frame: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(sig, forward)


def warn_if_sigterm_shadowed() -> None:
    # JAX's notifier is a C handler (getsignal returns None); a Python handler
    # installed after jax.distributed.initialize silently replaces it.
    if _multihost.client() is not None and callable(signal.getsignal(signal.SIGTERM)):
        warnings.warn(
            "a Python SIGTERM handler is installed; it replaces JAX's preemption notifier, so "
            "reached_preemption() will not see SIGTERM. Remove it, or use "
            "distckpt.forward_signal() for other signals.",
            stacklevel=4,
        )


def _catch_sigterm(seen: threading.Event) -> bool:
    """Single process without jax.distributed: SIGTERM sets ``seen`` instead of killing.

    Installed by the first ``reached_preemption`` call, so a program that
    never asks keeps the default SIGTERM behaviour.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return True  # someone else's handler: leave it alone

    def notice(signum: int, frame: object) -> None:
        seen.set()

    signal.signal(signal.SIGTERM, notice)
    return True
