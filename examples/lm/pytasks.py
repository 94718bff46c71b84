"""Fine-tuning tasks built from the Python standard library's held-out sources (no download).

The pre-training corpus (``lm.data``, no ``--data``) is the standard library's ``.py`` files, of
which about 5% are held out by a hash of their path (the validation split). The tasks here are
built only from those held-out files, so a model pre-trained on the corpus has never seen them;
the held-out files are themselves split by path into the task's training and test files.

Two tasks of different kinds, each record an Alpaca-style ``{"instruction", "input", "output",
"answer", "choices"}`` scored by the log-likelihood of "the correct answer is <choice>":

- ``called``: which of four names in a line is the one called (reading the syntax of a call);
- ``operator``: which of four operators fills the blank in a line (a cloze: the meaning of the
  expression, the operands' kinds and Python's idioms decide it).
"""

import ast
import collections
import hashlib
import io
import pathlib
import random
import tokenize
import warnings

from lm import prepare as prepare_lib


def held_out_files(val_fraction: float = 0.05) -> list[tuple[str, pathlib.Path]]:
    """(relative path, path) of the built-in corpus's validation files, in sorted order."""
    root, files, _ = prepare_lib.source_files(None)
    rel = [(str(p.relative_to(root)), p) for p in files]
    return [(r, p) for r, p in rel if prepare_lib._in_validation(f"{r}#0", val_fraction)]


def _task_split(rel: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"task:{rel}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def _parse(source: str) -> ast.Module:
    """``ast.parse``, quiet about the standard library's own invalid escapes (its sources are the data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        return ast.parse(source)


def _lines(path: pathlib.Path) -> list[str]:
    try:
        source = path.read_text(encoding="utf-8")
        _parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    return source.splitlines()


def called(test_fraction: float = 0.2, choices: int = 4, seed: int = 0, max_chars: int = 56) -> dict[str, list[dict]]:
    """Which name does this line call? Held-out one-line statements that call exactly one name; the
    other candidates are ``choices - 1`` names the line uses but does not call (chance: 1 / choices).

    Every candidate is in the line: the model has to tell the called name from attributes,
    arguments and assignment targets, a question of syntax that pre-training on code prepares it
    for but never asks in this form.
    """
    rng = random.Random(seed)
    out = {"train": [], "test": []}
    for rel, path in held_out_files():
        for line in _lines(path):
            text = line.strip()
            if not 15 <= len(text) <= max_chars:
                continue
            try:
                tree = _parse(text)
            except SyntaxError:
                continue
            calls, used = set(), set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    calls.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)
                if isinstance(node, ast.Name):
                    used.add(node.id)
                elif isinstance(node, ast.Attribute):
                    used.add(node.attr)
            others = sorted(used - calls)
            if len(calls) != 1 or None in calls or len(others) < choices - 1:
                continue
            answer = calls.pop()
            options = [*rng.sample(others, choices - 1), answer]
            rng.shuffle(options)
            out[_task_split(rel, test_fraction)].append(
                {
                    "instruction": f"Which name is called?\n{text}\nAnswer format: {'/'.join(options)}",
                    "input": "",
                    "output": f"the correct answer is {answer}",
                    "answer": answer,
                }
            )
    return out


# Every binary, comparison and boolean operator of Python's syntax that the ``operator`` task asks
# for (``not``, ``is not`` and ``not in`` excepted: lines holding ``not`` are left out).
OPERATORS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.Gt: ">", ast.LtE: "<=", ast.GtE: ">=",
             ast.In: "in", ast.Is: "is", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
             ast.Mod: "%", ast.FloorDiv: "//", ast.And: "and", ast.Or: "or"}  # fmt: skip
BLANK = "?"  # not Python syntax, so it marks the blank unambiguously (lines holding one are left out)


def _operators(tree: ast.AST) -> collections.Counter:
    """How many times each operator occurs in ``tree`` (``None`` for any outside OPERATORS)."""
    found: collections.Counter = collections.Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            found[OPERATORS.get(type(node.op))] += 1
        elif isinstance(node, ast.Compare):
            found.update(OPERATORS.get(type(op)) for op in node.ops)
        elif isinstance(node, ast.BoolOp):
            found[OPERATORS.get(type(node.op))] += len(node.values) - 1
    return found


def operator(test_fraction: float = 0.3, choices: int = 4, seed: int = 0, max_chars: int = 72) -> dict[str, list[dict]]:
    """Which operator fills the blank? A held-out line of code with one of its operators replaced by
    ``?``; the other candidates are ``choices - 1`` operators drawn from the rest of OPERATORS
    (chance: 1 / choices).

    A line qualifies if it parses alone (a compound statement's header, ending in ``:``, with
    ``pass`` after it), holds no ``not`` and no ``?``, and every operator token in it is a binary,
    comparison or boolean operator of OPERATORS (so no unary minus, ``*args`` or comprehension's
    ``in``, checked by counting the tokens against the parsed tree). The blanked occurrence is
    drawn at random among the line's operator tokens. The held-out files are split with
    ``test_fraction`` 0.3 rather than ``called``'s 0.2: fewer lines qualify, and the test side
    needs the demonstration's 364.
    """
    rng = random.Random(seed)
    out = {"train": [], "test": []}
    for rel, path in held_out_files():
        for line in _lines(path):
            text = line.strip()
            if not 15 <= len(text) <= max_chars or BLANK in text:
                continue
            try:
                tree = _parse(text + " pass" if text.endswith(":") else text)
                tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
            except (SyntaxError, tokenize.TokenError):
                continue
            ops = [
                t for t in tokens if t.type in (tokenize.OP, tokenize.NAME) and t.string in {*OPERATORS.values(), "not"}
            ]
            if not ops or collections.Counter(t.string for t in ops) != _operators(tree):
                continue  # a "not", an operator outside OPERATORS, or a token that is no binary operator
            blank = rng.choice(ops)
            answer = blank.string
            options = [*rng.sample(sorted(set(OPERATORS.values()) - {answer}), choices - 1), answer]
            rng.shuffle(options)
            shown = text[: blank.start[1]] + BLANK + text[blank.end[1] :]
            out[_task_split(rel, test_fraction)].append(
                {
                    "instruction": f"Which operator fills the blank?\n{shown}\nChoices: {', '.join(options)}",
                    "input": "",
                    "output": f"the correct answer is {answer}",
                    "answer": answer,
                    "choices": options,
                }
            )
    return out


TASKS = {"called": called, "operator": operator}
