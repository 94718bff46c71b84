"""Bad input across the example scripts: each bad path or file gives a one-line usage error that
names it, and the run's --out is left untouched (not created)."""

import json
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune  # noqa: E402
import prepare_data  # noqa: E402
import train_lm  # noqa: E402
from lm import hf  # noqa: E402
from lm import model as model_lib  # noqa: E402

RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(8)]
TASK = [{"instruction": "Is it? Answer format: yes/no", "answer": "yes"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf.save(model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0)), path)
    return path


def usage_error(main, argv: list[str], capsys) -> str:
    """Runs ``main(argv)``; asserts a usage error (exit 2, no traceback) and returns its one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].split(": error: ", 1)[0].endswith(".py"), err  # "<script>.py: error: <message>"
    return lines[-1].split(": error: ", 1)[1]


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train_lm", ["--steps", "-3"]),
        ("finetune", ["--checkpoint", "x", "--out", "y", "--batch-size", "0"]),
        ("prepare_data", ["--out", "x", "--val-fraction", "nope"]),
        ("train_tokenizer", ["--no-such-flag"]),
        ("memory_report", ["--preset", "huge"]),
        ("compare", ["--workers", "0"]),
        ("similarity", ["--measure-every", "0"]),
        ("finetune_demo", ["--seeds"]),
    ],
)
def test_every_entry_point_reports_a_flag_mistake_in_two_lines(script, argv, capsys):
    """argparse's whole usage text is not printed: one usage line that points to --help, then the error."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == f"usage: {script}.py [options] (see {script}.py --help)", lines
    assert lines[1].startswith(f"{script}.py: error: "), lines


def files(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """A bad file of each kind, shared by the scripts' cases."""
    made = {
        "empty.txt": b"",
        "binary.txt": bytes(range(256)) * 4,
        "latin1.txt": "café au lait\n".encode("latin-1") * 50,
        "empty.json": b"",
        "binary.json": b"\x00\x01\x02\xff" * 64,
        "truncated.json": json.dumps(RECORDS).encode()[:-20],
        "not_records.json": json.dumps([1, 2]).encode(),
        "missing_field.json": json.dumps([{"instruction": "x"}]).encode(),
        "broken_text4.jsonl": "\n".join([json.dumps({"text": "x = 1"})] * 3 + ['{"text": "y']).encode(),
        "broken_line4.jsonl": "\n".join(
            [json.dumps(r) for r in RECORDS[:3]] + ['{"instruction": "x", "output']
        ).encode(),
        "no_text.jsonl": b'{"content": "no text field"}\n',
        "no_format.json": json.dumps([{"instruction": "Is it?", "answer": "yes"}]).encode(),
        "wrong_answer.json": json.dumps([{"instruction": "Is it? Answer format: yes/no", "answer": "maybe"}]).encode(),
        "garbage.model": b"not a sentencepiece model",
        "tokenizer.json": b'{"version": "1.0", "model": ',
    }
    for name, content in made.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in made}


# --- finetune.py: checkpoints -------------------------------------------------------------------


