r"""Norm-based scaling of the residual (step 3 of Fira) and the update it gives (step 5).

Fira's observation: the scaling factor of Adam, ||Adam(G)|| / ||G||, is nearly the same whether
it is measured on the full gradient or on its low-rank projection. So the part of the gradient
outside the subspace, which Adam never sees, is scaled by the ratio measured inside it:

.. math::
  \phi = \frac{\|N\|}{\|R\| + 10^{-8}}, \qquad S = \phi \odot (G - s \cdot \text{back}(R)),
  \qquad U = c \cdot \text{back}(N) + S

with R the low-rank gradient, N the subspace optimizer's output, ``back`` the projection back
to the full space (:meth:`fira_jax.Basis.back`), ``s`` the ``residual_scale`` and ``c`` the
update's ``scale``. Every function here takes canonical ``batch + (m, n)`` gradients and the
leaf's :class:`fira_jax.Basis`, and returns arrays.

When phi runs along the axis that the basis does not touch (always, except for the reference's
per-row factor of a square left-side projection), ``phi ⊙ back(X) = back(phi ⊙ X)``, so
``U = phi ⊙ G + back(c · N - s · phi ⊙ R)`` needs a single product with the basis and, P being
orthonormal, ``||S||² = ||phi ⊙ G||² - (2s - s²) ||phi ⊙ R||²`` needs none: S is never formed.
Otherwise (or with a basis stored below float32, not orthonormal enough for the identity) S is
formed explicitly.
"""

from typing import Any

import jax
import jax.numpy as jnp

from fira_jax._src import sharding
from fira_jax._src.basis import Basis
from fira_jax._src.layout import Layout
from fira_jax._src.options import Granularity, Residual

NORM_EPS = 1e-8  # the reference's constant in the denominators of the scaling factor and the limiter
# residual_norm forms the complement when the shortcut keeps less than this share of ||phi G||^2
# (its relative error is then at most about eps32 / CANCELLATION).
CANCELLATION = 0.25


def _phi_axis(low: jax.Array, layout: Layout) -> int:
    """The axis of the low-rank arrays that the column norms reduce over.

    The reference reduces over axis 0 of ``low`` if ``low.shape[0] < low.shape[1]`` and over
    axis 1 otherwise, which is the rank axis except for a square ``low`` on the left side. Where
    that choice would not broadcast against G (the reference raises there), the rank axis is used.
    """
    a, b = low.shape[-2:]
    if a < b and b == layout.n:
        return -2
    if a >= b and a == layout.m:
        return -1
    return -1 if layout.side == "right" else -2


def scaling_factor(
    coeffs: jax.Array, low: jax.Array, layout: Layout, granularity: Granularity = Residual.granularity
) -> jax.Array:
    r"""Fira's scaling factor :math:`\phi = \|N\| / (\|R\| + 10^{-8})`, in float32.

    Args:
      coeffs: N, the subspace optimizer's output (the low-rank shape).
      low: R, the low-rank gradient.
      layout: the leaf's :class:`fira_jax.Layout` (its side and matrix shape).
      granularity: ``"column"``: norms over the rank axis, one factor per column (left side) or
        row (right side) of G; ``"matrix"``: Frobenius norms, one factor per matrix;
        ``"none"``: ``phi = 1`` (the paper's "w/o scaling" ablation).

    Returns:
      phi, of shape ``batch + (m, 1)``, ``batch + (1, n)`` or ``batch + (1, 1)``; it
      broadcasts against the canonical gradient.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> lay = fira_jax.Layout("w", (1, 4), (0, 1), 1, (), 1, 4, 2, "right")  # a 1 x 4 G, rank 2
      >>> n, r = jnp.array([[3.0, 4.0]]), jnp.array([[1.0, 0.0]])
      >>> fira_jax.scaling_factor(n, r, lay)  # ||N|| / ||R|| = 5 / 1 for G's one row
      Array([[5.]], dtype=float32)
    """
    if granularity == "none":
        return jnp.ones((1, 1), jnp.float32)
    n, r = coeffs.astype(jnp.float32), low.astype(jnp.float32)
    axes = (-2, -1) if granularity == "matrix" else (_phi_axis(low, layout),)
    return jnp.linalg.norm(n, axis=axes, keepdims=True) / (jnp.linalg.norm(r, axis=axes, keepdims=True) + NORM_EPS)


