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

from lm import data as data_lib

TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ANSWER_PREFIX = "the correct answer is "


def prompt(record: dict) -> str:
    return (TEMPLATE_INPUT if record.get("input") else TEMPLATE).format(**{"input": "", **record})


def load_records(path: str | pathlib.Path, need: tuple[str, ...] = ("instruction", "output")) -> list[dict]:
    """A JSON list of records (or JSON lines), each checked for the fields ``need``."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise data_lib.DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as e:
        raise data_lib.DataError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not records:
        raise data_lib.DataError(f"{path}: no records")
    for i, r in enumerate(records):
        missing = [k for k in need if not isinstance(r, dict) or not isinstance(r.get(k), str)]
        if missing:
            raise data_lib.DataError(f"{path}: record {i} has no string field {missing[0]!r}")
    return records


def encode(record: dict, tok: Any, cutoff: int, train_on_inputs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of prompt + response (+ end of text), cut at ``cutoff``, and the loss mask."""
    head = tok.encode([prompt(record)])[0]
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
        raise data_lib.DataError(f"record has no 'Answer format:' nor 'choices': {record['instruction'][:80]!r}")
    return [c.strip().rstrip(".") for c in found.group(1).split("/") if c.strip()]


def loglik_choice(model: Any, tok: Any, record: dict) -> str:
    """The candidate whose response "the correct answer is <c>" has the highest log-likelihood."""
    head = tok.encode([prompt(record)])[0]
    scores = []
    for c in candidates(record):
        tail = tok.encode([ANSWER_PREFIX + c])[0]
        ids = jnp.asarray(np.concatenate([head, tail])[None, :], jnp.int32)
        logp = jax.nn.log_softmax(model(ids[:, :-1]), axis=-1)[0]
        picked = jnp.take_along_axis(logp[len(head) - 1 :], ids[0, len(head) :, None], axis=-1)
        scores.append(float(jnp.sum(picked)))
    return candidates(record)[int(np.argmax(scores))]


def generate_choice(model: Any, tok: Any, record: dict, max_new_tokens: int = 32) -> str | None:
    """Greedy decoding, then the first candidate the response mentions (None if none)."""
    ids = list(tok.encode([prompt(record)])[0])
    start = len(ids)
    for _ in range(max_new_tokens):
        nxt = int(jnp.argmax(model(jnp.asarray([ids], jnp.int32))[0, -1]))
        if nxt == tok.separator:
            break
        ids.append(nxt)
    response = tok.decode(ids[start:])
    found = re.findall("|".join(re.escape(c) for c in sorted(candidates(record), key=len, reverse=True)), response)
    return found[0] if found else None


def accuracy(model: Any, tok: Any, records: list[dict], mode: str = "loglik") -> float:
    """Exact-match accuracy of the chosen answers against the records' "answer"."""
    right = 0
    for r in records:
        choice = loglik_choice(model, tok, r) if mode == "loglik" else generate_choice(model, tok, r)
        right += int(choice is not None and choice.strip().lower() == r["answer"].strip().lower())
    return right / len(records)
