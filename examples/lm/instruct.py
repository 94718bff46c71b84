"""Instruction data (Alpaca / LLM-Adapters JSON) for fine-tuning, and multiple-choice evaluation.

Training data is a JSON list of ``{"instruction", "input", "output"}`` records, formatted with
the Alpaca template that LLM-Adapters (and the Fira authors' ``finetune.py``) use. With
``train_on_inputs`` (their default) the loss covers the whole sequence, else only the response.

Evaluation reads LLM-Adapters' task files (boolq, piqa, social_i_qa, hellaswag, winogrande,
ARC-Easy, ARC-Challenge, openbookqa): records with an ``"answer"`` and an instruction that ends
with ``Answer format: a/b/c``. Two modes: ``loglik`` scores each candidate answer by the
log-likelihood of the response "the correct answer is <candidate>" and picks the best; ``generate``
decodes greedily and takes the first candidate the response mentions (the authors' way, with one
beam instead of four).
"""

import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import data as data_lib

_SECTIONS_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_SECTIONS = "### Instruction:\n{instruction}\n\n### Response:\n"
# (with an input, without one). "alpaca" is the authors' and LLM-Adapters'; "plain" drops its
# preamble sentence (a third of a short example's tokens), for small models on small budgets.
TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n" + _SECTIONS_INPUT,
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n" + _SECTIONS,
    ),
    "plain": (_SECTIONS_INPUT, _SECTIONS),
}
ANSWER_PREFIX = "the correct answer is "


def prompt(record: dict, template: str = "alpaca") -> str:
    """The record's instruction (and input, if any) in ``template``, up to the response."""
    with_input, without = TEMPLATES[template]
    return (with_input if record.get("input") else without).format(**{"input": "", **record})


def load_records(path: str | pathlib.Path, need: tuple[str, ...] = ("instruction", "output")) -> list[dict]:
    """A JSON list of records (or JSON lines: one record per line), each checked for the fields ``need``.

    Errors name the file and, for JSON, the line in the file (``path:line: ...``).
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise data_lib.DataError(f"{path}: a folder; --data takes one JSON or JSON-lines file of records")
    if not path.is_file():
        raise data_lib.DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise data_lib.DataError(f"{path}: not UTF-8 text (a JSON file is expected)") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise data_lib.DataError(f"{path}:{e.lineno}: not JSON ({e.msg}, column {e.colno})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    where = f"{path}:{line_no}"
                    raise data_lib.DataError(f"{where}: not a JSON record ({e.msg}, column {e.colno})") from None
    if not records:
        raise data_lib.DataError(f"{path}: no records")
    for i, r in enumerate(records):
        missing = [k for k in need if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise data_lib.DataError(f"{path}: record {i} has no string field {missing[0]!r}")
    return records


def load_task(path: str | pathlib.Path) -> list[dict]:
    """An evaluation file: records with an ``"instruction"``, an ``"answer"``, and their options.

    The options come from ``Answer format: a/b/c`` in the instruction or from a ``"choices"`` list;
    the answer must be one of them (case-insensitive). Checked here, before any training.
    """
    records = load_records(path, ("instruction", "answer"))
    for i, r in enumerate(records):
        try:
            options = candidates(r)
        except data_lib.DataError as e:
            raise data_lib.DataError(f"{path}: record {i}: {e}") from None
        if r["answer"].strip().lower() not in [c.strip().lower() for c in options]:
            raise data_lib.DataError(f"{path}: record {i}: answer {r['answer']!r} is not one of {'/'.join(options)}")
    return records


def encode(record: dict, tok: Any, cutoff: int, train_on_inputs: bool,
           template: str = "alpaca") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Token ids of prompt + response (+ end of text), cut at ``cutoff``, and the loss mask."""
    head = tok.encode([prompt(record, template)])[0]
    tail = tok.encode([record["output"]])[0]
    if tok.separator is not None:
        tail = np.append(tail, tok.separator)
    ids = np.concatenate([head, tail])[:cutoff]
    mask = np.ones(len(ids), np.float32)
    if not train_on_inputs:
        mask[: min(len(head), len(ids))] = 0.0
    return ids.astype(np.int32), mask


