"""APOLLO and APOLLO-Mini (fira_jax.scale_by_apollo, apollo, apollo_mini) against a NumPy transcription,
and the random projection's properties."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_side import np_side

import fira_jax
from fira_jax.projections import random_projection


def np_apollo(params, grads, projections, lr, scale, scale_type, b1=0.9, b2=0.999, eps=1e-6, wd=0.0, gamma=1.01):
    """APOLLO (Zhu et al., 2025, Algorithm 1) in float64 NumPy, every leaf a 2-D projected matrix,
    given the projection each leaf uses at each step."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: None for k in p}
    v = {k: None for k in p}
    prev = {}
    out = []
    for t, g in enumerate(grads):
        for k in p:
            gk = g[k].astype(np.float64)
            proj = projections[t][k].astype(np.float64)
            side = np_side("std", *gk.shape)
            r = gk @ proj.T if side == "right" else proj.T @ gk
            m[k] = (1 - b1) * r if m[k] is None else b1 * m[k] + (1 - b1) * r
            v[k] = (1 - b2) * r * r if v[k] is None else b2 * v[k] + (1 - b2) * r * r
            n = m[k] / (np.sqrt(v[k]) + eps)
            if scale_type == "tensor":
                phi = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
            elif side == "right":  # one factor per row of G: norms over the rank axis
                phi = (np.linalg.norm(n, axis=1) / (np.linalg.norm(r, axis=1) + 1e-8))[:, None]
            else:
                phi = (np.linalg.norm(n, axis=0) / (np.linalg.norm(r, axis=0) + 1e-8))[None, :]
            s = phi * gk
            norm = np.linalg.norm(s)
            if k in prev:
                ell = max(norm / (prev[k] + 1e-8), gamma) / gamma
                s, prev[k] = s / ell, norm / ell
            else:
                prev[k] = norm
            c = math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            p[k] = p[k] - lr * c * math.sqrt(scale) * s
            p[k] = p[k] - lr * wd * p[k]
        out.append({k: x.copy() for k, x in p.items()})
    return out


