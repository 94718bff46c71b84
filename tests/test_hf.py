"""Hugging Face LLaMA checkpoints: import and export against transformers' LlamaForCausalLM."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

torch = pytest.importorskip("torch", reason="torch is not installed: checkpoint parity NOT checked")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: checkpoint parity NOT checked"
)
import jax.numpy as jnp  # noqa: E402
from lm import hf  # noqa: E402


def tiny_llama(tmp_path, tie, name="hf"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return model, tmp_path / name


def logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_import_and_export_match_transformers(tmp_path, tie):
    reference, path = tiny_llama(tmp_path, tie)
    tokens = np.random.default_rng(0).integers(0, 128, (2, 16))
    ours = hf.load(path)
    assert ours.cfg.num_kv_heads == 2 and ours.cfg.tie_embeddings == tie and ours.cfg.rope_theta == 500000.0
    imported = np.max(np.abs(np.asarray(ours(jnp.asarray(tokens))) - logits(reference, tokens)))
    hf.save(ours, tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    exported = np.max(np.abs(logits(reloaded, tokens) - logits(reference, tokens)))
    # The token ids generate() starts and stops with survive the round trip (config and generation config).
    assert (tmp_path / "exported" / "generation_config.json").is_file()
    for config in ("config", "generation_config"):
        for name in ("bos_token_id", "eos_token_id"):
            want = getattr(getattr(reference, config), name)
            assert want is not None and getattr(getattr(reloaded, config), name) == want, (config, name)
    print(f"tied {tie}: max |logit difference| import {imported:.1e}, export reloaded in transformers {exported:.1e}")
    assert imported <= 1e-4 and exported <= 1e-6


def test_sharded_checkpoint_loads(tmp_path):
    reference, _ = tiny_llama(tmp_path, False)
    reference.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = np.random.default_rng(1).integers(0, 128, (1, 8))
    np.testing.assert_allclose(np.asarray(hf.load(tmp_path / "sharded")(jnp.asarray(tokens))),
                               logits(reference, tokens), atol=1e-4)  # fmt: skip


def test_clear_errors(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"no config\.json"):
        hf.load(tmp_path)
    _, path = tiny_llama(tmp_path, False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(hf.CheckpointError, match="MistralForCausalLM"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(hf.CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight has shape"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match=r"no model\.safetensors"):
        hf.load(path)
