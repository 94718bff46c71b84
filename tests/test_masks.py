"""mask_by_path and key-path names."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import fira_jax
from fira_jax.matrices import path_str


def test_mask_by_path_on_dicts():
    params = {
        "layers": [{"attn": {"q": jnp.zeros((4, 4))}, "mlp": {"up": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}],
        "embed": jnp.zeros((10, 4)),
    }
    mask = fira_jax.mask_by_path("attn", "mlp")(params)
    assert mask == {"layers": [{"attn": {"q": True}, "mlp": {"up": True, "bias": False}}], "embed": False}


def test_mask_by_path_on_nnx_state():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.Linear(4, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
    mask = fira_jax.mask_by_path("attn")(state)
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat == {"attn/bias/value": False, "attn/kernel/value": True, "head/bias/value": False,
                    "head/kernel/value": False}  # fmt: skip


def test_path_str():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(1)}]}
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["a/0", "a/1/b"]


def test_mask_by_path_needs_patterns():
    with pytest.raises(ValueError, match="pattern"):
        fira_jax.mask_by_path()
    with pytest.raises(TypeError, match="pattern"):
        fira_jax.mask_by_path("attn", 3)


def test_inject_hyperparams_with_a_mask_names_the_fix():
    """optax.inject_hyperparams calls every callable argument as a schedule, the mask included; the
    error says to name it static, and with static_args the learning rate becomes a hyperparameter."""
    params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
    mask = fira_jax.mask_by_path("w")
    tx = optax.inject_hyperparams(fira_jax.fira, static_args=("rank",))(learning_rate=1e-2, rank=2, mask=mask)
    with pytest.raises(ValueError, match=r'static_args=\("rank", "mask"\)'):
        tx.init(params)
    tx = optax.inject_hyperparams(fira_jax.fira, static_args=("rank", "mask"))(learning_rate=1e-2, rank=2, mask=mask)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("variant", ["galore", "fira", "apollo"])
def test_a_mask_that_selects_nothing_is_said_once(caplog, variant):
    """A typo in a path pattern would otherwise give every leaf full Adam state in silence."""
    params = {"attn": {"kernel": jnp.zeros((8, 8))}, "norm": jnp.zeros(8)}
    typo = getattr(fira_jax, variant)(1e-3, rank=2, mask=fira_jax.mask_by_path("atn"))
    with caplog.at_level("WARNING", logger="fira_jax"):
        typo.init(params)
    (record,) = caplog.records
    assert "the mask selects none of the 2 leaves (attn/kernel, norm)" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fira_jax"):
        getattr(fira_jax, variant)(1e-3, rank=2, mask=fira_jax.mask_by_path("attn")).init(params)
    assert caplog.records == []  # the control: a mask that selects a leaf says nothing
