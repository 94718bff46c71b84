"""The house rules, checked: no function in fira_jax/ or examples/ over 60 code lines; the docs
are user pages (no goal bookkeeping, session or machine-load prose, and a date only in a page's
"Source:" footer lines, outside the changelog); results/ holds results, not logs."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT = 60


def code_lines(lines: list[str], node: ast.AST) -> int:
    """The function's lines that are code: not blank, not a comment, not its docstring."""
    body = node.body
    doc = set()
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        doc = set(range(first.lineno, first.end_lineno + 1))
    kept = [
        n
        for n in range(node.lineno, node.end_lineno + 1)
        if n not in doc and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#")
    ]
    return len(kept)


def functions() -> list[tuple[str, int]]:
    found = []
    for folder in ("fira_jax", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            lines = text.splitlines()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                    found.append((where, code_lines(lines, node)))
    return found


def test_no_function_is_over_60_code_lines():
    long = [f"{where} ({n} lines)" for where, n in functions() if n > LIMIT]
    assert not long, long


def test_the_line_counter_counts_code_only():
    source = 'def f():\n    """Doc.\n\n    More."""\n    # a comment\n\n    x = 1\n    return x\n'
    node = ast.parse(source).body[0]
    assert code_lines(source.splitlines(), node) == 3  # def, x = 1, return x


PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "changelog.md")]
NOTEBOOK = re.compile(
    r"\bgoals?\b|\btoday\b|this session|while a training run|loaded by|shared it|machine was busy|"
    r"\bbefore this change\b",
    re.I,
)
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_read_as_user_pages(page):
    bad, footer = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        # A paragraph that starts with "Source:" is a footer: the provenance (date, machine, its load) goes there.
        footer = line.startswith("Source:") or (footer and bool(line.strip()))
        if footer:
            continue
        if NOTEBOOK.search(line):
            bad.append(f"{number}: {NOTEBOOK.search(line).group(0)!r} in {line.strip()[:100]}")
        if DATE.search(line) and "github.com" not in line:
            bad.append(f"{number}: a date outside a Source: line: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_results_hold_results_not_logs():
    kinds = {p.suffix for p in (ROOT / "results").rglob("*") if p.is_file()}
    assert kinds <= {".json", ".md", ".png"}, kinds
