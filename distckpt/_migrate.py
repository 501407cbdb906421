"""Restoring into a tree whose key paths changed: renames, new leaves, dropped leaves.

Key paths are written with ``/`` between keys (``params/blocks/0/kernel``),
the form ``distckpt diff`` shows. ``rename`` maps saved paths to target
paths: a dict of regular expressions (matched against the whole saved path)
to replacements (``\\1`` for groups), tried in order, or a function from a
saved path to its new path (None: unchanged). ``drop`` lists patterns of
saved paths the target leaves out on purpose. ``init`` gives values for
target leaves the checkpoint does not have: a tree shaped like (part of)
the target, or a function from a target path to a value (None: none).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from distckpt import _tree

# What ``restore(rename=)`` takes: regular expressions of saved paths to
# replacements, or a function from a saved path to its new one (None: unchanged).
Rename: TypeAlias = Mapping[str, str] | Callable[[str], str | None]


def slash(key: tuple[str, ...]) -> str:
    return "/".join(key)


@dataclass
class Migration:
    rename: Callable[[str], str | None] | None = None
    drop: list[re.Pattern] = field(default_factory=list)
    init: Callable[[str], Any] | None = None

    @classmethod
    def build(
        cls, rename: Rename | None, drop: Iterable[str] | None, init: Any
    ) -> Migration | None:
        if rename is None and drop is None and init is None:
            return None
        return cls(_renamer(rename), [re.compile(p) for p in (drop or [])], _initialiser(init))

    def renamed(self, key: tuple[str, ...]) -> tuple[str, ...]:
        if self.rename is None:
            return key
        new = self.rename(slash(key))
        return key if new is None else tuple(new.split("/"))

    def dropped(self, key: tuple[str, ...]) -> bool:
        return any(p.fullmatch(slash(key)) for p in self.drop)

    def initial(self, key: tuple[str, ...]) -> tuple[bool, Any]:
        if self.init is None:
            return False, None
        value = self.init(slash(key))
        return value is not None, value


def _renamer(rename: Rename | None) -> Callable[[str], str | None] | None:
    if rename is None or callable(rename):
        return rename
    rules = [(re.compile(old), new) for old, new in dict(rename).items()]

    def apply(path: str) -> str | None:
        for pattern, new in rules:
            if pattern.fullmatch(path):
                return pattern.sub(new, path, count=1)
        return None

    return apply


def _initialiser(init: Any) -> Callable[[str], Any] | None:
    if init is None or callable(init):
        return init
    items, _ = _tree.flatten(init)
    values = {slash(_tree.match_key(path)): leaf for path, leaf in items}
    return values.get


def suggestions(missing: dict[str, Any], unused: dict[str, Any]) -> list[str]:
    """For each target path with no saved leaf, the most similar unused saved path
    of the same shape and dtype: a rename that would connect them."""
    out = []
    for new, (shape, dtype) in missing.items():
        same = [old for old, (s, d) in unused.items() if s == shape and d == dtype]
        close = difflib.get_close_matches(new, same, n=1, cutoff=0.3) or same[:1]
        if close:
            out.append(f'"{close[0]}": "{new}"')
    return out
