"""results/: each JSON file says where it came from, each page is rendered from its JSON, and the
result tables of README.md and docs/ are copies of those pages' tables, so no published number drifts from its data."""

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402
import bench_refresh  # noqa: E402
import compare  # noqa: E402
import finetune_demo  # noqa: E402
import host_overhead  # noqa: E402
import memory_report  # noqa: E402
import moment_policy  # noqa: E402
import similarity  # noqa: E402
from lm import sweep  # noqa: E402

RENDER = {"compare.json": compare.render, "rank_sweep.json": sweep.render, "similarity.json": similarity.render,
          "finetune.json": finetune_demo.render, "family_sweep.json": sweep.render_family,
          "refresh_7b.json": bench_refresh.render, "accelerator.json": accelerator.render,
          "accelerator_update.json": accelerator.render, "host_overhead.json": host_overhead.render,
          "moment_policy.json": moment_policy.render}  # fmt: skip
MARKER = re.compile(r"<!-- table from (results/[\w/.-]+\.md) -->")


def result_files() -> list[pathlib.Path]:
    return sorted(p for p in RESULTS.rglob("*.json") if "runs" not in p.relative_to(RESULTS).parts)


def test_there_are_results():
    names = {p.name for p in result_files()}
    assert set(RENDER) <= names, names


@pytest.mark.parametrize("path", result_files(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_results_file_records_where_it_came_from(path):
    prov = json.loads(path.read_text())["provenance"]
    script = prov["command"].split()[1]
    assert prov["command"].startswith("python ") and (ROOT / script).is_file(), prov["command"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]), f"{path}: not made from committed code: {prov['commit']}"
    assert prov["versions"]["jax"] and prov["versions"]["python"]
    assert prov["machine"]["cpu"] and prov["machine"]["cores"] >= 1 and prov["machine"]["backend"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", prov["date"])


def renderer(path: pathlib.Path):
    """The function that renders ``path``'s page: by name, or memory_report's for its ``--save`` files."""
    if path.name in RENDER:
        return RENDER[path.name]
    if path.name.startswith("memory_") and "report" in json.loads(path.read_text()):
        return memory_report.render
    return None


@pytest.mark.parametrize("path", [p for p in result_files() if renderer(p)], ids=lambda p: str(p.relative_to(RESULTS)))
def test_page_is_rendered_from_its_json(path):
    page = path.with_suffix(".md")
    assert renderer(path)(json.loads(path.read_text())) == page.read_text(), f"{page} differs from {path}"


def readme_tables(text: str) -> list[tuple[str, list[str]]]:
    """(results page, the table lines right after its marker) for each marker in ``text``."""
    found = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = MARKER.fullmatch(line.strip())
        if m:
            table = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    if table:
                        break
                    continue
                table.append(row)
            found.append((m.group(1), table))
    return found


def test_readme_and_docs_tables_are_copies_of_results_pages():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    tables = [t for page in pages for t in readme_tables(page.read_text())]
    assert len(tables) >= 4, "result tables carry a '<!-- table from results/....md -->' marker"
    for page, table in tables:
        source = (ROOT / page).read_text().splitlines()
        assert len(table) >= 3, f"no table after the marker for {page}"
        starts = [i for i, line in enumerate(source) if line == table[0]]
        assert any(source[i : i + len(table)] == table for i in starts), f"README's table differs from {page}"