def damaged_checkpoint(src: pathlib.Path, dst: pathlib.Path, kind: str) -> pathlib.Path:
    dst.mkdir()
    config = (src / "config.json").read_bytes()
    weights = (src / "model.safetensors").read_bytes()
    if kind == "no config.json":
        config = None
    elif kind == "config not JSON":
        config = config[: len(config) // 2]
    elif kind == "config missing a field":
        config = json.dumps({k: v for k, v in json.loads(config).items() if k != "hidden_size"}).encode()
    elif kind == "other architecture":
        config = json.dumps(json.loads(config) | {"architectures": ["GPT2LMHeadModel"]}).encode()
    elif kind == "wrong shape":
        config = json.dumps(json.loads(config) | {"intermediate_size": 96}).encode()
    elif kind == "weights truncated":
        weights = weights[: len(weights) // 2]
    elif kind == "weights empty":
        weights = b""
    elif kind == "weights garbage":
        weights = b"\xff" * 64
    elif kind == "no weights":
        weights = None
    if config is not None:
        (dst / "config.json").write_bytes(config)
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


@pytest.mark.parametrize(
    ("kind", "names", "says"),
    [
        ("no config.json", "", "no config.json"),
        ("config not JSON", "config.json", "not a JSON file (line"),
        ("config missing a field", "config.json", "no integer 'hidden_size'"),
        ("other architecture", "config.json", "'GPT2LMHeadModel' is not supported"),
        ("wrong shape", "", "the model expects"),
        ("weights truncated", "model.safetensors", "not a readable safetensors file"),
        ("weights empty", "model.safetensors", "not a readable safetensors file"),
        ("weights garbage", "model.safetensors", "not a readable safetensors file"),
        ("no weights", "", "no model.safetensors"),
    ],
)
def test_finetune_damaged_checkpoint(tmp_path, checkpoint, capsys, kind, names, says):
    ckpt = damaged_checkpoint(checkpoint, tmp_path / "ckpt", kind)
    out = tmp_path / "out"
    message = usage_error(finetune.main, ["--checkpoint", str(ckpt), "--out", str(out)], capsys)
    assert str(ckpt / names) in message and says in message, message
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "name", "says"),
    [
        ("--data", "missing.json", "no such file"),
        ("--data", "a_folder", "a folder; --data takes one JSON or JSON-lines file"),
        ("--data", "empty.json", "no records"),
        ("--data", "binary.json", "not UTF-8 text"),
        ("--data", "truncated.json", ":1: not JSON"),
        ("--data", "not_records.json", "record 0 has no string field"),
        ("--data", "missing_field.json", "record 0 has no string field 'output'"),
        ("--data", "broken_line4.jsonl", ":4: not a JSON record (Unterminated string"),
        ("--eval", "missing.json", "no such file"),
        ("--eval", "no_format.json", "record 0: no 'Answer format: a/b/c'"),
        ("--eval", "wrong_answer.json", "record 0: answer 'maybe' is not one of yes/no"),
        ("--tokenizer", "garbage.model", "garbage.model"),
        ("--tokenizer", "tokenizer.json", "tokenizer.json"),
    ],
)
def test_finetune_bad_files(tmp_path, checkpoint, capsys, flag, name, says):
    bad = files(tmp_path)
    path = bad.get(name, tmp_path / name)
    if name == "a_folder":
        path.mkdir()
    (tmp_path / "good.json").write_text(json.dumps(RECORDS))
    argv = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "good.json"), "--out", str(tmp_path / "out")]
    argv += [flag, str(path)]
    message = usage_error(finetune.main, argv, capsys)
    assert str(path) in message and says in message, message
    assert not (tmp_path / "out").exists()


def test_finetune_warmup_longer_than_the_run(tmp_path, checkpoint, capsys):
    (tmp_path / "good.json").write_text(json.dumps(RECORDS))
    argv = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "good.json"), "--val-size", "2",
            "--max-steps", "5", "--batch-size", "2", "--warmup", "100", "--out", str(tmp_path / "out")]  # fmt: skip
    message = usage_error(finetune.main, argv, capsys)
    assert message == "--warmup 100 is not shorter than the run (5 steps): pass a smaller --warmup"
    assert not (tmp_path / "out").exists()


def test_finetune_mesh_that_does_not_fit_the_devices(tmp_path, checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--mesh", "data=2,tensor=2", "--out", str(tmp_path / "out")]
    message = usage_error(finetune.main, argv, capsys)
    assert message == "--mesh 'data=2,tensor=2': the axes' sizes multiply to 4, not to the 1 devices", message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_finetune_val_size_as_a_fraction(tmp_path, checkpoint, capsys):
    (tmp_path / "good.json").write_text(json.dumps(RECORDS))
    argv = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "good.json"), "--val-size", "0.25",
            "--max-steps", "1", "--batch-size", "2", "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    finetune.main(argv)
    assert "6 training / 2 validation examples, 1 steps" in capsys.readouterr().out
    assert "a count >= 0 or a fraction" in usage_error(finetune.main, [*argv[:4], "--val-size", "1.5"], capsys)


