"""add_decayed_weights_after_step: the reference's step-then-decay order."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import fira_jax


def test_step_then_decay(variant):
    lr, wd = 0.1, 0.5
    w = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
    u = {"a": jnp.array([0.5, 0.25]), "b": jnp.array([-1.0])}
    tx = fira_jax.add_decayed_weights_after_step(wd, lr, mask={"a": True, "b": False})
    out, _ = variant(tx.update)(u, tx.init(w), w)
    stepped = w["a"] + u["a"]
    chex.assert_trees_all_close(w["a"] + out["a"], stepped - lr * wd * stepped)
    chex.assert_trees_all_equal(out["b"], u["b"])
    # optax.add_decayed_weights decays the pre-step weights instead.
    pre_step = optax.chain(optax.add_decayed_weights(wd), optax.scale(-lr))
    theirs, _ = pre_step.update(jax.tree.map(lambda x: -x / lr, u), pre_step.init(w), w)
    assert not jnp.allclose(out["a"], theirs["a"])


def test_schedule():
    sched = optax.linear_schedule(1.0, 0.0, 4)
    tx = fira_jax.add_decayed_weights_after_step(0.1, sched)
    w, u = jnp.ones(2), jnp.zeros(2)
    state = tx.init(w)
    for t in range(3):
        out, state = tx.update(u, state, w)
        chex.assert_trees_all_close(out, -float(sched(t)) * 0.1 * w)


def test_needs_params():
    tx = fira_jax.add_decayed_weights_after_step(0.1, 1e-2)
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
