"""clip_by_norm_growth: Fira's norm-growth limiter, against NumPy."""

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


def chain(gamma, shape=(6, 4)):
    project = fira_jax.project_gradients(2, 100)
    tx = optax.chain(
        project,
        fira_jax.in_subspace(optax.identity(), projection=project),  # N = R, so phi = 1
        fira_jax.scale_residual_by_norm_ratio(1.0),
        fira_jax.clip_by_norm_growth(gamma, projection=project),
    )
    return tx, tx.init({"w": jnp.zeros(shape)})


def residual_step(tx):
    """One update, returning the limited residual S (LowRank nodes do not leave a jitted function)."""

    def step(grads, state):
        out, state = tx.update(grads, state)
        return out["w"].residual.materialize(out["w"]), state

    return step


def test_matches_numpy(variant):
    rng = np.random.default_rng(0)
    scales = [1.0, 3.0, 3.0, 0.5, 10.0, 10.0]  # sudden growth is cut to 1.01x
    grads = [s * rng.standard_normal((6, 4)).astype(np.float32) for s in scales]
    for gamma in (1.01, 1.5, float("inf")):
        tx, state = chain(gamma)
        update = variant(residual_step(tx))
        unlimited, limited = [], []
        for g in grads:
            s, state = update({"w": jnp.asarray(g)}, state)
            limited.append(np.asarray(s))
        tx0, state0 = chain(float("inf"))
        for g in grads:
            s, state0 = residual_step(tx0)({"w": jnp.asarray(g)}, state0)
            unlimited.append(np.asarray(s))
        for ours, ref in zip(limited, np_limiter(unlimited, gamma), strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert float(state[3].norms["w"]) == pytest.approx(float(np.linalg.norm(limited[-1])), rel=1e-5)


def test_stacked_matrices_have_own_norms():
    tx, state = chain(1.01, shape=(2, 6, 4))
    g = np.ones((2, 6, 4), np.float32) + np.eye(6, 4)
    _, state = tx.update({"w": jnp.asarray(g)}, state)
    out, state = tx.update({"w": jnp.asarray(g * np.array([1.0, 5.0])[:, None, None])}, state)
    norms = np.linalg.norm(np.asarray(out["w"].residual.materialize(out["w"])), axis=(1, 2))
    first = np.asarray(state[3].norms["w"])
    assert first.shape == (2,)
    np.testing.assert_allclose(norms, first, rtol=1e-5)
    assert norms[1] / norms[0] == pytest.approx(1.01, rel=1e-4)


def test_needs_residual_and_valid_gamma():
    project = fira_jax.project_gradients(2, 5)
    tx = optax.chain(project, fira_jax.clip_by_norm_growth(projection=project))
    params = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match="scale_residual_by_norm_ratio"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="gamma"):
        fira_jax.clip_by_norm_growth(0.5, projection=project)


def test_state_shapes_are_per_matrix():
    project = fira_jax.project_gradients(2, 5)
    state = fira_jax.clip_by_norm_growth(projection=project).init({"a": jnp.zeros((3, 4, 5)), "b": jnp.zeros(2)})
    assert state.norms["a"].shape == (3,) and jax.tree.leaves(state.norms["b"]) == []
