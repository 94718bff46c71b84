"""Preparing data, once and offline: read a corpus, split it, tokenize it into ``.bin`` files.

Sources: a text file, a folder of text files (read recursively), ``.jsonl`` / ``.json.gz`` files
with a ``"text"`` field per line (C4's shard format: ``c4-train.*`` and ``c4-validation.*`` are
recognised as the two splits), or a folder of those. With no source, the built-in corpus: the
running Python's standard library sources (no download). :func:`prepare` writes the folder
:mod:`lm.data` memory-maps; :func:`load` opens a prepared folder, or prepares a raw source once
into a cache keyed by its files' paths, sizes and mtimes and the tokenizer.

The split: C4 shards by name; otherwise, when there are several documents, a hash of each
document's key (path and index) sends ``val_fraction`` of them to validation; a source that is a
single document (one plain text file) is split by position: its last ``val_fraction`` is held out.
"""

import codecs
import gzip
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sysconfig
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from lm import files as files_lib
from lm import tokenizer as tokenizer_lib
from lm.data import Corpus, DataError, open_prepared

FORMAT_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SEGMENT_BYTES = 1 << 20  # a single long document is tokenized in pieces of about this size


# ---------------------------------------------------------------------------------------------
# Reading sources


def _is_data_file(path: pathlib.Path) -> bool:
    return path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name.endswith(JSON_SUFFIXES))


def _c4_split(path: pathlib.Path) -> str | None:
    if path.name.startswith("c4-train."):
        return "train"
    if path.name.startswith("c4-validation."):
        return "val"
    return None


def source_files(data: str | None) -> tuple[pathlib.Path, list[pathlib.Path], str]:
    """(root, files in sorted order, description) of a source; raises DataError naming a bad path."""
    if data is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
        return root, files, f"built-in corpus: Python {sysconfig.get_python_version()} standard library sources"
    root = pathlib.Path(data).expanduser()
    if not root.exists():
        raise DataError(f"--data {data}: no such file or folder")
    if root.is_file():  # the file the user named: empty is an error
        if root.stat().st_size == 0:
            raise DataError(f"{root}: empty file")
        return root, [root], f"{data} (1 file)"
    files, skipped = [], {"empty": 0, "not text": 0}  # a folder's empty and binary files are skipped
    for path in sorted(p for p in root.rglob("*") if _is_data_file(p)):
        kind = "empty" if path.stat().st_size == 0 else None if _looks_like_text(path) else "not text"
        if kind:
            skipped[kind] += 1
        else:
            files.append(path)
    if not files:
        raise DataError(f"--data {data}: no text, .jsonl or .json.gz files found" + _skipped(skipped))
    return root, files, f"{data} ({len(files)} file{'s' * (len(files) != 1)}{_skipped(skipped)})"


def _skipped(skipped: dict[str, int]) -> str:
    """``"; skipped 1 empty, 2 not text"`` (nothing when none was)."""
    said = [f"{n} {kind}" for kind, n in skipped.items() if n]
    return f"; skipped {', '.join(said)}" if said else ""


