"""fira_jax.limiter: Fira's norm-growth limiter, alone and inside scale_by_fira, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax


def np_limiter(residuals, gamma):
    s = None
    out = []
    for r in residuals:
        norm = np.linalg.norm(r)
        if s is None:
            s = norm
        else:
            ell = max(norm / (s + 1e-8), gamma) / gamma if np.isfinite(gamma) else 1.0
            r = r / ell
            s = norm / ell
        out.append(r)
    return out


def test_limit_norm_growth(variant):
    norms = [2.0, 3.0, 1.0, 10.0]
    s, first = jnp.zeros(()), True
    kept = []
    for norm in norms:
        ell, s = variant(fira_jax.limit_norm_growth)(jnp.asarray(norm), s, 1.5, first)
        kept += [float(ell), float(s)]
        first = False
    assert kept == pytest.approx([1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 10.0 / 1.5, 1.5], rel=1e-6)  # (ell, kept) per step


def residual_only(gamma):
    """scale_by_fira whose update is the limited residual itself: N = R (identity inside), so
    phi = 1 up to 1e-8, scale 0 and s = 1: U = (G - P P^T G) / ell, P fixed after step 0."""
    return fira_jax.scale_by_fira(2, 100, scale=0.0, base_optimizer=optax.identity(), gamma=gamma, residual_scale=1.0)


def test_matches_numpy(variant):
    rng = np.random.default_rng(0)
    scales = [1.0, 3.0, 3.0, 0.5, 10.0, 10.0]  # sudden growth is cut to gamma x
    grads = [s * rng.standard_normal((6, 4)).astype(np.float32) for s in scales]
    params = {"w": jnp.zeros((6, 4))}
    unlimited, state = [], None
    tx0 = residual_only(float("inf"))
    state = tx0.init(params)
    for g in grads:
        out, state = tx0.update({"w": jnp.asarray(g)}, state)
        unlimited.append(np.asarray(out["w"]))
    for gamma in (1.01, 1.5, float("inf")):
        tx = residual_only(gamma)
        state = tx.init(params)
        update = variant(tx.update)
        limited = []
        for g in grads:
            out, state = update({"w": jnp.asarray(g)}, state)
            limited.append(np.asarray(out["w"]))
        for ours, ref in zip(limited, np_limiter(unlimited, gamma), strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
        assert float(state.norms["w"]) == pytest.approx(float(np.linalg.norm(limited[-1])), rel=1e-5)


def test_stacked_matrices_have_own_norms():
    tx = residual_only(1.01)
    state = tx.init({"w": jnp.zeros((2, 6, 4))})
    g = np.ones((2, 6, 4), np.float32) + np.eye(6, 4)
    _, state = tx.update({"w": jnp.asarray(g)}, state)
    out, state = tx.update({"w": jnp.asarray(g * np.array([1.0, 5.0])[:, None, None])}, state)
    norms = np.linalg.norm(np.asarray(out["w"]), axis=(1, 2))
    kept = np.asarray(state.norms["w"])
    assert kept.shape == (2,)
    np.testing.assert_allclose(norms, kept, rtol=1e-5)
    assert norms[1] / norms[0] == pytest.approx(1.01, rel=1e-4)


def test_valid_gamma_and_per_matrix_state():
    with pytest.raises(ValueError, match="gamma"):
        fira_jax.scale_by_fira(2, 5, gamma=0.5)
    state = fira_jax.scale_by_fira(2, 5).init({"a": jnp.zeros((3, 4, 5)), "b": jnp.zeros(2)})
    assert state.norms["a"].shape == (3,) and jax.tree.leaves(state.norms["b"]) == []
