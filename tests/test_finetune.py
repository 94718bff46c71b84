"""Fine-tuning: the methods train what they should, the data format, and hand-scored evaluation."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
pytest.importorskip("safetensors", reason="examples extra not installed")
import finetune
from lm import data as data_lib
from lm import hf, instruct
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib

RECORDS = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "numbers", "output": str(2 * i + 1)}
           for i in range(12)]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf.save(model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0)), path)
    return path


# lora-fira, full-adamw and galore (fira's path without the residual) with the slow tests (README's
# command stays short)
@pytest.mark.parametrize(
    "method",
    [
        m if m not in ("lora-fira", "full-adamw", "galore") else pytest.param(m, marks=pytest.mark.slow)
        for m in finetune.METHODS
    ],
)
def test_each_method_trains_only_what_it_should(tmp_path, checkpoint, method):
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    model_before = hf.load(checkpoint)
    flags = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--method", method,
             "--max-steps", "2", "--batch-size", "2", "--cutoff", "96", "--val-size", "2", "--rank", "4",
             "--lora-rank", "4", "--lr", "1e-2", "--warmup", "1", "--log-every", "1", "--out", str(tmp_path / "run"),
             "--export", str(tmp_path / "exported")]  # fmt: skip
    summary = finetune.main(flags)
    assert summary["steps"] == 2 and np.isfinite(summary["final_val_loss"])
    after = hf.load(tmp_path / "exported")  # LoRA merged into the kernels
    before_p = nnx.to_pure_dict(nnx.state(model_before, nnx.Param))
    after_p = nnx.to_pure_dict(nnx.state(after, nnx.Param))
    flat_before = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(before_p)[0]}
    flat_after = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(after_p)[0]}
    changed = {k for k in flat_before if not np.array_equal(flat_before[k], flat_after[k])}
    if method.startswith("lora"):
        targets = {f"['layers']['{m}'][{n!r}]['kernel']" for m, names in (("attn", "qkv"), ("mlp", ("up", "down")))
                   for n in names}  # fmt: skip
        assert changed == targets, changed  # only the adapted kernels, through their adapters
        assert summary["trainable_params"] < sum(v.size for v in flat_before.values()) / 2
    else:
        assert changed == set(flat_before)  # every parameter trains
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
def test_resume_continues_identically(tmp_path, checkpoint):
    """Fine-tuning checkpoints (shared with pre-training, lm/checkpoints.py) hold the model, the LoRA
    dropout's RNG and the optimizer: resuming at step 2 reproduces steps 3-4 and the data order."""
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "run"
    flags = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--method", "lora-fira",
             "--max-steps", "4", "--batch-size", "2", "--cutoff", "96", "--val-size", "2", "--rank", "2",
             "--lora-rank", "4", "--lr", "1e-2", "--warmup", "1", "--update-proj-gap", "3", "--eval-every", "2",
             "--checkpoint-every", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    finetune.main(flags)
    full = (out / "metrics.jsonl").read_text().splitlines()
    import shutil

    shutil.rmtree(out / "checkpoints" / "4")  # as if the run had stopped after the step-2 checkpoint
    finetune.main([*flags, "--resume"])
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    # Steps 3-4 replace the first run's (no duplicates); the refresh at t = 3 comes after the resume.
    numbers = ("step", "train_loss", "val_loss")  # (not the times)
    assert [{k: json.loads(x)[k] for k in numbers} for x in resumed] == [
        {k: json.loads(x)[k] for k in numbers} for x in full
    ]


def test_training_records_and_prompt_masking(tmp_path):
    tok = tokenizer_lib.load("bytes")
    ids, mask = instruct.encode(RECORDS[0], tok, cutoff=1000, train_on_inputs=False)
    head = len(instruct.prompt(RECORDS[0]).encode())
    assert mask[:head].sum() == 0 and mask[head:].sum() == len(ids) - head  # the response and end of text only
    assert bytes(ids[head:-1].astype(np.uint8)).decode() == RECORDS[0]["output"] and ids[-1] == tok.separator
    assert "### Input:\nnumbers" in instruct.prompt(RECORDS[0]) and "### Input" not in instruct.prompt(RECORDS[1])
    ids, mask = instruct.encode(RECORDS[0], tok, cutoff=20, train_on_inputs=True)
    assert len(ids) == 20 and mask.sum() == 20
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(data_lib.DataError, match="record 0 has no string field 'output'"):
        instruct.load_records(tmp_path / "bad.json")


