"""fira_jax.residual: Fira's scaling factor, residual, its norm and the update, against NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fira_jax
from fira_jax.matrices import layout
from fira_jax.projections import Basis


def np_residual(g, p, n_upd, side, residual_scale, granularity):
    """The reference's formulas, in NumPy: phi * (G - s * back(R))."""
    low = g @ p.T if side == "right" else p.T @ g
    back = low @ p if side == "right" else p @ low
    if granularity == "none":
        phi = 1.0
    elif granularity == "matrix":
        phi = np.linalg.norm(n_upd) / (np.linalg.norm(low) + 1e-8)
    else:
        axis = 0 if low.shape[0] < low.shape[1] else 1
        phi = np.linalg.norm(n_upd, axis=axis) / (np.linalg.norm(low, axis=axis) + 1e-8)
        phi = phi[None, :] if axis == 0 else phi[:, None]
    return phi * (g - residual_scale * back)


def make(shape, proj_type, seed=0, rank=3, basis_dtype=jnp.float32):
    """G, its exact basis P (from NumPy's SVD), R, and a stand-in N independent of R."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(np.float32)
    lay = layout("w", g, None, rank, proj_type)
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    p = vh[: lay.rank] if lay.side == "right" else u[:, : lay.rank]
    basis = fira_jax.Basis(
        None if lay.side == "right" else jnp.asarray(p, basis_dtype),
        jnp.asarray(p, basis_dtype) if lay.side == "right" else None,
        lay,
    )
    low = basis.project(jnp.asarray(g))
    n_upd = rng.standard_normal(low.shape).astype(np.float32)
    return g, p, lay, basis, low, n_upd


SHAPES = [((10, 6), "std"), ((6, 10), "std"), ((10, 6), "left"), ((6, 10), "right"), ((7, 7), "left")]


@pytest.mark.parametrize("shape_side", SHAPES)
@pytest.mark.parametrize("residual_scale", [0.25, 1.0])
@pytest.mark.parametrize("granularity", ["column", "matrix", "none"])
def test_residual_matches_numpy(variant, shape_side, residual_scale, granularity):
    g, p, lay, basis, low, n_upd = make(*shape_side)

    def residual(g, low, n):
        phi = fira_jax.scaling_factor(n, low, lay, granularity)
        return fira_jax.residual(g, low, basis, phi, residual_scale)

    expected = np_residual(g, p, n_upd, lay.side, residual_scale, granularity)
    got = variant(residual)(jnp.asarray(g), low, jnp.asarray(n_upd))
    chex.assert_trees_all_close(got, jnp.asarray(expected, jnp.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape_side", SHAPES)
@pytest.mark.parametrize("basis_dtype", [jnp.float32, jnp.bfloat16])
def test_norm_and_update_without_forming_the_residual(variant, shape_side, basis_dtype):
    """residual_norm = ||S|| and fira_update = scale back(N) + S, whichever way they are computed
    (the factored identity with a float32 basis, S formed otherwise)."""
    g, _, lay, basis, low, n_upd = make(*shape_side, basis_dtype=basis_dtype)
    phi = fira_jax.scaling_factor(jnp.asarray(n_upd), low, lay)
    s_full = np.asarray(fira_jax.residual(jnp.asarray(g), low, basis, phi, 0.25), np.float64)
    pb = np.asarray(basis.right if lay.side == "right" else basis.left, np.float64)
    back_n = n_upd @ pb if lay.side == "right" else pb @ n_upd
    norm = variant(fira_jax.residual_norm)(jnp.asarray(g), low, basis, phi, 0.25)
    update = variant(fira_jax.fira_update)(jnp.asarray(g), low, jnp.asarray(n_upd), basis, phi, 0.25, 0.5)
    tol = 1e-4 if basis_dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(float(norm), np.linalg.norm(s_full), rtol=tol)
    np.testing.assert_allclose(np.asarray(update), 0.5 * back_n + s_full, rtol=tol, atol=tol)


def test_full_rank_left_square_low_follows_reference_axis():
    """Left side with r == n == m: low is square and the reference takes one factor per row."""
    g, p, lay, basis, low, n_upd = make((5, 5), "left", rank=5)
    phi = fira_jax.scaling_factor(jnp.asarray(n_upd), low, lay)
    assert phi.shape == (5, 1)
    expected = np_residual(g, p, n_upd, "left", 0.25, "column")
    chex.assert_trees_all_close(
        fira_jax.residual(jnp.asarray(g), low, basis, phi, 0.25), jnp.asarray(expected), rtol=1e-4, atol=1e-5
    )


def test_full_rank_left_tall_uses_rank_axis():
    """Left side with r == n < m: the reference's row rule would not broadcast; the rank axis is used."""
    g, p, lay, _, low, n_upd = make((8, 4), "left", rank=4)
    phi = fira_jax.scaling_factor(jnp.asarray(n_upd), low, lay)
    r = p.T @ g
    want = np.linalg.norm(n_upd, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8)
    np.testing.assert_allclose(np.asarray(phi), want[None, :], rtol=1e-4)