# --- train_lm.py and prepare_data.py: corpora, prepared folders, tokenizers ----------------------


def prepared(tmp_path: pathlib.Path, kind: str) -> pathlib.Path:
    """A prepare_data.py folder, then damaged."""
    folder = tmp_path / "prepared"
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    prepare_data.main(["--data", str(text), "--out", str(folder), "--no-progress"])
    if kind == "meta not JSON":
        (folder / "meta.json").write_text("{")
    elif kind == "train.bin missing":
        (folder / "train.bin").unlink()
    elif kind == "train.bin truncated":
        data = (folder / "train.bin").read_bytes()
        (folder / "train.bin").write_bytes(data[: len(data) // 2 + 1])
    elif kind == "val.bin empty":
        (folder / "val.bin").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("kind", "names", "says"),
    [
        ("meta not JSON", "meta.json", "not a prepared data folder"),
        ("train.bin missing", "train.bin", "train.bin"),
        ("train.bin truncated", "train.bin", "train.bin"),
        ("val.bin empty", "val.bin", "val.bin"),
    ],
)
def test_train_lm_damaged_prepared_folder(tmp_path, capsys, kind, names, says):
    folder = prepared(tmp_path, kind)
    capsys.readouterr()
    out = tmp_path / "out"
    argv = ["--data", str(folder), "--preset", "micro", "--steps", "2", "--out", str(out), "--no-progress"]
    message = usage_error(train_lm.main, argv, capsys)
    assert str(folder) in message and says in message, message
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "name", "says"),
    [
        ("--data", "missing.txt", "no such file or folder"),
        ("--data", "empty.txt", "empty"),
        ("--data", "binary.txt", "binary"),
        ("--data", "latin1.txt", "UTF-8"),
        ("--data", "broken_text4.jsonl", ":4: not a JSON record"),
        ("--data", "no_text.jsonl", ":1: JSON record has no 'text' field"),
        ("--tokenizer", "missing.model", "missing.model"),
        ("--tokenizer", "garbage.model", "garbage.model"),
        ("--tokenizer", "tokenizer.json", "tokenizer.json"),
    ],
)
@pytest.mark.parametrize("script", ["train_lm", "prepare_data"])
def test_bad_corpus_or_tokenizer(tmp_path, capsys, script, flag, name, says):
    bad = files(tmp_path)
    path = bad.get(name, tmp_path / name)
    out = tmp_path / "out"
    argv = [flag, str(path), "--out", str(out), "--no-progress"]
    if script == "train_lm":
        main = train_lm.main
        argv += ["--preset", "micro", "--steps", "2"]
    else:
        main = prepare_data.main
        if flag == "--tokenizer":  # a corpus that is fine
            (tmp_path / "fine.txt").write_text("print('hello')\n" * 100)
            argv += ["--data", str(tmp_path / "fine.txt")]
    message = usage_error(main, argv, capsys)
    assert str(path) in message and says in message, message
    assert not out.exists()


