"""Tokenizers: bytes (the default, nothing to download), Hugging Face ``tokenizer.json``, SentencePiece.

``load(spec)`` takes ``"bytes"``, a ``tokenizer.json`` file or a folder holding one (via
``tokenizers``), or a SentencePiece ``.model`` file (via ``sentencepiece``; T5's ``spiece.model``
is what the Fira and GaLore papers used). Nothing is downloaded: a path the user already has is
read. Every tokenizer has a ``separator`` (its end-of-text id, or None) put between documents.
"""

import hashlib
import pathlib
from collections.abc import Iterable
from typing import Protocol

import numpy as np


class TokenizerError(ValueError):
    """A --tokenizer that cannot be loaded."""


class Tokenizer(Protocol):
    name: str  # what meta.json records: "bytes" or the resolved path
    vocab_size: int
    separator: int | None

    def encode(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...


def model_vocab_size(vocab_size: int) -> int:
    """The model's vocabulary: the tokenizer's, rounded up to a multiple of 128 (fast matmuls)."""
    return -(-vocab_size // 128) * 128


def _valid_utf8(text: str) -> str:
    """Surrogate escapes (undecodable bytes kept by the built-in corpus) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Bytes:
    """UTF-8 bytes as tokens (vocabulary 256); byte 0 separates documents (it does not occur in text)."""

    name = "bytes"
    vocab_size = 256
    separator = 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        raw = [t.encode("utf-8", "surrogateescape").replace(b"\0", b"") for t in texts]
        return [np.frombuffer(r, np.uint8).astype(np.int64) for r in raw]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")


class HuggingFace:
    """A ``tokenizers`` tokenizer from a ``tokenizer.json`` (no special tokens added)."""

    EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")

    def __init__(self, path: pathlib.Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.name = str(path)
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(n) for n in self.EOS_NAMES]
        self.separator = next((i for i in ids if i is not None), None)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch([_valid_utf8(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class SentencePiece:
    """A SentencePiece model (``.model``), e.g. T5's ``spiece.model`` (vocabulary 32,000, eos 1)."""

    def __init__(self, path: pathlib.Path) -> None:
        import sentencepiece as spm

        self.name = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.vocab_size()
        eos = self._sp.eos_id()
        self.separator = eos if eos >= 0 else None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int64) for ids in self._sp.encode([_valid_utf8(t) for t in texts])]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def resolve(spec: str) -> str:
    """``spec`` as meta.json and the cache record it: "bytes" or an absolute file path."""
    if spec == "bytes":
        return spec
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"--tokenizer {spec}: no such file (expected 'bytes', a tokenizer.json or a folder holding one, "
            "or a SentencePiece .model)"
        )
    return str(path.resolve())


def load(spec: str) -> Tokenizer:
    """The tokenizer named by ``spec`` (see the module docstring)."""
    resolved = resolve(spec)
    if resolved == "bytes":
        return Bytes()
    path = pathlib.Path(resolved)
    try:
        if path.suffix == ".json":
            return HuggingFace(path)
        if path.suffix == ".model":
            return SentencePiece(path)
    except ImportError as e:
        raise TokenizerError(f"--tokenizer {spec}: {e.name} is not installed (pip install -e '.[examples]')") from None
    except Exception as e:  # a corrupt or foreign file: name it
        raise TokenizerError(f"--tokenizer {spec}: cannot load it: {e}") from None
    raise TokenizerError(f"--tokenizer {spec}: unknown kind of file (expected tokenizer.json or a .model)")


def fingerprint(spec: str) -> str:
    """Identifies a tokenizer's content (for cache keys): "bytes" or a hash of its file."""
    resolved = resolve(spec)
    if resolved == "bytes":
        return resolved
    return hashlib.sha256(pathlib.Path(resolved).read_bytes()).hexdigest()[:16]


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | pathlib.Path) -> HuggingFace:
    """Trains a byte-level BPE (``tokenizers``; GPT-2's scheme) on ``texts`` and saves it to ``path``.

    Every byte is in the vocabulary (no unknown token is ever produced); ``</s>`` ends each document
    (the separator :mod:`lm.prepare` puts between them), ``<unk>`` is kept for tools that expect one.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return HuggingFace(pathlib.Path(path))