TASK = [
    {"instruction": "Is the sky blue? Answer format: true/false", "answer": "true", "output": ""},
    {"instruction": "Is fire cold? Answer format: true/false", "answer": "false", "output": ""},
    {"instruction": "Pick one. Answer format: option1/option2/option3", "answer": "option2", "output": ""},
]


def test_hand_scored_evaluation():
    """A uniform model prefers the shortest response: 'true' (right), 'true' (wrong), 'option1' (wrong)."""
    tok = tokenizer_lib.load("bytes")

    def uniform(ids):
        return jnp.zeros((*ids.shape, 256))

    assert [instruct.loglik_choice(uniform, tok, r) for r in TASK] == ["true", "true", "option1"]
    assert instruct.accuracy(uniform, tok, TASK, "loglik") == pytest.approx(1 / 3)
    # Generation: a model that spells "the correct answer is option2" after the prompt, then stops.
    start = len(instruct.prompt(TASK[2]).encode())
    text = b"the correct answer is option2"

    def speller(ids):
        pos = ids.shape[1] - start
        nxt = text[pos] if pos < len(text) else 0
        return jnp.zeros((*ids.shape, 256)).at[0, -1, nxt].set(10.0)

    assert instruct.generate_choice(speller, tok, TASK[2]) == "option2"
    assert instruct.accuracy(speller, tok, TASK[2:], "generate") == 1.0


def test_batched_loglik_scores_equal_one_sequence_at_a_time():
    """Padding, batching and jit change nothing: each candidate scored alone, unjitted, by hand."""
    tok = tokenizer_lib.load("bytes")
    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(1))
    scores = instruct.loglik_scores(model, tok, TASK, batch_size=3)  # 7 candidates: batches of 3, 3, 1
    for record, got in zip(TASK, scores, strict=True):
        head = tok.encode([instruct.prompt(record)])[0]
        want = []
        for c in instruct.candidates(record):
            ids = np.concatenate([head, tok.encode([instruct.ANSWER_PREFIX + c])[0]])
            logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids[None, :-1])), axis=-1))[0]
            want.append(sum(logp[t - 1, ids[t]] for t in range(len(head), len(ids))))
        np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.slow  # several fine-tuning runs end to end