def batch(examples: list[tuple[np.ndarray, np.ndarray]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (B, T) ids and the next-token loss weights (B, T - 1)."""
    length = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), length), pad, np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)], weights[i, : len(m)] = x, m
    return ids, weights[:, 1:]


def masked_loss(model: Any, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the tokens whose weight is 1."""
    logp = jax.nn.log_softmax(model(ids[:, :-1]), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def candidates(record: dict) -> list[str]:
    """The answer options: from "Answer format: a/b/c" in the instruction, or a "choices" list."""
    if isinstance(record.get("choices"), list):
        return [str(c) for c in record["choices"]]
    found = re.search(r"Answer format:\s*([^\n]+)", record["instruction"])
    if not found:
        raise data_lib.DataError("no 'Answer format: a/b/c' in the instruction and no 'choices' list")
    return [c.strip().rstrip(".") for c in found.group(1).split("/") if c.strip()]


def _response_logp(model: Any, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Per sequence: the summed log-probability of the tokens whose next-token weight is 1."""
    logp = jax.nn.log_softmax(model(ids[:, :-1]).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(picked * weights, axis=-1)


_response_logp_jit = nnx.jit(_response_logp)


def loglik_scores(model: Any, tok: Any, records: list[dict], template: str = "alpaca",
                  batch_size: int = 32) -> list[list[float]]:  # fmt: skip
    """For each record, the log-likelihood of "the correct answer is <c>" after its prompt, per candidate.

    Sequences are right-padded to a multiple of 64 tokens and scored ``batch_size`` at a time in
    one jitted forward pass (few shapes, so few compilations).
    """
    seqs, owners = [], []
    for n, record in enumerate(records):
        head = tok.encode([prompt(record, template)])[0]
        for c in candidates(record):
            tail = tok.encode([ANSWER_PREFIX + c])[0]
            ids = np.concatenate([head, tail]).astype(np.int32)
            weights = np.zeros(len(ids) - 1, np.float32)
            weights[len(head) - 1 :] = 1.0  # the response's tokens, each predicted from what precedes it
            seqs.append((ids, weights))
            owners.append(n)
    score = _response_logp_jit if isinstance(model, nnx.Module) else _response_logp
    length = -(-max(len(ids) for ids, _ in seqs) // 64) * 64
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        ids = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length - 1), np.float32)
        for j, (x, w) in enumerate(chunk):
            ids[j, : len(x)], weights[j, : len(w)] = x, w
        out.extend(np.asarray(score(model, jnp.asarray(ids), jnp.asarray(weights)))[: len(chunk)].tolist())
    scores: list[list[float]] = [[] for _ in records]
    for n, s in zip(owners, out, strict=True):
        scores[n].append(s)
    return scores


def loglik_choice(model: Any, tok: Any, record: dict, template: str = "alpaca") -> str:
    """The candidate whose response "the correct answer is <c>" has the highest log-likelihood."""
    return candidates(record)[int(np.argmax(loglik_scores(model, tok, [record], template)[0]))]


def generate_choice(model: Any, tok: Any, record: dict, template: str = "alpaca",
                    max_new_tokens: int = 32) -> str | None:  # fmt: skip
    """Greedy decoding, then the first candidate the response mentions (None if none)."""
    ids = list(tok.encode([prompt(record, template)])[0])
    start = len(ids)
    for _ in range(max_new_tokens):
        nxt = int(jnp.argmax(model(jnp.asarray([ids], jnp.int32))[0, -1]))
        if nxt == tok.separator:
            break
        ids.append(nxt)
    response = tok.decode(ids[start:])
    found = re.findall("|".join(re.escape(c) for c in sorted(candidates(record), key=len, reverse=True)), response)
    return found[0] if found else None


def accuracy(model: Any, tok: Any, records: list[dict], mode: str = "loglik", template: str = "alpaca") -> float:
    """Exact-match accuracy of the chosen answers against the records' "answer"."""
    if mode == "loglik":
        choices = [
            candidates(r)[int(np.argmax(s))]
            for r, s in zip(records, loglik_scores(model, tok, records, template), strict=True)
        ]
    else:
        choices = [generate_choice(model, tok, r, template) for r in records]
    right = sum(
        c is not None and c.strip().lower() == r["answer"].strip().lower()
        for c, r in zip(choices, records, strict=True)
    )
    return right / len(records)