def test_train_lm_warmup_longer_than_the_run(tmp_path, capsys):
    out = tmp_path / "out"
    message = usage_error(train_lm.main, ["--steps", "5", "--warmup", "5", "--out", str(out)], capsys)
    assert message == "--warmup 5 is not shorter than the run (--steps 5): pass a smaller one"
    assert not out.exists()


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_a_good_prepared_folder_still_trains(tmp_path, capsys):
    """The control for the damaged folders above: the undamaged one trains."""
    folder = prepared(tmp_path, "none")
    result = train_lm.main(["--data", str(folder), "--preset", "micro", "--steps", "2", "--batch-size", "2",
                            "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
                            "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert np.isfinite(result["final_val_loss"])


def test_the_documented_evaluation_example_is_a_valid_task_file(tmp_path):
    """The docs' three-record example (and finetune.py --help's) load as an evaluation file."""
    import re

    from lm import instruct

    page = (EXAMPLES.parent / "docs" / "finetuning.md").read_text()
    (block,) = re.findall(r"```json\n(.*?)```", page, flags=re.S)
    (tmp_path / "task.json").write_text(block)
    records = instruct.load_task(tmp_path / "task.json")
    assert [instruct.candidates(r) for r in records] == [["true", "false"], ["3", "4", "5"], ["red", "seven"]]
    assert block.replace("\n ", "\n   ").strip() in finetune.__doc__.replace("\n  [", "\n[")


def test_help_shows_the_defaults(capsys):
    """--help states each flag's default (the recipes' values are applied on top, per --recipe)."""
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (paper: 0.01 for Fira/GaLore) (default: 0.01)" in text
    assert "--steps STEPS" in text and "(default: 1000)" in text


# --- output places: a file, a read-only place, a full disk; failures while writing ----------------

from lm import checkpoints  # noqa: E402
from lm import files as files_lib  # noqa: E402

MICRO = ["--preset", "micro", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
         "--eval-batches", "1", "--no-progress"]  # fmt: skip


def script_argv(script: str, tmp_path: pathlib.Path, checkpoint: pathlib.Path) -> tuple:
    """(main, argv without --out) of a quick run of each script that writes a folder."""
    if script == "train_lm":
        return train_lm.main, list(MICRO)
    if script == "prepare_data":
        (tmp_path / "fine.txt").write_text("print('hello')\n" * 100)
        return prepare_data.main, ["--data", str(tmp_path / "fine.txt"), "--no-progress"]
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    return finetune.main, ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--val-size", "2",
                           "--batch-size", "2", "--max-steps", "2", "--warmup", "0", "--no-progress"]  # fmt: skip


def read_only(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A folder nothing can be written in: a read-only tmpfs where this machine lets us mount one,
    otherwise (said on stderr) a folder whose writes fail as a read-only file system's do."""
    import errno
    import subprocess

    place = tmp_path / "read-only"
    place.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(place)], capture_output=True)
    if mounted.returncode == 0:
        import atexit

        atexit.register(subprocess.run, ["umount", "-l", str(place)], capture_output=True)
        return place

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    print("NOTE: cannot mount a read-only tmpfs here; a read-only file system is simulated", file=sys.stderr)
    monkeypatch.setattr(files_lib.tempfile, "NamedTemporaryFile", refuse)
    return place


