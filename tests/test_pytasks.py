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


# An independent transcription of the operators the task asks for: the symbol of each AST class.
_SYMBOLS = {"Eq": "==", "NotEq": "!=", "Lt": "<", "Gt": ">", "LtE": "<=", "GtE": ">=", "In": "in",
            "Is": "is", "Add": "+", "Sub": "-", "Mult": "*", "Div": "/", "Mod": "%", "FloorDiv": "//",
            "And": "and", "Or": "or"}  # fmt: skip


def _symbols(line: str) -> list[str]:
    """The line's binary, comparison and boolean operators, read from its tree (a header gets ``pass``)."""
    tree = ast.parse(line + " pass" if line.endswith(":") else line)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            out.append(_SYMBOLS.get(type(node.op).__name__, "?"))
        elif isinstance(node, ast.Compare):
            out += [_SYMBOLS.get(type(op).__name__, "?") for op in node.ops]
        elif isinstance(node, ast.BoolOp):
            out += [_SYMBOLS.get(type(node.op).__name__, "?")] * (len(node.values) - 1)
    return out


@pytest.fixture(scope="module")
def operator_task():
    return pytasks.operator()


def test_operator_records(operator_task):
    """The blank holds one of the line's operators; the line with the answer put back is a line of a
    held-out file of the record's split; the choices are four distinct operators, the answer among them."""
    task = operator_task
    assert len(task["train"]) > 1000 and len(task["test"]) > 400  # the demonstration takes 960 and 364
    held = dict(pytasks.held_out_files())
    text = {s: "\n".join(held[r].read_text() for r in held if pytasks._task_split(r, 0.3) == s) for s in task}
    answers = set()
    for split in task:
        for record in task[split][:300]:
            head, shown, choices = record["instruction"].split("\n")
            assert head == "Which operator fills the blank?" and shown.count("?") == 1
            options = instruct.candidates(record)
            assert choices == "Choices: " + ", ".join(options)
            assert len(options) == 4 == len(set(options)) and set(options) <= set(_SYMBOLS.values())
            assert record["answer"] in options and record["output"] == instruct.ANSWER_PREFIX + record["answer"]
            line = shown.replace("?", record["answer"])
            assert line in text[split]  # from a held-out file of this split
            symbols = _symbols(line)
            assert record["answer"] in symbols and "?" not in symbols  # a binary operator of the list, and only those
            answers.add(record["answer"])
    assert len(answers) >= 12  # not one operator over and over
    assert pytasks.operator() == task  # deterministic


def test_operator_task_scores_with_the_demonstrations_scoring(operator_task):
    """The records load as an evaluation file (the answer among the choices) and the scoring's
    candidates are the four operators, "/" and "//" included (the choices list, not "a/b/c")."""
    record = next(r for r in operator_task["test"] if r["answer"] in ("/", "//"))
    assert instruct.candidates(record) == record["choices"]
    assert record["answer"] in instruct.candidates(record)
