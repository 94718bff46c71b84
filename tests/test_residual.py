"""scale_residual_by_norm_ratio: Fira's norm-based scaling, against NumPy."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax


def np_residual(g, p, n_upd, side, scale, granularity):
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
    return phi * (g - scale * back)


def make_node(shape, proj_type, seed=0, rank=3):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(np.float32)
    project = fira_jax.project_gradients(rank, 5, proj_type=proj_type)
    out, _ = project.update({"w": jnp.asarray(g)}, project.init({"w": jnp.zeros(shape)}))
    node = out["w"]
    # A stand-in for the subspace optimizer's output N, independent of low.
    n_upd = rng.standard_normal(node.low.shape).astype(np.float32)
    return g, node.replace(coeffs=jnp.asarray(n_upd), in_subspace=True), n_upd


@pytest.mark.parametrize(
    "shape_side", [((10, 6), "std"), ((6, 10), "std"), ((10, 6), "left"), ((6, 10), "right"), ((7, 7), "left")]
)
@pytest.mark.parametrize("scale", [0.25, 1.0])
@pytest.mark.parametrize("granularity", ["column", "matrix", "none"])
def test_matches_numpy(variant, shape_side, scale, granularity):
    shape, proj_type = shape_side
    g, node, n_upd = make_node(shape, proj_type)
    tx = fira_jax.scale_residual_by_norm_ratio(scale, granularity)

    def residual(coeffs):  # the node's arrays enter and leave the jitted function as arrays
        out, _ = tx.update({"w": node.replace(coeffs=coeffs)}, optax.EmptyState())
        return out["w"].residual.materialize(out["w"])

    side = node.layout.side
    p = np.asarray(node.basis.right if side == "right" else node.basis.left)
    expected = np_residual(g, p, n_upd, side, scale, granularity)
    chex.assert_trees_all_close(
        variant(residual)(node.coeffs), jnp.asarray(expected, jnp.float32), rtol=1e-4, atol=1e-5
    )


def test_full_rank_left_square_low_follows_reference_axis():
    """Left side with r == n == m: low is square and the reference takes one factor per row."""
    g, node, n_upd = make_node((5, 5), "left", rank=5)
    out, _ = fira_jax.scale_residual_by_norm_ratio(0.25).update({"w": node}, optax.EmptyState())
    expected = np_residual(g, np.asarray(node.basis.left), n_upd, "left", 0.25, "column")
    chex.assert_trees_all_close(
        out["w"].residual.materialize(out["w"]), jnp.asarray(expected, jnp.float32), rtol=1e-4, atol=1e-5
    )


def test_full_rank_left_tall_uses_rank_axis():
    """Left side with r == n < m: the reference's row rule would not broadcast; the rank axis is used."""
    g, node, n_upd = make_node((8, 4), "left", rank=4)
    out, _ = fira_jax.scale_residual_by_norm_ratio(1.0).update({"w": node}, optax.EmptyState())
    p = np.asarray(node.basis.left)
    low = p.T @ g
    phi = np.linalg.norm(n_upd, axis=0) / (np.linalg.norm(low, axis=0) + 1e-8)
    chex.assert_trees_all_close(
        out["w"].residual.materialize(out["w"]),
        jnp.asarray(phi[None, :] * (g - p @ low), jnp.float32),
        rtol=1e-4,
        atol=1e-5,
    )


def test_unselected_leaves_pass_and_full_raises():
    out, _ = fira_jax.scale_residual_by_norm_ratio().update({"b": jnp.ones(3)}, optax.EmptyState())
    assert out["b"].shape == (3,)
    project = fira_jax.project_gradients(2, 5, proj_type="full")
    nodes, _ = project.update({"w": jnp.ones((4, 3))}, project.init({"w": jnp.zeros((4, 3))}))
    with pytest.raises(ValueError, match=r"'w'.*full"):
        fira_jax.scale_residual_by_norm_ratio().update(nodes, optax.EmptyState())


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        fira_jax.scale_residual_by_norm_ratio(granularity="row")
