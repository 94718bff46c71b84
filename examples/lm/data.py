"""Prepared data at run time: memory-map a folder, then draw fixed windows.

The layout follows nanoGPT's ``prepare.py``: a folder with ``train.bin`` and ``val.bin`` (token
ids, uint16 when the vocabulary fits, else uint32, documents separated by the tokenizer's
end-of-text id) and ``meta.json`` (tokenizer, vocabulary, token and byte counts, sources, the
split rule). :mod:`lm.prepare` writes one (``examples/prepare_data.py``); ``train_lm.py --data
DIR`` memory-maps it here (constant memory, instant start, no size cap).
"""

import dataclasses
import json
import pathlib

import numpy as np


class DataError(ValueError):
    """A problem with the user's data (missing, empty, binary, malformed), reported as a usage error."""


@dataclasses.dataclass
class Corpus:
    train: np.ndarray  # token ids (a read-only memmap for prepared data)
    val: np.ndarray
    meta: dict

    @property
    def description(self) -> str:
        return self.meta["description"]

    @property
    def bytes_per_token(self) -> float:
        """Of the validation split: converts nats/token into bits per byte."""
        val = self.meta["splits"]["val"]
        return val["bytes"] / max(val["tokens"], 1)


# ---------------------------------------------------------------------------------------------
# Opening prepared data


def open_prepared(folder: str | pathlib.Path) -> Corpus:
    """Memory-maps a folder written by :func:`prepare`."""
    folder = pathlib.Path(folder).expanduser()
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        expected = {s: int(meta["splits"][s]["tokens"]) for s in ("train", "val")}
    except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
        raise DataError(f"{folder}: not a prepared data folder (meta.json, train.bin, val.bin): {e}") from None
    arrays = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else None
        if size != expected[split] * dtype.itemsize:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise DataError(
                f"{path} {found}; meta.json says {expected[split]:,} {dtype.name} tokens "
                f"({expected[split] * dtype.itemsize:,} bytes): prepare the folder again"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return Corpus(arrays[0], arrays[1], meta)


# ---------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Random windows of ``seq_len + 1`` tokens, reproducible from (seed, step).

    ``rows`` selects this process's rows of the global batch: only those windows are read.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise DataError(f"corpus of {len(tokens)} tokens is shorter than --seq-len {seq_len} + 1")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def __call__(self, step: int, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)[rows]
        return np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int32)


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows from the start of the validation split."""
    window = seq_len + 1
    n = min(max_batches * batch_size, len(tokens) // window)
    windows = np.asarray(tokens[: n * window]).reshape(n, window).astype(np.int32)
    return [windows[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
