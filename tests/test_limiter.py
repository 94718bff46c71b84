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
        if s is None or s <= 1e-8:  # the first step, or after a zero norm: record (the limiter re-arms)
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
    return fira_jax.scale_by_fira(
        2,
        0.0,
        refresh=fira_jax.Refresh(update_proj_gap=100),
        residual=fira_jax.Residual(gamma=gamma, residual_scale=1.0),
        base_optimizer=optax.identity(),
        axes=fira_jax.MatrixAxes(),
    )


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
        fira_jax.Residual(gamma=0.5)
    tx = fira_jax.scale_by_fira(2, refresh=fira_jax.Refresh(update_proj_gap=5), axes=fira_jax.MatrixAxes())
    state = tx.init({"a": jnp.zeros((3, 4, 5)), "b": jnp.zeros(2)})
    assert state.norms["a"].shape == (3,) and jax.tree.leaves(state.norms["b"]) == []


# ---------------------------------------------------------------------------
# clip_by_norm_growth: the limiter as an optax transformation of whole updates.
# ---------------------------------------------------------------------------


def test_clip_by_norm_growth_matches_numpy(variant):
    rng = np.random.default_rng(1)
    scales = [1.0, 4.0, 4.0, 0.1, 30.0, 1.0]
    updates = [{"w": (s * rng.standard_normal((5, 3))).astype(np.float32), "b": (s * rng.standard_normal(3)).astype(
        np.float32)} for s in scales]  # fmt: skip
    for gamma in (1.01, 2.0, float("inf")):
        tx = fira_jax.clip_by_norm_growth(gamma)
        state = tx.init(jax.tree.map(jnp.asarray, updates[0]))
        step = variant(tx.update)
        outs = []
        for u in updates:
            out, state = step(jax.tree.map(jnp.asarray, u), state)
            outs.append(jax.tree.map(np.asarray, out))
        for k in ("w", "b"):  # each leaf limited by its own past
            ref = np_limiter([u[k] for u in updates], gamma)
            for ours, theirs in zip(outs, ref, strict=True):
                np.testing.assert_allclose(ours[k], theirs, rtol=1e-5, atol=1e-6)


def test_clip_by_norm_growth_after_adamw_and_integer_leaves():
    params = {"w": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}
    tx = optax.chain(optax.adamw(1e-2), fira_jax.clip_by_norm_growth(1.01))
    state = tx.init(params)
    assert isinstance(state[1].norms["step"], optax.MaskedNode)
    grads = {"w": jnp.full((4, 4), 0.01), "step": jnp.zeros((), jnp.int32)}
    u0, state = tx.update(grads, state, params)
    u1, state = tx.update({"w": jnp.full((4, 4), 100.0), "step": grads["step"]}, state, params)
    # Adam's normalized steps keep their norm; the limiter lets them grow by 1 % at most.
    assert float(jnp.linalg.norm(u1["w"])) <= 1.01 * float(jnp.linalg.norm(u0["w"])) * (1 + 1e-5)
    assert int(u1["step"]) == 0


def test_clip_by_norm_growth_inside_multisteps_and_apply_if_finite():
    params = {"w": jnp.zeros(3)}
    big = {"w": jnp.array([30.0, 40.0, 0.0])}
    small = {"w": jnp.array([3.0, 4.0, 0.0])}
    # MultiSteps: the limiter sees the averaged gradient once per 2 micro-steps.
    tx = optax.MultiSteps(fira_jax.clip_by_norm_growth(1.5), every_k_schedule=2)
    state = tx.init(params)
    for g in (small, small):
        u, state = tx.update(g, state, params)
    np.testing.assert_allclose(np.asarray(u["w"]), [3.0, 4.0, 0.0], rtol=1e-6)  # first real step: passes
    for g in (big, big):
        u, state = tx.update(g, state, params)
    assert float(jnp.linalg.norm(u["w"])) == pytest.approx(7.5, rel=1e-5)  # 5 x 1.5
    # apply_if_finite: a NaN update is skipped and leaves the limiter's memory alone.
    tx = optax.apply_if_finite(fira_jax.clip_by_norm_growth(1.5), max_consecutive_errors=3)
    state = tx.init(params)
    _, state = tx.update(small, state, params)
    _, state = tx.update({"w": jnp.array([jnp.nan, 0.0, 0.0])}, state, params)
    assert float(state.inner_state.norms["w"]) == pytest.approx(5.0)
    u, state = tx.update(big, state, params)
    assert float(jnp.linalg.norm(u["w"])) == pytest.approx(7.5, rel=1e-5)


