"""fira_jax.adam: scale_by_torch_adam (the reference's Adam convention) and its bias correction."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax


def np_adam(grads, b1, b2, eps, bias_correction):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        n = m / (np.sqrt(v) + eps)
        if bias_correction:
            n = n * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        out.append(n)
    return out


def test_matches_numpy(variant):
    rng = np.random.default_rng(0)
    grads = [1e-3 * rng.standard_normal((4, 3)) for _ in range(5)]
    for bias_correction in (False, True):
        tx = fira_jax.scale_by_torch_adam(0.8, 0.99, 1e-6, bias_correction=bias_correction)
        state = tx.init(jnp.zeros((4, 3)))
        update = variant(tx.update)
        expected = np_adam(grads, 0.8, 0.99, 1e-6, bias_correction)
        for g, e in zip(grads, expected, strict=True):
            out, state = update(jnp.asarray(g, jnp.float32), state)
            chex.assert_trees_all_close(out, jnp.asarray(e, jnp.float32), rtol=1e-5)


def test_differs_from_optax_for_small_gradients():
    """eps outside the bias correction: optax.scale_by_adam puts it inside."""
    g = jnp.full((3,), 1e-6)
    ours, _ = fira_jax.scale_by_torch_adam(bias_correction=True).update(g, fira_jax.scale_by_torch_adam().init(g))
    theirs, _ = optax.scale_by_adam(eps=1e-6).update(g, optax.scale_by_adam().init(g))
    expected = (0.1 * 1e-6 / (math.sqrt(1e-3) * 1e-6 + 1e-6)) * math.sqrt(1e-3) / 0.1
    assert float(ours[0]) == pytest.approx(expected, rel=1e-4)  # 0.0306
    assert float(theirs[0]) == pytest.approx(0.5, rel=1e-4)
    assert abs(float(ours[0]) - float(theirs[0])) > 0.1


def test_mu_dtype():
    tx = fira_jax.scale_by_torch_adam(mu_dtype=jnp.bfloat16)
    state = tx.init(jnp.zeros(3))
    assert state.mu.dtype == jnp.bfloat16 and state.nu.dtype == jnp.float32
    out, state = tx.update(jnp.ones(3), state)
    assert out.dtype == jnp.float32 and state.mu.dtype == jnp.bfloat16


def test_adam_bias_correction_schedule():
    c = fira_jax.adam_bias_correction(0.9, 0.999)
    for t in (0, 1, 99):
        assert float(c(jnp.asarray(t))) == pytest.approx(
            math.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1)), rel=1e-6
        )
    assert float(jax.jit(c)(jnp.asarray(5))) == pytest.approx(float(c(5)))


@pytest.mark.parametrize(("kwargs", "match"), [({"b1": -0.1}, "b1"), ({"b2": 1.0}, "b2"), ({"eps": -1.0}, "eps")])
def test_scale_by_adam_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fira_jax.scale_by_torch_adam(**kwargs)


def test_bf16_parameters_get_float32_moments_that_decay(variant):
    """In bf16, b2 = 0.999 rounds to 1 and nu never decays; the default float32 moments decay as Adam's."""
    tx = fira_jax.scale_by_torch_adam()
    params = {"w": jnp.zeros(4, jnp.bfloat16)}
    state = tx.init(params)
    assert state.mu["w"].dtype == state.nu["w"].dtype == jnp.float32
    step = variant(tx.update)
    out, state = step({"w": jnp.ones(4, jnp.bfloat16)}, state)
    assert out["w"].dtype == jnp.bfloat16  # the update keeps the gradient's dtype
    for _ in range(100):
        _, state = step({"w": jnp.zeros(4, jnp.bfloat16)}, state)
    np.testing.assert_allclose(np.asarray(state.nu["w"]), 1e-3 * 0.999**100, rtol=1e-4)
    low = fira_jax.scale_by_torch_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)  # the opt-out
    assert low.init(params).nu["w"].dtype == jnp.bfloat16
