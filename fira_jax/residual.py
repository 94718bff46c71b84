"""Norm-based scaling of the residual (step 3 of Fira).

Fira's observation: the scaling factor of Adam, ||Adam(G)|| / ||G||, is
nearly the same whether it is measured on the full gradient or on its
low-rank projection. So the part of the gradient outside the subspace, which
Adam never sees, is scaled by the ratio measured inside it.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fira_jax import projection as proj
from fira_jax._validation import check_choice

GRANULARITIES = ("column", "matrix", "none")
NORM_EPS = 1e-8  # the reference's constant in the scaling factor's denominator


def _phi_axis(node: proj.LowRank) -> int:
    """The axis of the low-rank arrays that the norms reduce over.

    The reference reduces over axis 0 of ``low`` if ``low.shape[0] <
    low.shape[1]`` and over axis 1 otherwise, which is the rank axis except
    for a square ``low`` on the left side. Where that choice would not
    broadcast against G (the reference raises there), the rank axis is used.
    """
    a, b = node.low.shape[-2:]
    m, n = node.grad.shape[-2:]
    if a < b and b == n:
        return -2
    if a >= b and a == m:
        return -1
    return -1 if node.layout.side == "right" else -2


def scaling_factor(node: proj.LowRank, granularity: str = "column") -> jax.Array:
    r"""Fira's scaling factor :math:`\phi = \|N\| / (\|R\| + 10^{-8})`.

    ``N`` is the node's ``coeffs`` (the subspace optimizer's output) and ``R``
    its raw low-rank gradient ``low``. With ``granularity="column"`` the norms
    run over the rank axis, giving one factor per column (left side) or row
    (right side) of G; with ``"matrix"`` they are Frobenius norms, one factor
    per matrix; ``"none"`` gives ``phi = 1`` (the paper's "w/o scaling"
    ablation). The result broadcasts against the canonical gradient.
    """
    if granularity == "none":
        return jnp.ones((1, 1), jnp.float32)
    n = node.coeffs.astype(jnp.float32)
    r = node.low.astype(jnp.float32)
    axes = (-2, -1) if granularity == "matrix" else (_phi_axis(node),)
    return jnp.linalg.norm(n, axis=axes, keepdims=True) / (jnp.linalg.norm(r, axis=axes, keepdims=True) + NORM_EPS)


def scale_residual_by_norm_ratio(scale: float = 1.0, granularity: str = "column") -> optax.GradientTransformation:
    r"""Sets each :class:`LowRank` node's residual to the norm-scaled remainder of G.

    .. math::
      S = \phi \odot (G - \text{scale} \cdot \text{back}(R)), \qquad
      \phi = \frac{\|N\|}{\|R\| + 10^{-8}}

    where ``R`` is the low-rank gradient, ``N`` the subspace optimizer's
    output, and ``back`` the projection back to the full space (see
    :func:`scaling_factor` for the axes). With ``scale=1`` the residual is the
    orthogonal complement ``(I - P P^T) G`` of the paper's equations. The
    reference implementation subtracts ``scale * P P^T G`` with the same
    ``scale`` as the update (0.25 in its runs), so that with scale 0.25 the
    residual keeps 75% of the in-subspace gradient; :func:`fira_jax.fira`
    does the same by default.

    Must follow :func:`fira_jax.in_subspace` in the chain. Unselected leaves
    pass through.

    Args:
      scale: the multiple of the in-subspace gradient removed from G.
      granularity: ``"column"`` (Fira), ``"matrix"`` (the paper's
        matrix-level ablation) or ``"none"`` (``phi = 1``: the residual is
        added unscaled, the paper's "w/o scaling" ablation).

    Returns:
      A stateless ``optax.GradientTransformation``.

    References:
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
      Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024, Sec. 4.2.
    """
    check_choice("granularity", granularity, GRANULARITIES)

    def residual(u: Any) -> Any:
        if not proj.is_low_rank(u):
            return u
        if u.layout.side == "full":
            raise ValueError(
                f"Leaf '{u.layout.path}' uses proj_type 'full' (two-sided); Fira's residual "
                "scaling is only defined for one-sided projections."
            )
        phi = scaling_factor(u, granularity)
        s = phi * (u.grad - scale * u.basis.back(u.low)).astype(jnp.float32)
        return u.replace(residual=s.astype(u.grad.dtype))

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree.map(residual, updates, is_leaf=proj.is_low_rank), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
