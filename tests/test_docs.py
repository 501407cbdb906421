"""The Python snippets in the docs run as written, in order, one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["training_state.md"]


def _snippets(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write under ./checkpoints
    snippets = _snippets(DOCS / page)
    assert snippets, f"no python snippets in docs/{page}"
    namespace: dict = {"__name__": f"docs.{page}"}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"docs/{page}[snippet {i + 1}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/{page}, snippet {i + 1} failed:\n{code}") from e
