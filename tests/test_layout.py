"""The package's shape: no import cycles, layers that import only downwards, names checked.

Reads the source with ``ast`` (no imports run), so a cycle hidden behind a
function-level import is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distckpt"

# Modules the engine must never import: the one-process tools and the command
# line sit on top of it (docs/architecture.md).
TOP = ("distckpt.cli", "distckpt.launch", "distckpt._tools")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n in known and n not in (name, "distckpt"))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_the_package_has_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, (
        "import cycles (a helper two modules need belongs below both):\n"
        + "\n".join(" -> ".join(c) for c in cycles)
    )


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_engine_never_imports_the_tools_or_the_command_line():
    graph = _graph()
    wrong = [
        f"{m} imports {d}"
        for m, deps in sorted(graph.items())
        if not m.startswith(TOP)
        for d in sorted(deps)
        if d.startswith(TOP)
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_kvstore_backend_and_the_orbax_source_import_tensorstore():
    users = sorted(
        name
        for name, path in _modules().items()
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and any(
                (a.name if isinstance(n, ast.Import) else (n.module or "")).startswith(
                    "tensorstore"
                )
                for a in n.names
            )
            for n in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users == ["distckpt._sources.orbax", "distckpt._storage.kvstore"]


def test_a_misspelt_fault_point_is_refused(monkeypatch):
    from distckpt import _faults

    monkeypatch.setenv(_faults.ENV, "save.wirte:raise")
    with pytest.raises(ValueError, match="'save.wirte', which does not exist"):
        _faults.hit("save.write")