def test_clip_by_norm_growth_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        fira_jax.clip_by_norm_growth(0.9)


def test_limiter_rearms_after_a_zero_norm(variant):
    """A recorded norm of 0 (a zero first gradient) does not limit the next step: it records instead."""
    ell, kept = variant(fira_jax.limit_norm_growth)(jnp.asarray([5.0, 5.0]), jnp.asarray([0.0, 1.0]), 1.01, False)
    np.testing.assert_allclose(np.asarray(ell), [1.0, 5.0 / 1.01], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(kept), [5.0, 1.01], rtol=1e-6)


def test_clip_by_norm_growth_after_a_zero_first_update(variant):
    tx = fira_jax.clip_by_norm_growth(1.01)
    state = tx.init({"w": jnp.zeros(3)})
    step = variant(tx.update)
    _, state = step({"w": jnp.zeros(3)}, state)  # a zero first update: recorded norm 0
    u, state = step({"w": jnp.asarray([3.0, 4.0, 0.0])}, state)
    np.testing.assert_allclose(np.asarray(u["w"]), [3.0, 4.0, 0.0])  # passes: the limiter re-arms
    u, _ = step({"w": jnp.asarray([30.0, 40.0, 0.0])}, state)
    np.testing.assert_allclose(float(jnp.linalg.norm(u["w"])), 5.0 * 1.01, rtol=1e-6)  # and limits again


@pytest.mark.parametrize("make", [
    lambda: fira_jax.scale_by_fira(2, refresh=fira_jax.Refresh(update_proj_gap=50)),
    lambda: fira_jax.scale_by_apollo(2, refresh=fira_jax.Refresh(update_proj_gap=50)),
])  # fmt: skip
def test_zero_first_gradient_does_not_freeze_the_update(make):
    """After a zero first gradient and 20 ordinary steps, the update is the size it is without the
    zero step (within 2x: the moments differ by one step), not ~1e-8 of it (the reference's freeze)."""
    rng = np.random.default_rng(0)
    grads = [{"w": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)} for _ in range(20)]
    tx = make()
    params = {"w": jnp.zeros((12, 8))}
    step = jax.jit(tx.update)

    def last_norm(seq):
        state = tx.init(params)
        for g in seq:
            u, state = step(g, state)
        return float(jnp.linalg.norm(u["w"]))

    normal, after_zero = last_norm(grads), last_norm([{"w": jnp.zeros((12, 8))}, *grads])
    assert 0.5 < after_zero / normal < 2.0, (after_zero, normal)


def test_clip_by_norm_growth_one_norm_per_matrix_of_a_stack(variant):
    """With axes declared, each matrix of a stack is limited by its own past: one exploding layer
    does not clip the others (NumPy transcription per layer)."""
    rng = np.random.default_rng(1)
    seq = [rng.standard_normal((3, 4, 5)).astype(np.float32) for _ in range(4)]
    seq[2][1] *= 100.0  # layer 1 explodes at step 2
    tx = fira_jax.clip_by_norm_growth(1.5, axes=fira_jax.MatrixAxes())
    state = tx.init({"w": jnp.zeros((3, 4, 5))})
    step = variant(tx.update)
    got = []
    for g in seq:
        u, state = step({"w": jnp.asarray(g)}, state)
        got.append(np.asarray(u["w"]))
    for layer in range(3):
        want = np_limiter([g[layer] for g in seq], 1.5)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a[layer], b, rtol=1e-5)
    assert state.norms["w"].shape == (3,)
