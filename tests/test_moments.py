"""fira_jax.moments: what Adam's moments become at a refresh (keep, reset, reproject), against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax
from fira_jax.projections import Basis, carried

B1, B2 = 0.9, 0.999
GAP = 3


def _run(policy: str, proj_type: str, steps: int = 7):
    """GaLore's transform with the identity scale, canonical signs off: its states after each step."""
    rng = np.random.default_rng(0)
    shape = (10, 6) if proj_type != "left" else (6, 10)
    grads = [{"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for _ in range(steps)]
    tx = fira_jax.scale_by_galore(
        2, 1.0, refresh=fira_jax.Refresh(update_proj_gap=GAP, canonical_signs=False, moments=policy),
        proj_type=proj_type,
    )  # fmt: skip
    state = tx.init({"w": jnp.zeros(shape)})
    states = [state]
    for g in grads:
        _, state = jax.jit(tx.update)(g, state)
        states.append(state)
    return [np.asarray(g["w"]) for g in grads], states


def _np_low(g, basis, side):
    return g @ basis.T if side == "right" else basis.T @ g


@pytest.mark.parametrize("proj_type", ["right", "left"])
@pytest.mark.parametrize("policy", ["keep", "reset", "reproject"])
def test_moments_at_a_refresh_match_numpy(policy, proj_type):
    """At every step, Adam's moments from the previous ones, carried as the policy says at a refresh:
    keep (the reference), zeros, or mu C and nu (C ⊙ C) with C the change of coordinates."""
    grads, states = _run(policy, proj_type)
    side = proj_type
    for t, g in enumerate(grads):
        before, after = states[t], states[t + 1]
        old = np.asarray(getattr(before, side)["w"])
        new = np.asarray(getattr(after, side)["w"])
        mu, nu = np.asarray(before.inner.mu["w"]), np.asarray(before.inner.nu["w"])
        if t % GAP == 0 and t > 0 and policy == "reset":
            mu, nu = np.zeros_like(mu), np.zeros_like(nu)
        elif t % GAP == 0 and t > 0 and policy == "reproject":
            if side == "right":
                c = old @ new.T
                mu, nu = mu @ c, nu @ (c * c)
            else:
                c = new.T @ old
                mu, nu = c @ mu, (c * c) @ nu
        low = _np_low(g, new, side)
        np.testing.assert_allclose(np.asarray(after.inner.mu["w"]), B1 * mu + (1 - B1) * low, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(after.inner.nu["w"]), B2 * nu + (1 - B2) * low**2, rtol=1e-5, atol=1e-7)
    if policy != "keep":  # the policy did something: the bases changed at the refreshes
        before, after = getattr(states[GAP], side)["w"], getattr(states[GAP + 1], side)["w"]
        assert not np.allclose(np.asarray(before), np.asarray(after))


def test_reprojection_is_blind_to_the_svd_signs():
    """A new basis that is the old one with some signs flipped carries mu with those signs and nu
    unchanged: the run does not depend on the backend's sign convention."""
    lay = fira_jax.Layout("w", (8, 5), (0, 1), 1, (), 8, 5, 3, "right")
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((5, 3)))
    old = Basis(None, jnp.asarray(q.T, jnp.float32), lay)
    flips = np.array([1.0, -1.0, -1.0], np.float32)
    new = Basis(None, jnp.asarray(q.T * flips[:, None], jnp.float32), lay)
    mu = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    nu = jnp.asarray(rng.random((8, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(carried(mu, old, new, second=False)), np.asarray(mu) * flips, atol=1e-6)
    np.testing.assert_allclose(np.asarray(carried(nu, old, new, second=True)), np.asarray(nu), atol=1e-6)


def test_reset_restarts_adam_at_each_refresh():
    grads, states = _run("reset", "right")
    low = _np_low(grads[GAP], np.asarray(states[GAP + 1].right["w"]), "right")
    np.testing.assert_allclose(np.asarray(states[GAP + 1].inner.mu["w"]), (1 - B1) * low, rtol=1e-5, atol=1e-7)


def test_reproject_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="random projection"):
        fira_jax.scale_by_apollo(2, refresh=fira_jax.Refresh(moments="reproject"))
    tx = fira_jax.scale_by_galore(
        2, refresh=fira_jax.Refresh(moments="reproject"), base_optimizer=optax.scale_by_rss()
    )  # AdaGrad: its sum of squares is not named mu or nu
    with pytest.raises(ValueError, match=r"moments='reproject'.*sum_of_squares"):
        tx.init({"w": jnp.zeros((10, 6))})
    with pytest.raises(ValueError, match="moments"):
        fira_jax.Refresh(moments="carry")
    # "reset" zeroes whatever low-rank state the inner optimizer keeps.
    tx = fira_jax.scale_by_galore(2, refresh=fira_jax.Refresh(update_proj_gap=2, moments="reset"),
                                  base_optimizer=optax.scale_by_rss())  # fmt: skip
    state = tx.init({"w": jnp.zeros((10, 6))})
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones((10, 6))}, state)
    assert np.isfinite(np.asarray(jax.tree.leaves(state.inner)[-1])).all()


def test_optax_adam_moments_are_carried_too():
    """optax.scale_by_adam names its moments mu and nu: reproject works on it as on ours."""
    tx = fira_jax.scale_by_galore(
        2, refresh=fira_jax.Refresh(update_proj_gap=2, moments="reproject"), base_optimizer=optax.scale_by_adam()
    )
    state = tx.init({"w": jnp.zeros((10, 6)), "b": jnp.zeros(3)})
    rng = np.random.default_rng(3)
    for _ in range(4):
        g = {"w": jnp.asarray(rng.standard_normal((10, 6)), jnp.float32), "b": jnp.ones(3)}
        _, state = jax.jit(tx.update)(g, state)
    assert np.isfinite(np.asarray(state.inner.nu["w"])).all() and (np.asarray(state.inner.nu["w"]) >= 0).all()