def full_disk(monkeypatch: pytest.MonkeyPatch, free: int = 2**20) -> None:
    """Every file system reports ``free`` bytes left."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files_lib.shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


@pytest.mark.parametrize("script", ["train_lm", "prepare_data", "finetune"])
@pytest.mark.parametrize("place", ["a-file", "read-only", "full", "under-a-file"])
def test_output_place_that_cannot_be_written(tmp_path, capsys, monkeypatch, checkpoint, script, place):
    """Checked before any work: one line naming --out and why, and nothing is created."""
    main, argv = script_argv(script, tmp_path, checkpoint)
    if place == "a-file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        says = "is a file, not a folder"
    elif place == "under-a-file":
        (tmp_path / "taken").write_text("not a folder")
        out = tmp_path / "taken" / "out"
        says = "is a file, not a folder"
    elif place == "read-only":
        out = read_only(tmp_path, monkeypatch) / "out"
        says = "cannot write there (Read-only file system)"
    else:
        out = tmp_path / "out"
        full_disk(monkeypatch)
        says = "1 MiB free on its file system, this run needs about 16 MiB"
    message = usage_error(main, [*argv, "--out", str(out)], capsys)
    assert message.startswith(f"--out {out}: ") and says in message, message
    assert not out.is_dir()


@pytest.mark.parametrize("script", ["train_lm", "finetune"])
def test_export_place_is_checked_before_training(tmp_path, capsys, monkeypatch, checkpoint, script):
    main, argv = script_argv(script, tmp_path, checkpoint)
    export = read_only(tmp_path, monkeypatch) / "model"
    out = tmp_path / "out"
    message = usage_error(main, [*argv, "--out", str(out), "--export", str(export)], capsys)
    assert message.startswith(f"--export {export}: cannot write there"), message
    assert not (out / "metrics.jsonl").exists()  # no step was run


# finetune's export goes through the same lm/hf.py code: with the slow tests (README's command stays short)
@pytest.mark.parametrize("script", ["train_lm", pytest.param("finetune", marks=pytest.mark.slow)])
def test_failed_export_keeps_the_model(tmp_path, capsys, monkeypatch, checkpoint, script):
    """The export place breaks during training (here: its first write fails as on a full disk): the
    trained model goes to OUT/export, the message says so, and no partial export folder is left."""
    import errno

    main, argv = script_argv(script, tmp_path, checkpoint)
    export, out = tmp_path / "model", tmp_path / "out"
    write = hf._write

    def fail_once(model, path):
        if not hasattr(fail_once, "done"):
            fail_once.done = True
            raise OSError(errno.ENOSPC, "No space left on device")
        write(model, path)

    monkeypatch.setattr(hf, "_write", fail_once)
    message = usage_error(main, [*argv, "--out", str(out), "--export", str(export)], capsys)
    assert message == (f"--export {export}: writing failed (No space left on device); the model was saved to "
                       f"{out / 'export'} instead"), message  # fmt: skip
    assert not export.exists() and not list(tmp_path.glob(".model.tmp-*"))
    assert hf.load(out / "export").cfg.hidden == model_lib.PRESETS["micro"].hidden  # a complete checkpoint


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_failed_checkpoint_write_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    """A real small file system that fills up during the run (the free-space check is told the disk is
    large, as when something else fills it meanwhile): one line, the last good checkpoint named."""
    import subprocess

    place = tmp_path / "small"
    place.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(place)]).returncode:
        pytest.skip(
            "LOUD SKIP: cannot mount a small tmpfs on this machine; checkpoint writes on a full disk NOT checked"
        )
    try:
        full_disk(monkeypatch, free=2**30)
        out = place / "out"
        argv = [*MICRO, "--steps", "8", "--checkpoint-every", "2", "--eval-every", "8", "--out", str(out)]
        message = usage_error(train_lm.main, argv, capsys)
        assert message.startswith(f"--out: writing a checkpoint to {out.resolve() / 'checkpoints'} failed ("), message
        assert "is intact" in message or "no earlier checkpoint exists" in message, message
        assert not list((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    finally:
        subprocess.run(["umount", "-l", str(place)])


def test_file_writes_are_whole(tmp_path, monkeypatch):
    """write_text replaces a file only once the new one is complete; a failure keeps the old."""
    path = tmp_path / "summary.json"
    files_lib.write_text(path, "old")

    class BrokenError(Exception):
        pass

    def broken_replace(src, dst):
        raise BrokenError

    monkeypatch.setattr(files_lib.os, "replace", broken_replace)
    with pytest.raises(BrokenError):
        files_lib.write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*MICRO, "--checkpoint-every", "2", "--out", str(out)]
    # No checkpoint there (a typo in --out): an error naming the folder, and nothing is created.
    message = usage_error(train_lm.main, [*argv[:-1], str(tmp_path / "typo"), "--resume"], capsys)
    assert (
        message
        == f"--resume: {tmp_path / 'typo' / 'checkpoints'} holds no checkpoint (drop --resume to start a new run there)"
    )
    assert not (tmp_path / "typo").exists()
    train_lm.main(argv)
    capsys.readouterr()
    # Another preset, vocabulary, optimizer, rank or schedule: each difference named, before any array is read.
    from lm import prepare as prepare_lib
    from lm import tokenizer as tokenizer_lib

    text = "".join(f"def f_{i}(x):\n    return x + {i}\n" for i in range(2000))
    bpe = tokenizer_lib.train_bpe([text], 300, tmp_path / "tokenizer.json")
    (tmp_path / "corpus.txt").write_text(text)
    prepare_lib.prepare(str(tmp_path / "corpus.txt"), bpe.name, tmp_path / "bpe-data", progress=False)
    where = f"--resume: the checkpoint of step 2 in {out.resolve() / 'checkpoints'} was made with"
    for flags, says in [
        (["--data", str(tmp_path / "bpe-data")], f"--tokenizer bytes (now {bpe.name}), --vocabulary 256 (now 384)"),
        (["--preset", "tiny"], "--preset micro (now tiny)"),
        (["--steps", "4"], "--steps 2 (now 4)"),
        (["--optimizer", "adamw", "--rank", "3"], "--optimizer fira (now adamw), --rank None (now 3)"),
    ]:
        message = usage_error(train_lm.main, [*argv, *flags, "--resume"], capsys)
        assert message == f"{where} {says}: resume with its settings or use a new --out", message
    # Settings that only say where to write or how often to report may change.
    train_lm.main([*argv, "--log-every", "1", "--resume"])


def test_resume_a_checkpoint_without_its_record(tmp_path, capsys):
    """A checkpoint folder without the run record (made by an older version of the examples): one line."""
    out = tmp_path / "run"
    argv = [*MICRO, "--checkpoint-every", "2", "--out", str(out)]
    train_lm.main(argv)
    import shutil

    shutil.rmtree(out / "checkpoints" / "2" / "run")
    message = usage_error(train_lm.main, [*argv, "--resume"], capsys)
    assert message.startswith(
        f"--resume: the checkpoint of step 2 in {out.resolve() / 'checkpoints'} has no readable run record ("
    )
    assert message.endswith("); start a new --out"), message


def test_resume_refuses_another_optimizer_state_format(tmp_path, capsys):
    """A checkpoint whose run record says another fira_jax.STATE_VERSION (none: format 1): one line naming both."""
    import fira_jax

    out = tmp_path / "run"
    argv = [*MICRO, "--checkpoint-every", "2", "--out", str(out)]
    train_lm.main(argv)
    records = [
        p for p in (out / "checkpoints" / "2" / "run").rglob("*") if p.is_file() and "state_version" in p.read_text()
    ]
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    del record["state_version"]  # as written before the record carried it
    records[0].write_text(json.dumps(record))
    message = usage_error(train_lm.main, [*argv, "--resume"], capsys)
    assert message == (
        f"--resume: the checkpoint of step 2 in {out.resolve() / 'checkpoints'} holds optimizer state format 1, "
        f"and this fira_jax reads format {fira_jax.STATE_VERSION}: resume with the version that wrote it, or start a "
        "new --out"
    )


def test_checkpoint_differences_name_every_setting():
    assert checkpoints.differences({"a_b": 1, "c": 2}, {"a_b": 1, "c": 3, "d": 4}) == [
        "--c 2 (now 3)",
        "--d None (now 4)",
    ]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_and_records_take_the_umasks_mode(tmp_path, umask):
    """An exported checkpoint (safetensors writes 0600 temporaries) and a JSON record are readable as any
    file the user writes."""
    import os

    from lm import files as files_lib

    old = os.umask(umask)
    try:
        hf.save(model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0)), tmp_path / "export")
        files_lib.write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    written = [*sorted((tmp_path / "export").iterdir()), tmp_path / "summary.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}


def test_resume_a_finished_run_says_so_and_rewrites_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*MICRO, "--checkpoint-every", "2", "--out", str(out)]
    train_lm.main(argv)
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    summary = train_lm.main([*argv, "--resume"])
    assert capsys.readouterr().out.strip() == f"--resume: the run in {out} already finished at step 2"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    assert summary == json.loads(written["summary.json"])


def test_resume_past_a_damaged_latest_checkpoint_uses_the_one_before(tmp_path):
    """Two checkpoints are kept; the latest one damaged (every file of its state), the one before is used."""
    from lm import checkpoints as ckpt
    from lm import train as train_lib
    from lm.config import TrainConfig

    cfg = TrainConfig(preset="micro", steps=4, batch_size=2, seq_len=16)
    record = {"preset": "micro"}
    model, tx = train_lib.build(cfg)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    manager = ckpt.manager(tmp_path, 1, False)
    for step in (1, 2):
        ckpt.save(manager, step, 1, model, optimizer, record, float(step))
    ckpt.close(manager)
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"damaged")
    said = []
    model, tx = train_lib.build(cfg)
    step, wall = ckpt.restore(ckpt.manager(tmp_path, 1, True), model, nnx.Optimizer(model, tx, wrt=nnx.Param),
                              record, said.append, cfg.steps)  # fmt: skip
    assert (step, wall) == (1, 1.0)
    where = f"--resume: the checkpoint of step 2 in {(tmp_path / 'checkpoints').resolve()} cannot be read ("
    assert len(said) == 2 and said[0].startswith(where), said
    assert said[0].endswith("; resuming from the checkpoint of step 1 instead") and said[1] == "resumed from step 1"


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_ctrl_c_in_training_checkpoints_the_last_step_and_exits_130(tmp_path, capsys, monkeypatch):
    """A Ctrl-C (here: the loop's stop request, answered yes) ends train_lm.py in one line with exit
    status 130, after a checkpoint of the last completed step; --resume goes on from it."""
    import contextlib

    from lm import loop

    out = tmp_path / "run"
    argv = [*MICRO[:2], "--steps", "4", *MICRO[4:], "--checkpoint-every", "3", "--out", str(out)]
    monkeypatch.setattr(loop, "stop_requests", lambda: contextlib.nullcontext(lambda: True))
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stopped by Ctrl-C after step 1: its checkpoint is in {out}/checkpoints (resume with --resume)"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    monkeypatch.undo()
    result = train_lm.main([*argv, "--resume"])
    assert "resumed from step 1" in capsys.readouterr().out and result["records"][-1]["step"] == 4


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_prepare_data_leaves_nothing_behind(tmp_path, sig):
    """Interrupted while it tokenizes (its hidden staging folder exists): one line, exit 130, and
    neither --out nor the staging folder is left."""
    import signal
    import subprocess
    import time

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i}.txt").write_text(f"line {i} of some text to tokenize\n" * 60000)
    out = tmp_path / "prepared"
    cmd = [sys.executable, str(EXAMPLES / "prepare_data.py"), "--data", str(corpus), "--out", str(out),
           "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".prepared.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare_data.py finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"prepare_data.py: interrupted; nothing was written to {out}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_rank_and_seq_len_mistakes_are_refused_before_anything_compiles(tmp_path, capsys):
    argv = [*MICRO, "--out", str(tmp_path / "run")]
    message = usage_error(train_lm.main, [*argv, "--rank", "64"], capsys)
    assert message == (
        "--rank 64 is not below the smaller side of the micro preset's q/o 32 x 32, k/v 32 x 32, gate/up 32 x 88, "
        "down 88 x 32: those would train full-rank; pass a rank below 32"
    )
    message = usage_error(train_lm.main, [*argv, "--seq-len", "100000"], capsys)
    assert message.startswith("--seq-len 100000: one step needs at least ") and message.endswith(
        ": pass a shorter --seq-len or a smaller --batch-size"
    )
    assert "attention scores 2 x 2 heads x 100000² and logits 2 x 100000 x 256, float32" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_export_says_at_least_the_trained_context(tmp_path):
    out = tmp_path / "run"
    argv = [*MICRO[:6], "--seq-len", "1040", *MICRO[8:], "--out", str(out), "--export", str(tmp_path / "hf")]
    train_lm.main(argv)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 1040
