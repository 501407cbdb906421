"""Which committed steps a CheckpointManager keeps, and which one is best. No I/O.

Also what the manager records per step (its number and metrics), checked
before a save writes anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal

Metrics = dict[str, int | float]


@dataclasses.dataclass(frozen=True)
class Retention:
    """The rules that decide which steps stay; they combine as a union.

    Attributes:
      max_to_keep: keep the latest N committed steps (None: no limit).
      keep_every_n_steps: also keep, forever, every step divisible by K.
      best_metric: the metric (of ``save(..., metrics=)``) that ranks steps.
      best_mode: ``"min"`` or ``"max"``: which values of ``best_metric`` are best.
      keep_best: also keep the N best steps by ``best_metric``.

    The latest step is always kept, so a job can resume. With neither
    ``max_to_keep`` nor ``keep_best``, every step is kept.
    """

    max_to_keep: int | None = None
    keep_every_n_steps: int | None = None
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_best: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_to_keep", "keep_every_n_steps", "keep_best"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.best_metric is not None and not isinstance(self.best_metric, str):
            raise TypeError(f"best_metric must be a metric name (str), got {self.best_metric!r}")
        if self.keep_best is not None and self.best_metric is None:
            raise ValueError(
                f"keep_best={self.keep_best} needs best_metric= (the metric to rank steps by)"
            )

    def ranked(self, metrics: Mapping[int, object]) -> list[int]:
        """Steps of ``metrics`` (step -> its metrics) best first; [] without ``best_metric``."""
        if self.best_metric is None:
            return []
        return rank(metrics, self.best_metric, self.best_mode)

    def keep(self, metrics: Mapping[int, object]) -> set[int]:
        """The steps of ``metrics`` these rules keep."""
        steps = sorted(metrics)
        if not steps or (self.max_to_keep is None and self.keep_best is None):
            return set(steps)
        keep = {steps[-1]}  # the latest step is always kept: a job must be able to resume
        if self.max_to_keep is not None:
            keep.update(steps[-self.max_to_keep :])
        if self.keep_every_n_steps is not None:
            keep.update(s for s in steps if s % self.keep_every_n_steps == 0)
        if self.keep_best is not None:
            keep.update(self.ranked(metrics)[: self.keep_best])
        return keep


def metric_value(metrics: object, name: str) -> float | None:
    """``metrics[name]`` as a float if it can rank a step: a finite real number, else None.

    NaN, infinities, a missing metric, and whatever else a metrics record on
    disk may hold never count as best.
    """
    if not isinstance(metrics, dict):
        return None
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rank(metrics: Mapping[int, object], name: str, mode: str) -> list[int]:
    """Steps best first by metric ``name`` (``mode`` "min" or "max"); ties go to the newer step.

    Steps whose metric is missing or not a finite number are left out. The
    one ranking used by the manager's retention and ``best_step`` and by
    ``distckpt ls``.
    """
    scored = [(v, s) for s, m in metrics.items() if (v := metric_value(m, name)) is not None]
    scored.sort(key=lambda x: (x[0] if mode == "min" else -x[0], -x[1]))
    return [s for _, s in scored]


def check_step(step: object) -> int:
    """A step number as an int (numpy and JAX integers accepted); ValueError/TypeError otherwise."""
    is_bool = isinstance(step, bool) or _kind(step) == "b"
    number = None if is_bool else _as_number(step)
    if not isinstance(number, int):
        raise TypeError(
            f"step must be an int (or a numpy/JAX integer), got {type(step).__name__} {step!r}"
        )
    if number < 0:
        raise ValueError(f"step must be >= 0, got {number}")
    return number


def check_metrics(metrics: object) -> Metrics | None:
    """Metrics as a JSON-able dict of str -> int/float, converting numpy and JAX scalars.

    Raises TypeError naming the offending metric, before anything is written.
    """
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out: Metrics = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(
                f"metrics must map metric names (str) to numbers, got the key {name!r} "
                f"(keys: {list(metrics)})"
            )
        number = _as_number(value)
        if number is None:
            raise TypeError(
                f"metric {name!r} is {type(value).__name__} {value!r}, not a number: metrics "
                "must be int or float (numpy and JAX scalars are converted). Leave a metric "
                "out of the dict rather than passing None."
            )
        out[name] = number
    return out


def _kind(value: object) -> str | None:
    """The numpy dtype kind of a 0-d numpy/JAX value (``np.int64(3)``, ``jnp.float32(1)``)."""
    if getattr(value, "shape", None) != () or not hasattr(value, "item"):
        return None
    return getattr(getattr(value, "dtype", None), "kind", None)


def _as_number(value: object) -> int | float | None:
    """A Python int or float for a number, numpy and JAX scalars included; else None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    kind = _kind(value)
    if kind in ("b", "i", "u"):
        return int(value.item())  # type: ignore[attr-defined]  # _kind checked it has one
    if kind == "f":
        return float(value.item())  # type: ignore[attr-defined]
    return None