SHAPES = {"tall": (12, 8), "wide": (6, 10)}


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_apollo_matches_numpy(variant, scale_type):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    # Gradients that grow fast at step 4: the limiter acts.
    grads = [{k: ((1 + 20 * (t == 4)) * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
             for t in range(9)]  # fmt: skip
    tx = fira_jax.apollo(1e-2, rank=3, update_proj_gap=4, scale=2.0, weight_decay=0.1, scale_type=scale_type)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    step = variant(lambda g, s, p: tx.update(g, s, p))
    p, traj, projections = jax.tree.map(jnp.asarray, params), [], []
    for g in grads:
        u, state = step(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        traj.append(jax.tree.map(np.asarray, p))
        projections.append({"tall": np.asarray(state[0].right["tall"]), "wide": np.asarray(state[0].left["wide"])})
    ref = np_apollo(params, grads, projections, 1e-2, 2.0, scale_type, wd=0.1)
    for ours, theirs in zip(traj, ref, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-5, atol=2e-6)


def test_random_projection_statistics():
    lay = fira_jax.Layout("w", (4, 300, 200), (0, 1, 2), 1, (4,), 300, 200, 50, "right")
    p = np.asarray(random_projection(jax.random.key(0), lay).right)
    assert p.shape == (4, 50, 200)
    assert abs(p.mean()) < 0.01
    assert p.var() * 50 == pytest.approx(1.0, rel=0.02)  # variance 1 / rank
    assert not np.allclose(p[0], p[1])  # each stacked matrix has its own draw
    gram = np.einsum("brn,brk->bnk", p, p).mean(0)  # E[P^T P] = I: norms preserved in expectation
    assert abs(np.diag(gram).mean() - 1) < 0.03  # 800 sums of 50 squares: std of the mean ~0.007
    with pytest.raises(ValueError, match="one-sided"):
        random_projection(jax.random.key(0), lay._replace(side="full"))


def test_projections_refresh_every_gap_with_new_draws_per_leaf():
    params = {"a": jnp.zeros((8, 6)), "b": jnp.zeros((8, 6)), "s": jnp.zeros((3, 8, 6))}
    tx = fira_jax.scale_by_apollo(
        rank=2, refresh=fira_jax.Refresh(update_proj_gap=3, seed=5), axes=fira_jax.MatrixAxes()
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(7):
        _, state = update(grads, state)
        seen.append(jax.tree.map(np.asarray, state.right))
    for k in params:
        changed = [t for t in range(1, 7) if not np.array_equal(seen[t][k], seen[t - 1][k])]
        assert changed == [3, 6], (k, changed)  # refreshed at t % 3 == 0, kept in between
    assert not np.allclose(seen[0]["a"], seen[0]["b"])  # same shape, own seeds
    assert not np.allclose(seen[0]["s"][0], seen[0]["s"][1])
    again = tx.init(params)
    _, again = update(grads, again)
    np.testing.assert_array_equal(np.asarray(again.right["a"]), seen[0]["a"])  # deterministic in the seed
    other = fira_jax.scale_by_apollo(rank=2, refresh=fira_jax.Refresh(update_proj_gap=3, seed=6))
    _, other_state = jax.jit(other.update)(grads, other.init(params))
    assert not np.allclose(np.asarray(other_state.right["a"]), seen[0]["a"])


def test_apollo_mini_state_and_one_trace():
    params = {"w": jnp.zeros((64, 32)), "norm": jnp.zeros(32)}
    tx = fira_jax.apollo_mini(1e-2, update_proj_gap=2)
    state = tx.init(params)
    low = state[0]
    assert low.inner.mu["w"].shape == (64, 1) and low.right["w"].shape == (1, 32)
    assert low.inner.mu["norm"].shape == (32,)  # unprojected leaves: Adam

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, s, p):
        return tx.update(g, s, p)

    g = jax.tree.map(lambda x: jnp.ones_like(x) + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)
    for _ in range(5):  # refreshes at 0, 2, 4: one compilation
        u, state = step(g, state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_apollo_mini_is_apollo_rank_one_tensor():
    params = {"w": jnp.arange(24.0).reshape(6, 4) / 10}
    g = {"w": jnp.cos(jnp.arange(24.0)).reshape(6, 4)}
    mini = fira_jax.apollo_mini(1e-2, seed=1)
    full = fira_jax.apollo(1e-2, rank=1, scale=128.0, scale_type="tensor", seed=1)
    u1, _ = mini.update(g, mini.init(params), params)
    u2, _ = full.update(g, full.init(params), params)
    np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))


def test_svd_projection_is_galore_basis():
    params = {"w": jnp.zeros((10, 6))}
    g = {"w": jax.random.normal(jax.random.key(0), (10, 6))}
    apo = fira_jax.scale_by_apollo(rank=2, proj="svd")
    gal = fira_jax.scale_by_galore(rank=2)
    _, s1 = apo.update(g, apo.init(params))
    _, s2 = gal.update(g, gal.init(params))
    np.testing.assert_allclose(np.asarray(s1.right["w"]), np.asarray(s2.right["w"]), atol=1e-6)


def test_no_back_projection_in_the_plain_step():
    """APOLLO's update is phi ⊙ G: one product with P (R = G P^T), none back (GaLore and Fira need two)."""
    params = {"w": jnp.zeros((16, 8))}
    g = {"w": jnp.ones((16, 8))}

    def dots(tx):
        state = tx.init(params)
        _, state = tx.update(g, state)  # past the refresh at step 0
        hlo = jax.jit(lambda g, s: tx.update(g, s)).lower(g, state).as_text()
        return hlo.count("dot_general")

    plain = fira_jax.scale_by_apollo(rank=2, refresh=fira_jax.Refresh(update_proj_gap=1000))
    assert dots(plain) < dots(
        fira_jax.scale_by_fira(rank=2, refresh=fira_jax.Refresh(update_proj_gap=1000, method="gram"))
    )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"proj_type": "full"}, ValueError, "one side"),
        ({"scale_type": "column"}, ValueError, "scale_type"),
        ({"proj": "gaussian"}, ValueError, "proj"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"gamma": 0.5}, ValueError, "gamma"),
        ({"rank": 0}, ValueError, "rank"),
        ({"proj": "svd", "svd": "random"}, ValueError, "method"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kwargs = dict(kwargs)
        if "svd" in kwargs:
            kwargs["refresh"] = fira_jax.Refresh(method=kwargs.pop("svd"))
        fira_jax.scale_by_apollo(**kwargs)
