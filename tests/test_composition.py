"""Ordinary optax transforms between project_gradients and project_back, and pieces out of order.

Stateless transforms act on the low-rank update only (the LowRank node's single leaf); stateful
ones, and fira pieces in the wrong order, raise errors that say what to do.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax

SHAPES = {"w": (8, 5), "v": (4, 9), "b": (5,)}


def problem(steps=5, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def chain(middle, fira=True):
    """Fira (or GaLore) built from the pieces with ``middle`` inserted right after in_subspace."""
    project = fira_jax.project_gradients(2, update_proj_gap=2)
    adam = fira_jax.in_subspace(fira_jax.scale_by_adam(), projection=project)
    residual = [fira_jax.scale_residual_by_norm_ratio(0.25), fira_jax.clip_by_norm_growth(1.01, projection=project)]
    if not fira:
        residual = []
    return optax.chain(project, adam, *middle, *residual, fira_jax.project_back(0.25))


def run(tx, params, grads, jit):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("fira", [True, False])
def test_scale_halves_the_update(jit, fira):
    params, grads = problem()
    plain = run(chain([], fira), params, grads, jit=False)
    # Before Fira's residual pieces, halving N halves phi, hence S and the whole update.
    halved = run(chain([optax.scale(0.5)], fira), params, grads, jit=jit)
    for a, b in zip(halved, plain, strict=True):
        chex.assert_trees_all_close(a, jax.tree.map(lambda x: 0.5 * x, b), rtol=1e-5, atol=1e-7)


def test_scale_by_schedule_scales_each_step():
    params, grads = problem()
    plain = run(chain([], fira=False), params, grads, jit=True)
    scheduled = run(chain([optax.scale_by_schedule(lambda c: 0.5**c)], fira=False), params, grads, jit=True)
    for t, (a, b) in enumerate(zip(scheduled, plain, strict=True)):
        chex.assert_trees_all_close(a, jax.tree.map(lambda x, t=t: 0.5**t * x, b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jit", [True, False])
def test_clip_by_global_norm_clips_the_low_rank_update(jit):
    """The norm is over the low-rank updates (and unselected leaves), never the basis or G."""
    params, grads = problem(steps=3)
    max_norm = 0.5
    project = fira_jax.project_gradients(2, update_proj_gap=2)
    head = optax.chain(project, fira_jax.in_subspace(fira_jax.scale_by_adam(), projection=project))

    def coeffs_norms(grads_list):  # NumPy transcription: the global norm of the coefficients
        state, norms = head.init(params), []
        for g in grads_list:
            out, state = head.update(g, state)
            leaves = [out["w"].coeffs, out["v"].coeffs, out["b"]]
            norms.append(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))
        return norms

    plain = run(chain([], fira=False), params, grads, jit=False)
    clipped = run(chain([optax.clip_by_global_norm(max_norm)], fira=False), params, grads, jit=jit)
    for a, b, norm in zip(clipped, plain, coeffs_norms(grads), strict=True):
        factor = min(1.0, max_norm / norm)
        assert factor < 1.0  # the test must exercise clipping
        chex.assert_trees_all_close(a, jax.tree.map(lambda x, f=factor: f * x, b), rtol=1e-4, atol=1e-7)


def test_stateful_transform_there_raises_naming_in_subspace():
    params, grads = problem(steps=1)
    for middle in (optax.scale_by_adam(), optax.add_decayed_weights(0.1)):
        tx = chain([middle])
        with pytest.raises(ValueError, match="in_subspace"):
            tx.update(grads[0], tx.init(params), params)


def test_residual_before_in_subspace_raises():
    params, grads = problem(steps=1)
    project = fira_jax.project_gradients(2, 2)
    tx = optax.chain(
        project,
        fira_jax.scale_residual_by_norm_ratio(0.25),
        fira_jax.in_subspace(fira_jax.scale_by_adam(), projection=project),
        fira_jax.project_back(0.25),
    )
    with pytest.raises(ValueError, match=r"Leaf '[vw]' reached .* before fira_jax.in_subspace"):
        tx.update(grads[0], tx.init(params))


def test_limiter_before_residual_raises():
    params, grads = problem(steps=1)
    project = fira_jax.project_gradients(2, 2)
    tx = optax.chain(
        project,
        fira_jax.in_subspace(fira_jax.scale_by_adam(), projection=project),
        fira_jax.clip_by_norm_growth(1.01, projection=project),
        fira_jax.scale_residual_by_norm_ratio(0.25),
        fira_jax.project_back(0.25),
    )
    with pytest.raises(ValueError, match=r"put fira_jax\.scale_residual_by_norm_ratio before clip_by_norm_growth"):
        tx.update(grads[0], tx.init(params))
