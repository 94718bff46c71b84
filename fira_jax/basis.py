"""The orthonormal basis of each selected matrix's subspace, and how it is computed.

A refresh takes the top-r singular vectors of the gradient, in float32: by an exact SVD (as the
reference) or a randomized range finder; optionally with canonical signs; and never a non-finite
basis (a NaN/Inf gradient or a failed SVD keeps the previous one). Before the first refresh the
basis is the first r coordinate vectors.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fira_jax import sharding
from fira_jax.layout import Layout


@dataclasses.dataclass(frozen=True)
class Basis:
    """Orthonormal basis of one selected leaf's subspace.

    ``left`` is U[:, :r] (batch + (m, r)), used on the left and two-sided
    ("full") side; ``right`` is Vh[:r] (batch + (r, n)), used on the right and
    full side; the unused one is ``None``. ``layout`` is static.
    """

    left: jax.Array | None
    right: jax.Array | None
    layout: Layout

    def project(self, g: jax.Array) -> jax.Array:
        """Low-rank coordinates: ``G P^T`` (right), ``P^T G`` (left), ``U^T G V`` (full)."""
        out = g
        if self.left is not None:
            target = sharding.out_sharding(g, self.layout, "cols" if self.right is not None else "moments")
            out = jnp.einsum("...mr,...mn->...rn", self.left.astype(g.dtype), out, out_sharding=target)
        if self.right is not None:
            target = sharding.out_sharding(g, self.layout, "moments")
            out = jnp.einsum("...mn,...rn->...mr", out, self.right.astype(g.dtype), out_sharding=target)
        return out

    def back(self, x: jax.Array, like: jax.Array | None = None) -> jax.Array:
        """Back to the full space: ``X P`` (right), ``P X`` (left), ``U X V^T`` (full).

        ``like`` is the canonical gradient, whose sharding the result takes (explicit meshes).
        """
        target = None if like is None else sharding.out_sharding(like, self.layout, "dense")
        out = x
        if self.left is not None:
            mid = None if like is None or self.right is None else sharding.out_sharding(like, self.layout, "rows")
            out = jnp.einsum("...mr,...rn->...mn", self.left.astype(x.dtype), out, out_sharding=mid or target)
        if self.right is not None:
            out = jnp.einsum("...mr,...rn->...mn", out, self.right.astype(x.dtype), out_sharding=target)
        return out


jax.tree_util.register_dataclass(Basis, data_fields=["left", "right"], meta_fields=["layout"])


def default_basis(layout: Layout, dtype: Any) -> Basis:
    """A valid orthonormal basis (the first r coordinate vectors), used before the first refresh."""
    r = layout.rank
    left = right = None
    if layout.side in ("left", "full"):
        left = jnp.broadcast_to(jnp.eye(layout.m, r, dtype=dtype), (*layout.batch, layout.m, r))
    if layout.side in ("right", "full"):
        right = jnp.broadcast_to(jnp.eye(r, layout.n, dtype=dtype), (*layout.batch, r, layout.n))
    return Basis(left, right, layout)


def canonical_signs(u: jax.Array, vh: jax.Array, side: str) -> tuple[jax.Array, jax.Array]:
    """Makes the largest-magnitude entry of each basis vector positive.

    The sign is read from the vectors that form the basis (Vh's rows on the
    right side, U's columns otherwise) and applied to both U and Vh, so
    ``U diag(s) Vh`` is unchanged.
    """
    if side == "right":
        idx = jnp.argmax(jnp.abs(vh), axis=-1, keepdims=True)
        sign = jnp.take_along_axis(vh, idx, axis=-1)[..., 0]
    else:
        idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
        sign = jnp.take_along_axis(u, idx, axis=-2)[..., 0, :]
    sign = jnp.where(sign < 0, -1.0, 1.0).astype(u.dtype)
    return u * sign[..., None, :], vh * sign[..., :, None]


def randomized_svd(
    g: jax.Array, rank: int, side: str, key: jax.Array, oversample: int, power_iters: int
) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` singular vectors by a randomized range finder (Halko et al., 2011).

    Finds an orthonormal basis Q of the range of ``A G``-products with ``rank + oversample``
    Gaussian probes and ``power_iters`` QR-stabilized power iterations, then takes the SVD of
    the small ``Q^T A``. The side that forms the basis comes out orthonormal (a product of
    orthonormal factors). Returns ``(u, vh)`` shaped like ``svd(g)[0][..., :rank]`` and
    ``svd(g)[2][..., :rank, :]``.
    """
    a = jnp.swapaxes(g, -1, -2) if side == "right" else g  # range finder on the basis side
    p, q = a.shape[-2:]
    k = min(rank + oversample, p, q)
    omega = jax.random.normal(key, (*a.shape[:-2], q, k), a.dtype)
    basis, _ = jnp.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(jnp.swapaxes(a, -1, -2) @ basis)
        basis, _ = jnp.linalg.qr(a @ z)
    ub, _, vhb = jnp.linalg.svd(jnp.swapaxes(basis, -1, -2) @ a, full_matrices=False)
    u_a, vh_a = basis @ ub[..., :, :rank], vhb[..., :rank, :]
    if side == "right":
        return jnp.swapaxes(vh_a, -1, -2), jnp.swapaxes(u_a, -1, -2)
    return u_a, vh_a


def _top_vectors(
    g32: jax.Array, layout: Layout, signs: bool, svd: str, key: jax.Array | None, oversample: int, power_iters: int
) -> tuple[jax.Array, jax.Array]:
    """``(U[..., :, :r], Vh[..., :r, :])`` of float32 matrices ``g32`` by the chosen SVD."""
    r = layout.rank
    if svd == "randomized":
        u, vh = randomized_svd(g32, r, layout.side, key, oversample, power_iters)
    else:
        u, _, vh = jnp.linalg.svd(g32, full_matrices=False)
        u, vh = u[..., :, :r], vh[..., :r, :]
    if signs:
        u, vh = canonical_signs(u, vh, layout.side)
    return u, vh


def top_singular_basis(
    g: jax.Array,
    old: Basis,
    *,
    signs: bool = False,
    svd: str = "exact",
    key: jax.Array | None = None,
    oversample: int = 8,
    power_iters: int = 2,
) -> Basis:
    """Top-r singular vectors of the canonical gradient ``g``, in float32.

    The matrices of a stacked leaf (``batch + (m, n)``) are decomposed one after another
    (``lax.map``), so the refresh's float32 workspace is one matrix's, not the stack's; under
    explicit sharding of the stacking axes they are decomposed where they live, as one batch.
    Matrices whose gradient or new basis is not finite (a NaN/Inf gradient, or an SVD that
    failed) keep their previous basis ``old``.
    """
    layout = old.layout
    g32 = sharding.gather_matrix(g.astype(jnp.float32))
    spec = sharding.explicit_spec(g32)
    stacked_here = layout.batch and (spec is None or all(a is None for a in tuple(spec)[: len(layout.batch)]))
    if stacked_here:
        flat = g32.reshape(-1, layout.m, layout.n)
        keys = None if key is None else jax.random.split(key, flat.shape[0])

        def one(args: tuple[jax.Array, Any]) -> tuple[jax.Array, jax.Array]:
            x, k = args
            return _top_vectors(x, layout, signs, svd, k, oversample, power_iters)

        u, vh = jax.lax.map(one, (flat, keys))
        u = u.reshape(*layout.batch, *u.shape[1:])
        vh = vh.reshape(*layout.batch, *vh.shape[1:])
    else:
        u, vh = _top_vectors(g32, layout, signs, svd, key, oversample, power_iters)

    finite_g = jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True)

    def keep_finite(new: jax.Array, prev: jax.Array) -> jax.Array:
        ok = finite_g & jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
        return jnp.where(ok, new.astype(prev.dtype), prev)

    left = keep_finite(u, old.left) if old.left is not None else None
    right = keep_finite(vh, old.right) if old.right is not None else None
    return Basis(left, right, layout)
