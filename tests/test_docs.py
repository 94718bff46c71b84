"""Every ```python block of README.md and of docs/*.md runs as written, each in a fresh namespace,
and every ```json block parses. (The ```bash blocks' commands are checked against each script's
--help in tests/test_examples.py.)"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(language: str) -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        for i, code in enumerate(re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)):
            found.append((str(page.relative_to(ROOT)), i, code))
    return found


PYTHON = blocks("python")


def test_pages_have_python_blocks():
    pages = {page for page, _, _ in PYTHON}
    assert {"README.md", "docs/getting_started.md", "docs/pieces.md"} <= pages, pages


@pytest.mark.parametrize(("page", "index", "code"), PYTHON, ids=[f"{p}:{i}" for p, i, _ in PYTHON])
def test_python_block_runs(page, index, code):
    exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": f"docs_block_{index}"})


@pytest.mark.parametrize(("page", "index", "code"), blocks("json"), ids=lambda x: str(x)[:40])
def test_json_block_parses(page, index, code):
    json.loads(code)
