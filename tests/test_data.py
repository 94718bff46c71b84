"""The example's data pipeline: tokenizers built in the test, prepare -> memory-mapped .bin -> train."""

import gzip
import io
import json
import os
import pathlib
import sys
import sysconfig

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("tokenizers", reason="examples extra not installed")
from lm import data as data_lib  # noqa: E402
from lm import prepare as prepare_lib  # noqa: E402
from lm import tokenizer as tokenizer_lib  # noqa: E402


def stdlib_text(n_files=12):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:n_files]]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (vocabulary 400) trained here on a few KB of the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([t[:4000] for t in stdlib_text()], trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece BPE model (vocabulary 300) trained here."""
    spm = pytest.importorskip("sentencepiece", reason="examples extra not installed")
    lines = [line for t in stdlib_text() for line in t.splitlines() if line.strip()][:3000]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=300,
                                   model_type="bpe", minloglevel=2)  # fmt: skip
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRA_JAX_CACHE", str(tmp_path / "cache"))


def test_tokenizers_load_and_round_to_128(bpe, spm_model):
    hf = tokenizer_lib.load(str(bpe.parent))  # a folder holding tokenizer.json
    assert hf.vocab_size == 400 and hf.separator == 1 and tokenizer_lib.model_vocab_size(400) == 512
    ids = hf.encode(["def f(x):\n    return x"])[0]
    assert ids.max() < 400 and len(ids) < len("def f(x):\n    return x")
    sp = tokenizer_lib.load(str(spm_model))
    assert sp.vocab_size == 300 and sp.separator == 2  # SentencePiece's default eos id
    assert tokenizer_lib.load("bytes").encode(["é\0a"])[0].tolist() == [0xC3, 0xA9, ord("a")]
    with pytest.raises(tokenizer_lib.TokenizerError, match="no such file"):
        tokenizer_lib.load("/nonexistent/tokenizer.json")


@pytest.mark.parametrize("kind", ["bpe", pytest.param("spm", marks=pytest.mark.slow)])  # spm with the slow tests
def test_prepare_then_train_round_trip(tmp_path, kind, bpe, spm_model):
    import train_lm

    spec = str(bpe if kind == "bpe" else spm_model)
    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for i, text in enumerate(stdlib_text(30)):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    meta = prepare_lib.prepare(str(src), spec, tmp_path / "prep", workers=2, progress=False, val_fraction=0.2)
    assert meta["dtype"] == "uint16" and meta["split_rule"].startswith("documents by a hash")
    corpus = data_lib.open_prepared(tmp_path / "prep")
    assert isinstance(corpus.train, np.memmap)
    tok = tokenizer_lib.load(spec)
    assert len(corpus.train) + len(corpus.val) == sum(len(i) for i in tok.encode(stdlib_text(30))) + 28  # + separators
    assert corpus.meta["splits"]["train"]["documents"] + corpus.meta["splits"]["val"]["documents"] == 30
    flags = ["--data", str(tmp_path / "prep"), "--preset", "micro", "--steps", "2", "--batch-size", "2",
             "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    result = train_lm.main(flags)
    assert result["tokenizer"] == str(pathlib.Path(spec).resolve())
    assert np.isfinite(result["final_val_bpb"]) and result["final_val_bpb"] > 0
    # bits per byte = nats per token / (bytes per token * ln 2)
    assert result["final_val_bpb"] == pytest.approx(result["final_val_loss"] / corpus.bytes_per_token / np.log(2))


def test_single_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i} of a long single document\n" for i in range(4000))
    (tmp_path / "book.txt").write_text(text)
    meta = prepare_lib.prepare(str(tmp_path / "book.txt"), "bytes", tmp_path / "prep", workers=1, progress=False)
    assert meta["split_rule"].startswith("one document: split by position")
    corpus = data_lib.open_prepared(tmp_path / "prep")
    train, val = (np.asarray(x).astype(np.uint8).tobytes() for x in (corpus.train, corpus.val))
    assert train + val == text.encode()  # nothing dropped, nothing added: the tail is the validation split
    assert 0.04 <= len(corpus.val) / len(text) <= 0.07


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    docs = [" ".join(f"w{(i * 7919 + j) % 70_000}" for j in range(50)) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_lib.prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "big.json"), tmp_path / "p", progress=False,
                            workers=1, val_fraction=0.2)  # fmt: skip
    assert meta["dtype"] == "uint32" and meta["model_vocab_size"] == 70_016
    corpus = data_lib.open_prepared(tmp_path / "p")
    assert corpus.train.dtype == np.uint32 and int(np.max(corpus.train)) > 65_535


def test_c4_shards_are_the_two_splits(tmp_path):
    for split, n in (("train", 3), ("validation", 1)):
        for shard in range(n):
            with gzip.open(tmp_path / f"c4-{split}.{shard:05d}-of-01024.json.gz", "wt") as f:
                for i in range(5):
                    f.write(json.dumps({"text": f"{split} shard {shard} doc {i}. " * 5, "url": "u"}) + "\n")
    meta = prepare_lib.prepare(str(tmp_path), "bytes", tmp_path / "prep", workers=1, progress=False)
    assert meta["split_rule"].startswith("C4 shards by name")
    assert meta["splits"]["train"]["documents"] == 15 and meta["splits"]["val"]["documents"] == 5
    val = np.asarray(data_lib.open_prepared(tmp_path / "prep").val).astype(np.uint8).tobytes()
    assert b"validation shard" in val and b"train" not in val


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data_lib.DataError, match=r"empty.txt: empty file"):
        prepare_lib.prepare(str(tmp_path / "empty.txt"), "bytes", tmp_path / "p", workers=1, progress=False)
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 10)
    with pytest.raises(data_lib.DataError, match=r"blob.txt: binary file"):
        prepare_lib.prepare(str(tmp_path / "blob.txt"), "bytes", tmp_path / "p", workers=1, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(data_lib.DataError, match=r"latin1.txt: not UTF-8 text"):
        prepare_lib.prepare(str(tmp_path / "latin1.txt"), "bytes", tmp_path / "p", workers=1, progress=False)


def test_a_folders_empty_and_binary_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "blob.txt").write_bytes(b"\x00\x01binary\x00" * 10)
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    (folder / "code.py").write_text("def f(x):\n    return x + 1\n" * 400)
    meta = prepare_lib.prepare(str(folder), "bytes", tmp_path / "p", workers=1, progress=False)
    assert meta["description"] == f"{folder} (1 file; skipped 1 empty, 2 not text)"
    assert meta["sources"] == [str(folder / "code.py")]
    (folder / "code.py").unlink()
    with pytest.raises(data_lib.DataError, match=r"no text, .jsonl or .json.gz files found; skipped 1 empty, 2 not"):
        prepare_lib.prepare(str(folder), "bytes", tmp_path / "q", workers=1, progress=False)


def test_raw_source_is_cached_by_path_size_mtime_and_tokenizer(tmp_path, bpe):
    src = tmp_path / "a.txt"
    src.write_text("some text to learn from\n" * 2000)
    logs = []
    first = prepare_lib.load(str(src), "bytes", log=logs.append)
    again = prepare_lib.load(str(src), "bytes", log=logs.append)
    assert len(logs) == 1 and np.array_equal(first.train, again.train)  # the second load tokenized nothing
    prepare_lib.load(str(src), str(bpe), log=logs.append)
    assert len(logs) == 2  # another tokenizer: another cache entry
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    prepare_lib.load(str(src), "bytes", log=logs.append)
    assert len(logs) == 3  # a newer mtime: tokenized again
    with pytest.raises(data_lib.DataError, match="prepared with tokenizer"):
        prepare_lib.prepare(str(src), "bytes", tmp_path / "prep", workers=1, progress=False)
        prepare_lib.load(str(tmp_path / "prep"), str(bpe))


@pytest.mark.slow  # several training runs
def test_gradient_accumulation_matches_one_batch(tmp_path):
    import train_lm

    def losses(accum):
        out = tmp_path / f"accum{accum}"
        train_lm.main(["--preset", "micro", "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--log-every", "1",
                       "--eval-batches", "1", "--eval-every", "3", "--rank", "4", "--no-progress", "--grad-accum",
                       str(accum), "--out", str(out)])  # fmt: skip
        return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses(2), losses(1), rtol=1e-5)


def test_recipes_are_the_authors_settings(capsys):
    from lm import config as config_lib

    r = config_lib.RECIPES["paper-60m"]
    got = (r["preset"], r["steps"], r["lr"], r["rank"], r["update_proj_gap"], r["scale"])
    assert got == ("60m", 10_000, 0.01, 128, 200, 0.25)
    assert (r["seq_len"], r["batch_size"], r["weight_decay"], r["dtype"]) == (256, 512, 0.0, "bfloat16")
    assert config_lib.RECIPES["paper-1b"]["scale"] == 0.0625 and config_lib.RECIPES["paper-7b"]["grad_clip"] == 1.0
    import train_lm

    cfg, _ = train_lm.parse_args(["--recipe", "paper-130m", "--tokenizer", "bytes", "--steps", "7"])
    assert (cfg.preset, cfg.rank, cfg.steps, cfg.batch_size) == ("130m", 256, 7, 512)  # flags override the recipe
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--recipe", "paper-60m"])
    assert "T5's tokenizer" in capsys.readouterr().err
    # The 7B recipe clips globally, which per-layer updates cannot: refused, and told how to drop it.
    seven = ["--recipe", "paper-7b", "--tokenizer", "bytes", "--per-layer-updates"]
    with pytest.raises(SystemExit):
        train_lm.parse_args(seven)
    assert "--grad-clip 0 drops a recipe's clip" in capsys.readouterr().err
    cfg, _ = train_lm.parse_args([*seven, "--grad-clip", "0"])
    assert cfg.grad_clip == 0 and cfg.per_layer_updates
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--grad-clip", "-1"])
    assert "--grad-clip must be > 0 (or 0: no clipping)" in capsys.readouterr().err


def test_train_tokenizer_then_prepare_train_and_export(tmp_path, capsys):
    """docs/pretraining.md's "Training a tokenizer" commands at a small size: the BPE learns from
    the training split only, ends documents with </s>, round-trips text, and the exported model
    records that id as its eos_token_id."""
    import train_lm
    import train_tokenizer

    common = "".join(f"def step_{i}(value):\n    return value * {i} + offset\n\n" for i in range(400))
    held_out = "zqxjvw " * 400  # only in the last 5% (the validation split of a single file)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(common + held_out)
    path = train_tokenizer.main(["--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")])
    assert path == tmp_path / "tok" / "tokenizer.json"
    tok = tokenizer_lib.load(str(tmp_path / "tok"))
    assert tok.vocab_size == 400 and tok.separator == 1  # <unk> 0, </s> 1
    text = "def step_7(value):\n    return value * 7 + offset\n"
    (ids,) = tok.encode([text])
    assert tok.decode(ids.tolist()) == text and len(ids) < len(text) / 2  # merges learnt from the train split
    (word,) = tok.encode(["zqxjvw"])
    assert len(word) >= 3  # never merged: the validation split was not seen
    capsys.readouterr()
    usage = "--vocab-size must be >= 258"
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--vocab-size", "100", "--out", str(tmp_path / "x")])
    assert usage in capsys.readouterr().err

    data = tmp_path / "data"
    prepare_lib.prepare(str(corpus), str(path), data, progress=False)
    export = tmp_path / "model"
    run = ["--preset", "micro", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]
    train_lm.main([*run, "--data", str(data), "--no-progress", "--out", str(tmp_path / "run"), "--export", str(export)])
    for name in ("config.json", "generation_config.json"):
        assert json.loads((export / name).read_text())["eos_token_id"] == tok.separator