def test_demonstration_tables_and_reuse(tmp_path, monkeypatch):
    """The CPU demonstration end to end on a tiny budget, both tasks, a learning-rate grid chosen on
    validation loss, paired differences; then a rerun that trains nothing."""
    import finetune_demo

    monkeypatch.setattr(finetune_demo, "GRID", {**finetune_demo.GRID, "lora": (1e-3, 3e-2), "lora-fira": (3e-3,)})
    flags = ["--preset", "micro", "--pretrain-steps", "1", "--steps", "2", "--batch-size", "8",
             "--train-examples", "16", "--test-examples", "6", "--methods", "lora-fira", "lora", "--seeds", "0", "1",
             "--tasks", "called",
             "--lr-grid",
             "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]  # fmt: skip
    tasks = finetune_demo.main(flags)
    assert list(tasks) == ["called"]
    saved = json.loads((tmp_path / "finetune.json").read_text())
    page = (tmp_path / "finetune.md").read_text()
    for task, t in tasks.items():
        assert [len(t["runs"]["lora-fira"]), len(t["runs"]["lora"]), len(t["runs"][finetune_demo.CONTROL])] == [2, 2, 1]
        # The grid: every rate on seed 0, and the chosen one is that of lowest validation loss.
        grid = saved["tasks"][task]["grid"]["lora"]
        assert sorted(grid) == ["0.001", "0.03"]
        best = min(grid, key=lambda lr: grid[lr]["final_val_loss"])
        assert [r["flags"][r["flags"].index("--lr") + 1] for r in t["runs"]["lora"]] == [best] * 2
        # The paired difference, recomputed from the runs (NumPy, and the t quantile for 1 degree of freedom).
        acc = {m: np.array([r["accuracy/test"] for r in t["runs"][m]]) for m in ("lora-fira", "lora")}
        d = acc["lora-fira"] - acc["lora"]
        row = t["paired"]["lora-fira - lora"]
        np.testing.assert_allclose(row["diff"], d)
        half = 12.706205 * d.std(ddof=1) / np.sqrt(2)
        np.testing.assert_allclose([row["lo"], row["hi"]], [d.mean() - half, d.mean() + half], atol=1e-6)
        assert all(a in {k / 6 for k in range(7)} for a in acc["lora"])  # 6 test lines
        assert json.loads((tmp_path / "runs" / task / "test.json").read_text()) != []
        assert f"({task})" in page
    assert "| lora-fira - lora | " in page and "(chosen)" in page
    assert (tmp_path / "finetune.png").stat().st_size > 0
    assert finetune_demo.render(saved) == page  # the page is a function of the JSON
    assert saved["provenance"]["command"].startswith("python examples/finetune_demo.py --preset micro")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(finetune, "main", no_training)
    (tmp_path / "finetune.md").unlink()
    finetune_demo.main(flags)
    assert (tmp_path / "finetune.md").read_text().split("| method")[1:] == page.split("| method")[1:]


def test_demonstration_usage_errors(capsys):
    import finetune_demo

    for flags, message in ((["--lr-grid", "--seeds", "1"], "--seeds must include 0"),
                           (["--lr-grid", "--lr", "0.1"], "not allowed with argument"),
                           (["--tasks", "nope"], "invalid choice: 'nope'")):  # fmt: skip
        with pytest.raises(SystemExit):
            finetune_demo.main(flags)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("method", finetune.METHODS)
def test_memory_report_finetune_is_what_the_optimizer_allocates(method):
    import memory_report

    row = memory_report.finetune_report("micro", method, jnp.float32, vocab=256)
    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))
    wrt, tx = finetune.make_optimizer(method, model, 1e-4, finetune.parser().parse_args(["--checkpoint", "x"]))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    assert row["state_bytes"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(optimizer.opt_state))
    assert row["trainable_params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    assert row["weights_bytes"] == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_lora_fira_projects_every_stacked_factor():
    """The authors' setup: Fira on the LoRA factors. They are stacked like the blocks, (layers, in,
    r) and (layers, r, out), and each layer's matrix gets its own basis (none left full-rank)."""
    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))
    _, tx = finetune.make_optimizer("lora-fira", model, 1e-4, finetune.parser().parse_args(["--checkpoint", "x"]))
    state = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    low_rank = next(s for s in state if hasattr(s, "right"))
    bases = [x for x in jax.tree.leaves((low_rank.left, low_rank.right)) if x.ndim == 3]
    layers = model_lib.PRESETS["micro"].layers
    assert len(bases) == 10 and all(b.shape[0] == layers and 16 in b.shape[1:] for b in bases)  # 5 targets x A, B


