"""Byte-level text data: a built-in corpus, or the user's files, packed into fixed windows.

The built-in corpus needs no download: the source files of the running Python's standard
library. Files are sorted by path and split deterministically (a hash of each path sends about
5% of them to validation), so every run on the same Python sees the same tokens.

``--data PATH`` accepts a text file, a folder of text files (read recursively), or ``.jsonl`` /
``.json.gz`` files with a ``"text"`` field per line (C4's shard format), or a folder of those.
"""

import gzip
import hashlib
import json
import pathlib
import sysconfig
from collections.abc import Iterator

import numpy as np


class DataError(ValueError):
    """A problem with the user's data (missing, empty, malformed), reported as a usage error."""


SEPARATOR = 0  # byte 0 between documents (it does not occur in text)
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}


def _documents_from_file(path: pathlib.Path) -> Iterator[bytes]:
    name = path.name
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise DataError(f"{path}:{line_no}: JSON record has no 'text' field")
                yield record["text"].encode("utf-8")
    else:
        yield path.read_bytes()


def _is_data_file(path: pathlib.Path) -> bool:
    name = path.name
    return path.is_file() and (path.suffix in TEXT_SUFFIXES or name.endswith((".jsonl", ".json.gz", ".jsonl.gz")))


def _in_validation(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def load_corpus(
    data: str | None = None, max_bytes: int = 40_000_000, val_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray, str]:
    """Returns (train tokens, validation tokens, description) as uint8 arrays.

    Args:
      data: None for the built-in corpus, else a file or folder (see the module docstring).
      max_bytes: stop reading after this many bytes in all (files are read in sorted order).
      val_fraction: share of files (or, for a single file, of documents) held out.
    """
    if data is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
        description = f"built-in corpus: Python {sysconfig.get_python_version()} standard library sources"
    else:
        root = pathlib.Path(data).expanduser()
        if not root.exists():
            raise DataError(f"--data {data}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if _is_data_file(p))
        if not files:
            raise DataError(f"--data {data}: no text, .jsonl or .json.gz files found")
        description = f"{data} ({len(files)} file{'s' * (len(files) != 1)})"
    train, val, total = [], [], 0
    for path in files:
        for i, doc in enumerate(_documents_from_file(path)):
            key = f"{path.relative_to(root) if root.is_dir() else path.name}#{i}"
            (val if _in_validation(key, val_fraction) else train).append(doc)
            total += len(doc) + 1
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    if not train or not val:
        raise DataError(f"{description}: too little data to split into train and validation")

    def pack(docs: list[bytes]) -> np.ndarray:
        sep = bytes([SEPARATOR])
        return np.frombuffer(sep.join(d.replace(sep, b"") for d in docs), dtype=np.uint8)

    return pack(train), pack(val), description


class Batches:
    """Random windows of ``seq_len + 1`` tokens, reproducible from (seed, step)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise DataError(f"corpus of {len(tokens)} tokens is shorter than --seq-len {seq_len} + 1")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def __call__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int32)


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows from the start of the validation split."""
    window = seq_len + 1
    n = min(max_batches * batch_size, len(tokens) // window)
    windows = tokens[: n * window].reshape(n, window).astype(np.int32)
    return [windows[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