def _looks_like_text(path: pathlib.Path) -> bool:
    """A JSON source, or a file whose first 64 KiB hold no NUL byte and decode as UTF-8."""
    if path.name.endswith(JSON_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(65536)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut-off last character is fine
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def _read_text(path: pathlib.Path, strict: bool = True) -> str:
    """The file as text. Not ``strict`` (the built-in corpus, whose sources are not all UTF-8):
    undecodable bytes are kept as surrogate escapes, which the bytes tokenizer turns back into
    the same bytes."""
    raw = path.read_bytes()
    if not strict:
        return raw.decode("utf-8", "surrogateescape")
    if b"\0" in raw[:65536]:
        raise DataError(f"{path}: binary file (NUL bytes), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def documents(path: pathlib.Path, strict: bool = True) -> Iterator[str]:
    """The documents of one file: one per JSON record's "text", or the whole file."""
    if not path.name.endswith(JSON_SUFFIXES):
        yield _read_text(path, strict)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{line_no}: JSON record has no 'text' field")
                yield record["text"]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read it as {'gzipped ' * path.name.endswith('.gz')}JSON lines: {e}") from None


def _in_validation(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _segments(text: str, size: int) -> list[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters (together: ``text``)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def split_items(root: pathlib.Path, files: list[pathlib.Path], val_fraction: float,
                builtin: bool = False) -> tuple[Iterator, str]:  # fmt: skip
    """Yields (split, text, ends_document) in order, and the split rule applied."""
    c4 = [_c4_split(p) for p in files]
    if all(c4) and {"train", "val"} <= set(c4):
        rule = "C4 shards by name: c4-train.* -> train, c4-validation.* -> val"

        def by_name() -> Iterator:
            for path, split in zip(files, c4, strict=True):
                for doc in documents(path):
                    yield split, doc, True

        return by_name(), rule
    if len(files) == 1 and not files[0].name.endswith(JSON_SUFFIXES):
        rule = f"one document: split by position, the last {val_fraction:.0%} held out"

        def by_position() -> Iterator:
            text = _read_text(files[0])
            pieces = _segments(text, min(SEGMENT_BYTES, max(1, int(len(text) * val_fraction / 4))))
            held, total = 0, len(text)
            n_val = 0
            for piece in reversed(pieces):  # how many trailing pieces make up val_fraction
                if held >= val_fraction * total:
                    break
                held, n_val = held + len(piece), n_val + 1
            n_val = min(n_val, len(pieces) - 1)
            if n_val == 0:
                raise DataError(f"{files[0]}: too short to hold out a validation tail ({len(text)} characters)")
            for i, piece in enumerate(pieces):
                yield (
                    ("val" if i >= len(pieces) - n_val else "train"),
                    piece,
                    i in (len(pieces) - n_val - 1, len(pieces) - 1),
                )

        return by_position(), rule
    rule = f"documents by a hash of (file, index): about {val_fraction:.0%} held out"

    def by_hash() -> Iterator:
        for path in files:
            rel = path.relative_to(root) if root.is_dir() else path.name
            for i, doc in enumerate(documents(path, strict=not builtin)):
                yield ("val" if _in_validation(f"{rel}#{i}", val_fraction) else "train"), doc, True

    return by_hash(), rule


# ---------------------------------------------------------------------------------------------
# Tokenizing into .bin files

_WORKER_TOKENIZER = None


def _init_worker(spec: str, pool: bool = False) -> None:
    """Loads the tokenizer; a pool's worker leaves Ctrl-C to its parent, which stops the pool."""
    global _WORKER_TOKENIZER
    if pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_TOKENIZER = tokenizer_lib.load(spec)


def _encode_chunk(chunk: list[tuple[str, str, bool]]) -> list[tuple[str, np.ndarray, bool, int]]:
    ids = _WORKER_TOKENIZER.encode([text for _, text, _ in chunk])
    return [
        (split, i, end, len(text.encode("utf-8", "surrogateescape")))
        for (split, text, end), i in zip(chunk, ids, strict=True)
    ]


def _chunks(items: Iterator, max_chars: int = 1 << 20) -> Iterator[list]:
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[1])
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def prepare(data: str | None, tokenizer: str, out: str | pathlib.Path, *, val_fraction: float = 0.05,
            workers: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Tokenizes ``data`` into ``out/{train,val}.bin`` and ``out/meta.json``; returns the meta."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    tok = tokenizer_lib.load(tokenizer)
    root, files, description = source_files(data)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    with files_lib.staged_folder(out, last=("meta.json",)) as staging:  # meta.json last: marks it complete
        items, rule = split_items(root, files, val_fraction, builtin=data is None)
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        counts = _write_splits(
            staging, items, tok, dtype, workers, sum(p.stat().st_size for p in files) if progress else 0
        )
        for split in ("train", "val"):
            if counts[split]["tokens"] == 0:
                raise DataError(f"{description}: the {split} split is empty ({rule}); give more data")
        meta = {
            "format_version": FORMAT_VERSION,
            "description": description,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "model_vocab_size": tokenizer_lib.model_vocab_size(tok.vocab_size),
            "separator": tok.separator,
            "dtype": np.dtype(dtype).name,
            "splits": counts,
            "sources": [str(p) for p in files] if len(files) <= 100 else [str(root), f"... {len(files)} files"],
            "split_rule": rule,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _write_splits(staging: pathlib.Path, items: list, tok: Any, dtype: Any, workers: int, progress_bytes: int) -> dict:
    """Tokenizes ``items`` with ``workers`` processes into ``staging/{train,val}.bin``, the separator
    between documents; returns each split's token, byte and document counts. A progress bar over
    ``progress_bytes`` bytes when that is not 0."""
    counts = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in ("train", "val")}
    starts = {"train": False, "val": False}  # whether a document ended last in each split
    bar = None
    if progress_bytes:
        from tqdm import tqdm

        bar = tqdm(total=progress_bytes, unit="B", unit_scale=True, desc=f"tokenizing ({workers} processes)")
    sep = None if tok.separator is None else np.asarray([tok.separator], dtype)
    with open(staging / "train.bin", "wb") as f_train, open(staging / "val.bin", "wb") as f_val:
        handles = {"train": f_train, "val": f_val}
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                workers, _init_worker, (tok.name if tok.name != "bytes" else "bytes", True)
            )
            results = pool.imap(_encode_chunk, _chunks(items))
        else:
            _init_worker(tok.name)
            pool, results = None, map(_encode_chunk, _chunks(items))
        try:
            for chunk in results:
                for split, ids, ends, n_bytes in chunk:
                    if sep is not None and starts[split]:  # the separator goes between documents
                        handles[split].write(sep.tobytes())
                        counts[split]["tokens"] += 1
                    handles[split].write(ids.astype(dtype).tobytes())
                    counts[split]["tokens"] += len(ids)
                    counts[split]["bytes"] += n_bytes
                    starts[split] = ends
                    counts[split]["documents"] += int(ends)
                    if bar is not None:
                        bar.update(n_bytes)
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
    return counts


# ---------------------------------------------------------------------------------------------
# Prepared once, into a cache, for a raw source given to train_lm.py


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FIRA_JAX_CACHE", "~/.cache/fira_jax")).expanduser() / "data"


def cache_key(data: str | None, tokenizer: str, val_fraction: float) -> str:
    """Identifies a raw source's tokenization: its files' paths, sizes and mtimes, and the tokenizer."""
    root, files, _ = source_files(data)
    h = hashlib.sha256(
        f"{FORMAT_VERSION}|{root.resolve()}|{val_fraction}|{tokenizer_lib.fingerprint(tokenizer)}".encode()
    )
    for p in files:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load(data: str | None, tokenizer: str | None = None, *, val_fraction: float = 0.05,
         log: object = print) -> Corpus:  # fmt: skip
    """A prepared folder (memory-mapped), or a raw source prepared into the cache first."""
    if data is not None and (pathlib.Path(data).expanduser() / "meta.json").exists():
        corpus = open_prepared(data)
        if tokenizer is not None and tokenizer_lib.resolve(tokenizer) != corpus.meta["tokenizer"]:
            raise DataError(
                f"--data {data} was prepared with tokenizer {corpus.meta['tokenizer']}, not --tokenizer {tokenizer}"
            )
        return corpus
    tokenizer = tokenizer or "bytes"
    folder = cache_root() / cache_key(data, tokenizer, val_fraction)
    if not (folder / "meta.json").exists():
        log(f"tokenizing {data or 'the built-in corpus'} with {tokenizer} into {folder} (once)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            prepare(data, tokenizer, tmp, val_fraction=val_fraction, workers=1, progress=False)
            if folder.exists():  # another process prepared it meanwhile
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return open_prepared(folder)
