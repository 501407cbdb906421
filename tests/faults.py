"""Fault injection shared by single- and multi-process tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fail_once(method: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    """``method`` wrapped so that its first call raises ``error`` and later calls work."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return method(*args, **kwargs)

    return wrapper
