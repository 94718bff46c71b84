"""LoRA adapters on the example's LLaMA: identity at start, only adapters train, merge is exact."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from lm import lora
from lm import model as model_lib

BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def setup():
    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
    return model, tokens


def test_lora_with_b_zero_gives_the_base_logits():
    model, tokens = setup()
    base = model(tokens)
    lora.apply(model, rank=4, alpha=8.0, dropout=0.1)
    model.eval()  # no dropout
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(base))
    layer = model.layers  # the stacked blocks
    assert isinstance(layer.attn.q, lora.LoRALinear) and isinstance(layer.mlp.down, lora.LoRALinear)
    assert not isinstance(layer.attn.o, lora.LoRALinear) and not isinstance(layer.mlp.gate, lora.LoRALinear)
    assert layer.attn.q.scaling == 2.0  # alpha / r, PEFT's convention


@pytest.mark.parametrize("jit", [True, False])
def test_only_adapters_train_and_merge_is_exact(jit):
    model, tokens = setup()
    lora.apply(model, rank=4, alpha=8.0, dropout=0.0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    before_base = nnx.to_pure_dict(nnx.state(model, BASE))
    before_lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(model_lib.loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss

    step = nnx.jit(step) if jit else step
    for _ in range(3):
        step(model, optimizer, tokens)
    after_base = nnx.to_pure_dict(nnx.state(model, BASE))
    after_lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    for a, b in zip(jax.tree.leaves(before_base), jax.tree.leaves(after_base), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before_lora), jax.tree.leaves(after_lora), strict=True)
    ]
    assert all(changed) and len(changed) == 2 * 5  # A and B of q, k, v, up, down
    model.eval()
    adapted = model(tokens)
    lora.merge(model)
    assert not isinstance(model.layers.attn.q, lora.LoRALinear)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(adapted), atol=1e-5)


def test_bad_lora_settings():
    model, _ = setup()
    with pytest.raises(ValueError, match="rank"):
        lora.apply(model, rank=0)
    with pytest.raises(ValueError, match="targets"):
        lora.apply(model, targets=("qkv",))
