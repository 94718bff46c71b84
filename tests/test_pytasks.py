"""The fine-tuning demonstration's task: built only from held-out files, well formed, split by file."""

import ast
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from lm import instruct, pytasks
from lm import prepare as prepare_lib


def test_held_out_files_are_the_pretraining_validation_split():
    root, files, _ = prepare_lib.source_files(None)
    held = pytasks.held_out_files()
    assert 0 < len(held) < 0.1 * len(files)
    items, _ = prepare_lib.split_items(root, [p for _, p in held], 0.05, builtin=True)
    assert {split for split, _, _ in items} == {"val"}  # pre-training sends every one of them to validation
    others = [p for p in files if p not in {p for _, p in held}][:50]
    items, _ = prepare_lib.split_items(root, others, 0.05, builtin=True)
    assert {split for split, _, _ in items} == {"train"}


def _called_and_used(line: str) -> tuple[set, set]:
    """An independent reading of the line: names right before "(" at call sites, and every name."""
    tree = ast.parse(line)
    called = {
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
    }
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return called, used


@pytest.fixture(scope="module")
def task():
    return pytasks.called()


def test_called_records(task):
    assert len(task["train"]) > 2000 and len(task["test"]) > 400
    for record in task["train"][:500] + task["test"][:500]:
        options = instruct.candidates(record)
        assert len(options) == 4 and len(set(options)) == 4 and record["answer"] in options
        line = record["instruction"].splitlines()[1]
        called, used = _called_and_used(line)
        assert called == {record["answer"]}  # exactly one name is called: the answer
        assert set(options) <= used  # every candidate appears in the line
        assert record["output"] == instruct.ANSWER_PREFIX + record["answer"]
    assert pytasks.called() == task  # deterministic


def test_training_and_test_lines_come_from_different_files(task):
    held = dict(pytasks.held_out_files())
    by_split = {"train": set(), "test": set()}
    for rel in held:
        by_split[pytasks._task_split(rel, 0.2)].add(rel)
    assert by_split["train"] and by_split["test"] and not by_split["train"] & by_split["test"]
    lines = {s: {r["instruction"].splitlines()[1] for r in task[s]} for s in task}
    test_files_text = "\n".join(held[rel].read_text() for rel in by_split["test"])
    assert all(line in test_files_text for line in list(lines["test"])[:200])