def _factored(phi: jax.Array, side: str) -> bool:
    """Whether phi commutes with the basis (see the module docstring)."""
    return (side == "right" and phi.shape[-1] == 1) or (side == "left" and phi.shape[-2] == 1)


def _like_grad(phi: jax.Array, grad: jax.Array, layout: Layout) -> jax.Array:
    """phi sharded to broadcast against G (explicit meshes; phi itself follows the low-rank arrays)."""
    kind = "rows" if phi.shape[-1] == 1 and phi.shape[-2] != 1 else "cols"
    if phi.shape[-2:] == (1, 1):
        kind = "norms"
    return sharding.match(phi, sharding.out_sharding(grad, layout, kind, 2 if kind == "norms" else 0))


def scaled_gradient(grad: jax.Array, phi: jax.Array, layout: Layout) -> jax.Array:
    r"""APOLLO's update before its limiter: the whole gradient scaled, :math:`\phi \odot G`, in G's dtype.

    APOLLO (Zhu et al., 2025) keeps Fira's scaling factor and drops the projection back: with
    ``phi`` measured in a random subspace (:func:`scaling_factor`; channel-wise is Fira's
    ``"column"``, tensor-wise its ``"matrix"``), the update is ``phi ⊙ G``, the limiter's
    divisor and ``sqrt(scale)`` applied after. It is Fira's :func:`residual` with
    ``residual_scale = 0``, without the product with the basis.

    Args:
      grad: G, canonical ``batch + (m, n)``.
      phi: the scaling factor, broadcasting against G.
      layout: the leaf's :class:`fira_jax.Layout`.

    Returns:
      ``phi ⊙ G``, canonical, in G's dtype.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> lay = fira_jax.Layout("w", (2, 2), (0, 1), 1, (), 2, 2, 1, "right")
      >>> fira_jax.scaled_gradient(jnp.ones((2, 2)), jnp.array([[2.0], [3.0]]), lay)  # one factor per row
      Array([[2., 2.],
             [3., 3.]], dtype=float32)
    """
    return _like_grad(phi, grad, layout).astype(grad.dtype) * grad


def residual(grad: jax.Array, low: jax.Array, basis: Basis, phi: jax.Array, residual_scale: Any) -> jax.Array:
    r"""Fira's residual :math:`S = \phi \odot (G - s \cdot \text{back}(R))`, formed, in G's dtype.

    With ``s = 1`` it is the orthogonal complement ``(I - P P^T) G`` of the paper's equations,
    scaled; the reference subtracts ``scale * P P^T G`` with the update's ``scale`` (0.25 in its
    runs), which :func:`fira_jax.fira` follows by default.

    Args:
      grad: G, canonical ``batch + (m, n)``.
      low: R, the low-rank gradient.
      basis: the leaf's basis P.
      phi: the scaling factor (:func:`scaling_factor`), the limiter's factor folded in.
      residual_scale: ``s``.

    Returns:
      S, canonical, in G's dtype.
    """
    s = jnp.asarray(residual_scale, jnp.float32).astype(grad.dtype)
    return scaled_gradient(grad - s * basis.back(low, like=grad), phi, basis.layout)


