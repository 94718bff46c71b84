"""Norm-based scaling of the residual (step 3 of Fira).

Fira's observation: the scaling factor of Adam, ||Adam(G)|| / ||G||, is
nearly the same whether it is measured on the full gradient or on its
low-rank projection. So the part of the gradient outside the subspace, which
Adam never sees, is scaled by the ratio measured inside it.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fira_jax import projection as proj
from fira_jax import sharding
from fira_jax._validation import check_choice

GRANULARITIES = ("column", "matrix", "none")
NORM_EPS = 1e-8  # the reference's constant in the denominators of the scaling factor and the limiter


@dataclasses.dataclass(frozen=True)
class Residual:
    r"""Fira's residual :math:`S = \phi \odot (G - s \cdot \text{back}(R))`, kept factored.

    ``phi`` broadcasts against the canonical gradient: ``batch + (m, 1)`` (one
    factor per row, right side), ``batch + (1, n)`` (per column, left side) or
    ``batch + (1, 1)`` (per matrix); :func:`fira_jax.clip_by_norm_growth`
    folds its limiter into it. ``residual_scale`` is ``s``.

    When ``phi`` runs along the axis that the basis does not touch (always,
    except for the reference's per-row factor of a square left-side
    projection), ``phi ⊙ back(X) = back(phi ⊙ X)``, so the update
    ``c · back(N) + S = phi ⊙ G + back(c · N - s · phi ⊙ R)`` needs a single
    product with the basis, and, P being orthonormal,
    ``||S||² = ||phi ⊙ G||² - (2s - s²) ||phi ⊙ R||²`` needs none: S is never
    formed. Otherwise (or with a basis stored below float32, which is not
    orthonormal enough for the identity) S is formed explicitly.
    """

    phi: jax.Array
    residual_scale: jax.Array

    def replace(self, **changes: Any) -> "Residual":
        return dataclasses.replace(self, **changes)

    def factored(self, node: proj.LowRank) -> bool:
        """Whether phi commutes with the basis (see the class docstring)."""
        side = node.layout.side
        return (side == "right" and self.phi.shape[-1] == 1) or (side == "left" and self.phi.shape[-2] == 1)

    def materialize(self, node: proj.LowRank) -> jax.Array:
        """S itself, in canonical ``batch + (m, n)`` form and the gradient's dtype."""
        g = node.grad
        s = self.residual_scale.astype(g.dtype)
        return self._phi_like_grad(node).astype(g.dtype) * (g - s * node.basis.back(node.low, like=g))

    def norm(self, node: proj.LowRank) -> jax.Array:
        """``||S||_F`` per matrix (shape ``batch``), in float32."""
        bases = [b for b in (node.basis.left, node.basis.right) if b is not None]
        precise = all(jnp.finfo(b.dtype).bits >= 32 for b in bases)
        if not (self.factored(node) and precise):
            return jnp.linalg.norm(self.materialize(node).astype(jnp.float32), axis=(-2, -1))
        s = self.residual_scale.astype(jnp.float32)
        phi_g2 = jnp.square(self._phi_like_grad(node).astype(jnp.float32))
        g2 = jnp.sum(phi_g2 * jnp.square(node.grad.astype(jnp.float32)), axis=(-2, -1))
        r2 = jnp.sum(jnp.square(self.phi.astype(jnp.float32)) * jnp.square(node.low.astype(jnp.float32)), axis=(-2, -1))
        return jnp.sqrt(jnp.maximum(g2 - (2 * s - s * s) * r2, 0.0))

    def add_to_update(self, node: proj.LowRank, scale: Any) -> jax.Array:
        """``scale · back(N) + S`` in canonical form (``scale``: :func:`fira_jax.project_back`'s)."""
        g = node.grad
        if not self.factored(node):
            return scale * node.basis.back(node.coeffs, like=g) + self.materialize(node)
        inner = scale * node.coeffs - self.residual_scale.astype(g.dtype) * self.phi.astype(g.dtype) * node.low
        return self._phi_like_grad(node).astype(g.dtype) * g + node.basis.back(inner.astype(g.dtype), like=g)

    def _phi_like_grad(self, node: proj.LowRank) -> jax.Array:
        """phi sharded to broadcast against G (explicit meshes; phi itself follows the low-rank arrays)."""
        kind = "rows" if self.phi.shape[-1] == 1 and self.phi.shape[-2] != 1 else "cols"
        if self.phi.shape[-2:] == (1, 1):
            kind = "norms"
        return sharding.match(
            self.phi, sharding.out_sharding(node.grad, node.layout, kind, 2 if kind == "norms" else 0)
        )


jax.tree_util.register_dataclass(Residual, data_fields=["phi", "residual_scale"], meta_fields=[])


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


def scale_residual_by_norm_ratio(
    residual_scale: float = 1.0, granularity: str = "column"
) -> optax.GradientTransformation:
    r"""Sets each :class:`LowRank` node's residual to the norm-scaled remainder of G.

    .. math::
      S = \phi \odot (G - s \cdot \text{back}(R)), \qquad
      \phi = \frac{\|N\|}{\|R\| + 10^{-8}}

    where ``R`` is the low-rank gradient, ``N`` the subspace optimizer's
    output, and ``back`` the projection back to the full space (see
    :func:`scaling_factor` for the axes), and ``s`` is ``residual_scale``. With ``s = 1`` the residual is the
    orthogonal complement ``(I - P P^T) G`` of the paper's equations. The
    reference implementation subtracts ``scale * P P^T G`` with the same
    ``scale`` as the update (0.25 in its runs), so that with s = 0.25 the
    residual keeps 75% of the in-subspace gradient; :func:`fira_jax.fira`
    does the same by default.

    Must follow :func:`fira_jax.in_subspace` in the chain. The residual is
    stored factored (:class:`Residual`): :func:`fira_jax.project_back` forms
    the update with one product with the basis instead of two. Unselected
    leaves pass through.

    Args:
      residual_scale: ``s``, the multiple of the in-subspace gradient removed
        from G.
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
        if not u.carried.in_subspace:
            raise ValueError(
                f"Leaf '{u.layout.path}' reached fira_jax.scale_residual_by_norm_ratio before "
                "fira_jax.in_subspace: the scaling factor ||N|| / ||R|| needs the subspace optimizer's "
                "output N. Put in_subspace(inner, projection=project) before scale_residual_by_norm_ratio."
            )
        return u.replace(residual=Residual(scaling_factor(u, granularity), jnp.asarray(residual_scale, jnp.float32)))

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree.map(residual, updates, is_leaf=proj.is_low_rank), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
