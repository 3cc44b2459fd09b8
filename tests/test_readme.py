"""The README's Python examples run as written, in order, as a new user would paste them:
from a directory with `../shared` beside it (outputs land in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_snippets(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(shared_assets, tmp_path, monkeypatch):
    snippets = python_snippets((ROOT / "README.md").read_text())
    assert len(snippets) >= 4
    (tmp_path / "shared").symlink_to(shared_assets.parent)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict = {}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README snippet {i + 1} fails: {type(e).__name__}: {e}\n{code}")
    assert namespace["logits"].shape == (1, 3, 512)
    assert (work / "stories_meta" / "params.json").is_file()
    assert namespace["out"][0].token_ids