def test_stacked_matrices_have_their_own_factors():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((2, 6, 4)).astype(np.float32)
    lay = layout("w", g, None, 2, "std")
    n, r = rng.standard_normal((2, 6, 2)).astype(np.float32), rng.standard_normal((2, 6, 2)).astype(np.float32)
    phi = fira_jax.scaling_factor(jnp.asarray(n), jnp.asarray(r), lay)
    assert phi.shape == (2, 6, 1)
    np.testing.assert_allclose(
        np.asarray(phi)[..., 0], np.linalg.norm(n, axis=-1) / (np.linalg.norm(r, axis=-1) + 1e-8), rtol=1e-5
    )
    assert fira_jax.scaling_factor(jnp.asarray(n), jnp.asarray(r), lay, "matrix").shape == (2, 1, 1)


@pytest.mark.parametrize("s", [0.25, 0.9, 1.0])
def test_residual_norm_is_exact_where_the_shortcut_cancels(variant, s):
    """||S|| against float64 for G = rank 32 + noise (1e-1 ... 1e-5, and none), P its exact top-32
    right singular vectors: with s near 1 the shortcut ||phi G||^2 - (2s - s^2) ||phi R||^2 cancels
    (at s = 1 and noise 1e-4 it gave 0 for a norm of 0.045); residual_norm must not. The bound is
    float32's: an error within 1e-6 of ||phi G||, and within 1e-5 of ||S|| while ||S|| is at least
    1e-4 of ||phi G||."""
    m, n, r = 512, 256, 32
    rng = np.random.default_rng(0)
    lay = fira_jax.Layout("w", (m, n), (0, 1), 1, (), m, n, r, "right")
    phi = rng.uniform(0.5, 2.0, (m, 1)).astype(np.float32)
    for noise in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0):
        signal = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)
        g = (signal + noise * rng.standard_normal((m, n))).astype(np.float32)
        vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)[2][:r].astype(np.float32)
        basis = Basis(None, jnp.asarray(vh), lay)
        low = basis.project(jnp.asarray(g))
        g64, p64, phi64 = g.astype(np.float64), vh.astype(np.float64), phi.astype(np.float64)
        true = np.linalg.norm(phi64 * (g64 - s * (g64 @ p64.T) @ p64))
        scale = np.linalg.norm(phi64 * g64)
        got = float(variant(fira_jax.residual_norm)(jnp.asarray(g), low, basis, jnp.asarray(phi), s))
        assert abs(got - true) <= 1e-6 * scale, (noise, got, true)
        if true >= 1e-4 * scale:
            assert abs(got - true) <= 1e-5 * true, (noise, got, true)


def test_scaling_factor_epsilon_is_the_references(variant):
    """phi = ||N|| / (||R|| + 1e-8), the reference's constant: with ||R|| near 1e-7 the epsilon is
    a tenth of the denominator, so 1e-6 instead would shrink phi about eightfold."""
    rng = np.random.default_rng(0)
    lay = fira_jax.Layout("w", (4, 6), (0, 1), 1, (), 4, 6, 2, "right")
    low = (1e-7 * rng.standard_normal((4, 2))).astype(np.float32)
    n_upd = rng.standard_normal((4, 2)).astype(np.float32)
    phi = np.asarray(variant(lambda n, r: fira_jax.scaling_factor(n, r, lay))(jnp.asarray(n_upd), jnp.asarray(low)))
    n64, r64 = np.linalg.norm(n_upd.astype(np.float64), axis=-1), np.linalg.norm(low.astype(np.float64), axis=-1)
    np.testing.assert_allclose(phi[:, 0], n64 / (r64 + 1e-8), rtol=1e-5)
    assert not np.allclose(phi[:, 0], n64 / (r64 + 1e-6), rtol=0.5)


@pytest.mark.parametrize("scale", [0.0, 1e-20, 1e-30])
def test_zero_and_tiny_gradients_give_finite_updates(variant, scale):
    """Zero and subnormal-adjacent gradients: phi's and the limiter's epsilons keep every update and
    state finite, and a zero gradient moves nothing (Fira, GaLore and APOLLO)."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.ones((12, 8)), "b": jnp.ones(8)}
    grads = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), params)
    for tx in (fira_jax.fira(1e-2, rank=2, update_proj_gap=2), fira_jax.galore(1e-2, rank=2, update_proj_gap=2),
               fira_jax.apollo(1e-2, rank=2, update_proj_gap=2)):  # fmt: skip
        state = tx.init(params)
        update = variant(tx.update)
        for _ in range(3):  # a refresh, a plain step, a refresh
            updates, state = update(grads, state, params)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((updates, state)))
        if scale == 0.0:
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