def residual_norm(grad: jax.Array, low: jax.Array, basis: Basis, phi: jax.Array, residual_scale: Any) -> jax.Array:
    r"""``||S||_F`` of :func:`residual` per matrix (shape ``batch``), in float32.

    Where the factored identity holds (module docstring), S is not formed:
    :math:`\|S\|^2 = \|\phi G\|^2 - (2s - s^2) \|\phi R\|^2`. That difference cancels when
    ``s`` is near 1 and G lies almost inside the subspace (the paper's form of the residual, s = 1,
    right after a refresh), so when it falls below ``CANCELLATION`` (1/4) of
    :math:`\|\phi G\|^2` the complement :math:`E = G - \text{back}(R)` is formed instead and
    :math:`\|S\|^2 = (1 - s)^2 \|\phi R\|^2 + \|\phi E\|^2`, a sum of two non-negative terms
    (one more product with the basis, only then: a ``lax.cond``, built only where ``s`` can
    exceed 1/2).

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> from fira_jax._src.basis import Basis
      >>> lay = fira_jax.Layout("w", (1, 2), (0, 1), 1, (), 1, 2, 1, "right")
      >>> basis = Basis(None, jnp.array([[1.0, 0.0]]), lay)  # the subspace: G's first coordinate
      >>> g = jnp.array([[1.0, 1e-4]])  # almost inside it
      >>> norm = fira_jax.residual_norm(g, basis.project(g), basis, jnp.ones((1, 1)), 1.0)
      >>> round(float(norm), 10)  # the 1e-4 outside (the shortcut 1 + 1e-8 - 1 would give 0 in float32)
      0.0001
    """
    bases = [b for b in (basis.left, basis.right) if b is not None]
    precise = all(jnp.finfo(b.dtype).bits >= 32 for b in bases)
    if not (_factored(phi, basis.layout.side) and precise):
        s_full = residual(grad, low, basis, phi, residual_scale)
        return jnp.linalg.norm(s_full.astype(jnp.float32), axis=(-2, -1))
    s = jnp.asarray(residual_scale, jnp.float32)
    phi_g2 = jnp.square(_like_grad(phi, grad, basis.layout).astype(jnp.float32))
    g2 = jnp.sum(phi_g2 * jnp.square(grad.astype(jnp.float32)), axis=(-2, -1))
    # phi is constant along R's rank axis: ||phi R||^2 = sum of phi^2 ||R_j||^2 over R's other axis,
    # whose column sums of squares are those scaling_factor took (one pass over R, not two).
    r = low.astype(jnp.float32)
    rank_axis = -2 if basis.layout.side == "left" else -1
    phi2 = jnp.squeeze(jnp.square(phi.astype(jnp.float32)), rank_axis)
    r2 = jnp.sum(phi2 * jnp.sum(r * r, axis=rank_axis), axis=-1)
    shortcut = g2 - (2 * s - s * s) * r2

    def formed() -> jax.Array:
        g = grad.astype(jnp.float32)
        complement = g - basis.back(low.astype(jnp.float32), like=g)
        return jnp.square(1 - s) * r2 + jnp.sum(phi_g2 * jnp.square(complement), axis=(-2, -1))

    if not _may_cancel(residual_scale):  # s <= 1/2: the shortcut keeps at least a quarter, always
        return jnp.sqrt(jnp.maximum(shortcut, 0.0))
    exact = jax.lax.cond(jnp.all(shortcut >= CANCELLATION * g2), lambda: shortcut, formed)
    return jnp.sqrt(jnp.maximum(exact, 0.0))


def _may_cancel(residual_scale: Any) -> bool:
    """Whether the shortcut can keep under :data:`CANCELLATION` of ``||phi G||^2``: ``2s - s^2`` above
    ``1 - CANCELLATION`` (``||phi R|| <= ||phi G||``, P being orthonormal), or ``s`` known only when
    traced. Else no ``lax.cond`` is built: the default ``s = 0.25`` compiles as before."""
    try:
        value = float(residual_scale)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return True
    return 2 * value - value * value > 1 - CANCELLATION


def fira_update(
    grad: jax.Array, low: jax.Array, coeffs: jax.Array, basis: Basis, phi: jax.Array, residual_scale: Any,
    scale: Any,
) -> jax.Array:  # fmt: skip
    r"""Fira's update :math:`U = c \cdot \text{back}(N) + S` (step 5), canonical, in G's dtype.

    Args:
      grad: G, canonical ``batch + (m, n)``.
      low: R, the low-rank gradient.
      coeffs: N, the subspace optimizer's output.
      basis: the leaf's basis P.
      phi: the scaling factor, the limiter's factor folded in.
      residual_scale: ``s`` of :func:`residual`.
      scale: ``c``, the low-rank update's scale (``alpha``; 0.25 in the papers).

    Returns:
      U, canonical, in G's dtype.
    """
    if not _factored(phi, basis.layout.side):
        return scale * basis.back(coeffs, like=grad) + residual(grad, low, basis, phi, residual_scale)
    s = jnp.asarray(residual_scale, jnp.float32).astype(grad.dtype)
    inner = scale * coeffs - s * phi.astype(grad.dtype) * low
    phi_g = _like_grad(phi, grad, basis.layout).astype(grad.dtype) * grad
    return phi_g + basis.back(inner.astype(grad.dtype), like=grad)
