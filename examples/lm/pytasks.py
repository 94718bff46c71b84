"""Fine-tuning tasks built from the Python standard library's held-out sources (no download).

The pre-training corpus (``lm.data``, no ``--data``) is the standard library's ``.py`` files, of
which about 5% are held out by a hash of their path (the validation split). The tasks here are
built only from those held-out files, so a model pre-trained on the corpus has never seen them;
the held-out files are themselves split by path into the task's training and test files.
"""

import ast
import hashlib
import pathlib
import random
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
