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


@pytest.mark.parametrize("method", finetune.METHODS)
def test_each_method_trains_only_what_it_should(tmp_path, checkpoint, method):
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    model_before = hf.load(checkpoint)
    flags = ["--checkpoint", str(checkpoint), "--data", str(tmp_path / "train.json"), "--method", method,
             "--max-steps", "2", "--batch-size", "2", "--cutoff", "96", "--val-size", "2", "--rank", "4",
             "--lora-rank", "4", "--lr", "1e-2", "--warmup", "1", "--out", str(tmp_path / "run"),
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
        targets = {f"['layers'][0]['{m}'][{n!r}]['kernel']" for m, names in (("attn", "qkv"), ("mlp", ("up", "down")))
                   for n in names}  # fmt: skip
        assert changed == targets, changed  # only the adapted kernels, through their adapters
        assert summary["trainable_params"] < sum(v.size for v in flat_before.values()) / 2
    else:
        assert changed == set(flat_before)  # every parameter trains
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


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