# On 8 simulated devices: the checkpoint loaded into the (2,2,2) mesh, spying on what is read, then
# fine-tuned there (and a batch that does not divide over the mesh's rows refused).
_MESH_FINETUNE = """
import json, sys
sys.path.insert(0, {examples!r})
import jax, numpy as np
from flax import nnx
import finetune
from lm import hf, sharding
ckpt, flags = sys.argv[1], {flags!r}
reads = {{}}
read_slice = hf.read_slice
def spy(handle, file, name, index):
    value = read_slice(handle, file, name, index)
    size = int(np.prod(handle.get_slice(name).get_shape()))
    reads[name] = max(reads.get(name, 0), value.size / size)
    return value
hf.read_slice = spy
mesh = sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8), jax.devices())
params = nnx.state(hf.load(ckpt, mesh=mesh), nnx.Param)
hf.read_slice = read_slice
whole = nnx.state(hf.load(ckpt), nnx.Param)
print("EQUAL", all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(whole), strict=True)))
expected = jax.tree.leaves(sharding.param_shardings(params, mesh))
print("PLACED", all(x.sharding == s for x, s in zip(jax.tree.leaves(params), expected, strict=True)))
print("READS", json.dumps(reads))
try:
    finetune.main([*flags, "--batch-size", "2"])
except SystemExit as e:
    print("REFUSED", e.code)
jax.config.update("jax_log_compiles", True)  # the step must compile once (counted from stderr)
finetune.main(flags)
"""


@pytest.mark.slow  # 8 simulated devices in a subprocess
def test_fine_tuning_on_8_simulated_devices(tmp_path, checkpoint):
    """The checkpoint loads into a (data, fsdp, tensor) = (2,2,2) mesh shard by shard (each matrix's
    shard read alone: a quarter of it; the norms, replicated, whole), equal to the one-device load
    and in the parameters' shardings; LoRA + Fira fine-tuned there gives one device's losses, and
    its step compiles once (the dropout keys and step counts are placed on the mesh first).
    (A subprocess: the device count is set at start.)"""
    import os
    import subprocess

    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    flags = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--method", "lora-fira",
             "--max-steps", "3", "--batch-size", "4", "--cutoff", "96", "--val-size", "2", "--rank", "2",
             "--lora-rank", "4", "--lr", "1e-2", "--warmup", "1", "--update-proj-gap", "2", "--eval-every", "3",
             "--log-every", "1", "--no-progress"]  # fmt: skip
    mesh_flags = [*flags, "--mesh", "data=2,fsdp=2,tensor=2", "--out", str(tmp_path / "mesh")]
    code = _MESH_FINETUNE.format(examples=str(pathlib.Path(finetune.__file__).parent), flags=mesh_flags)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL True" in proc.stdout and "PLACED True" in proc.stdout
    assert "REFUSED 2" in proc.stdout and proc.stderr.count("Compiling jit(step) ") == 1
    assert "--batch-size 2 must be divisible by the mesh's data x fsdp = 4" in proc.stderr
    reads = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("READS"))[6:])
    norms = {name for name in reads if "norm" in name}
    assert {reads[name] for name in norms} == {1.0} and len(norms) == 2 * model_lib.PRESETS["micro"].layers + 1
    assert {reads[name] for name in set(reads) - norms} == {0.25}  # every matrix: (fsdp=2) x (tensor=2)
    finetune.main([*flags, "--out", str(tmp_path / "one")])

    def losses(run):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in records] + [records[-1]["val_loss"]]

    assert len(losses("one")) == 4
    np.testing.assert_allclose(losses("mesh"), losses("one"), rtol=1e-5)


def test_a_non_finite_loss_stops_fine_tuning(tmp_path, checkpoint, capsys):
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    flags = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--method", "full-adamw",
             "--max-steps", "8", "--batch-size", "2", "--val-size", "2", "--lr", "1e30", "--warmup", "0",
             "--eval-every", "100", "--log-every", "1", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    finetune.main(flags)
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) < 8 and not np.isfinite(losses[-1]) and np.isfinite(losses[0])
    assert f"step {len(losses)}: non-finite training loss" in capsys.readouterr().out


def test_config_declares_every_template_and_method():
    """FinetuneConfig's choices (lm/config.py) are the ones lm/instruct.py and finetune.py implement."""
    import dataclasses

    from lm import config as config_lib

    fields = {f.name: f for f in dataclasses.fields(config_lib.FinetuneConfig)}
    assert set(fields["template"].metadata["choices"]) == set(instruct.TEMPLATES)
    assert tuple(fields["method"].metadata["choices"]) == finetune.METHODS
