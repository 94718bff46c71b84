"""The orthonormal basis of each selected matrix's subspace, and how it is computed.

A refresh takes the top-r singular vectors of the gradient, in float32: by an exact SVD (as the
reference), a randomized range finder, the eigenvectors of the Gram matrix, or a subspace
iteration warm-started from the previous basis; optionally with canonical signs; and never a
non-finite basis (a NaN/Inf gradient or a failed SVD keeps the previous one). APOLLO's refresh
draws a Gaussian random projection instead (:func:`random_projection`). Before the first refresh
the basis is the first r coordinate vectors.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from fira_jax._src import sharding
from fira_jax._src.layout import Layout

SvdMethod = Literal["exact", "randomized", "gram", "subspace"]  # how a refresh computes the top singular vectors
SVD_METHODS: tuple[str, ...] = get_args(SvdMethod)
Method = Literal["exact", "randomized", "gram", "subspace", "random"]  # a refresh's: an SVD method, or APOLLO's
METHODS: tuple[str, ...] = get_args(Method)
# Refresh methods that draw random numbers (they need a key per matrix); "random" is APOLLO's projection.
RANDOM_METHODS = ("randomized", "subspace", "random")


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


def matrix_normal(key: jax.Array, batch: tuple[int, ...], tail: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal draws of shape ``batch + tail``: one ``tail``-shaped draw per matrix from its
    own key where ``key`` has shape ``batch`` (so a matrix draws the same numbers alone or in its
    stack), else one draw from the single ``key``."""
    if key.ndim and tuple(key.shape) == tuple(batch):
        draw = jax.vmap(lambda k: jax.random.normal(k, tail, dtype))(key.reshape(-1))
        return draw.reshape(*batch, *tail)
    return jax.random.normal(key, (*batch, *tail), dtype)


def _signs(x: jax.Array, axis: int) -> jax.Array:
    """+1 or -1 per vector of ``x`` along ``axis``: the sign of its largest-magnitude entry (+1
    where the largest positive and negative entries tie in magnitude).

    That entry is the vector's maximum or its minimum: two plain reductions, which compile to a
    fraction of an argmax and a gather.
    """
    largest_is_positive = jnp.max(x, axis=axis) >= -jnp.min(x, axis=axis)
    return jnp.where(largest_is_positive, 1.0, -1.0).astype(x.dtype)


def canonical_signs(u: jax.Array | None, vh: jax.Array | None, side: str) -> tuple[jax.Array, jax.Array]:
    """Makes the largest-magnitude entry of each basis vector positive.

    The sign is read from the vectors that form the basis (Vh's rows on the
    right side, U's columns otherwise) and applied to both U and Vh, so
    ``U diag(s) Vh`` is unchanged. A side given as None (the Gram eigenvectors
    compute only the sides they need) gets its own signs.
    """
    if u is None or vh is None:
        return (None if u is None else u * _signs(u, -2)[..., None, :],
                None if vh is None else vh * _signs(vh, -1)[..., :, None])  # fmt: skip
    sign = _signs(vh, -1) if side == "right" else _signs(u, -2)
    return u * sign[..., None, :], vh * sign[..., :, None]


def randomized_svd(
    g: jax.Array,
    rank: int,
    side: str,
    key: jax.Array,
    oversample: int,
    power_iters: int,
    start: jax.Array | None = None,
    both: bool = True,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Top-``rank`` singular vectors by a randomized range finder (Halko et al., 2011).

    Finds an orthonormal basis Q of the range of ``A G``-products with ``rank + oversample``
    Gaussian probes and ``power_iters`` power iterations ``Q = qr(A A^T Q)``, then takes the SVD
    of the small ``Q^T A``. Each iteration orthonormalizes once, on the basis side, not also after
    ``A^T Q`` (the other side, the longer one under ``proj_type="std"``): that costs the squared
    condition number within an iteration, which in float32 blurs only directions whose singular
    values are below about ``3e-4`` of the largest, whose share of the energy is below ``1e-7``;
    and it saves the largest QR (at 4096 x 11008, rank 1024, on a CPU: 5.5 s -> 3.9 s). The side
    that forms the basis comes out orthonormal (a product of orthonormal factors). Returns
    ``(u, vh)`` shaped like ``svd(g)[0][..., :rank]`` and ``svd(g)[2][..., :rank, :]``. ``key``:
    one key, or one per matrix (shape ``g.shape[:-2]``).

    With ``start`` (the previous basis's vectors, ``p × rank`` with ``p`` their length), the
    iteration starts from that subspace plus ``oversample`` Gaussian probes instead of
    ``rank + oversample`` probes: a warm-started subspace iteration, which needs fewer power
    iterations when the gradient's top subspace moves slowly between refreshes.

    ``both=False`` computes only the side that forms the basis (``vh`` on the right side, ``u``
    otherwise; the other comes back None), from the eigenvectors of ``B B^T`` with ``B = Q^T A``
    instead of the SVD of ``B``: a ``(rank + oversample)``-square eigendecomposition in place of
    the SVD of a ``(rank + oversample) x q`` matrix, about 3 x cheaper at 7B shapes on a CPU.
    """
    a = _oriented(g, side)  # range finder on the basis side
    p, q = a.shape[-2:]
    k = min(rank + oversample, p, q)
    ops = _products(a)
    basis = _range_basis(ops, _start_block(ops, k, key, None if start is None else start.astype(a.dtype)), power_iters)
    if both:
        ub, _, vhb = jnp.linalg.svd(jnp.swapaxes(basis, -1, -2) @ a, full_matrices=False)  # of Q^T A
        u_a, vh_a = basis @ ub[..., :, :rank], vhb[..., :rank, :]
    else:  # only the basis side: the top eigenvectors of the small Gram matrix, cheaper than its SVD
        u_a, vh_a = _ritz_columns(ops, basis, rank), None
    if side == "right":
        return (None if vh_a is None else jnp.swapaxes(vh_a, -1, -2)), jnp.swapaxes(u_a, -1, -2)
    return u_a, vh_a


def _oriented(g: jax.Array, side: str) -> jax.Array:
    """``A``, the matrix whose columns' span the basis describes: ``G^T`` on the right side, else
    ``G``. Its top left singular vectors are the basis's vectors, as columns."""
    return jnp.swapaxes(g, -1, -2) if side == "right" else g


class _Products(NamedTuple):
    """The products with ``A`` (``p x q``, :func:`_oriented`) that a refresh by the Gram matrix,
    the range finder or the subspace iteration needs: the only places those methods touch the
    gradient. A refresh that serves leaves of several shapes with one compiled decomposition
    picks each product by leaf (:func:`_picked_products`); everything else is ``p``-sized."""

    gram: Callable[[], jax.Array]  # A A^T                      (p x p)
    probes: Callable[[jax.Array, int], jax.Array]  # A Omega, Omega q x k Gaussian from the key   (p x k)
    power: Callable[[jax.Array], jax.Array]  # A A^T Q           (p x k)
    small_gram: Callable[[jax.Array], jax.Array]  # (Q^T A)(Q^T A)^T   (k x k)


def _products(a: jax.Array) -> _Products:
    """:class:`_Products` of the array ``a`` (batch dimensions allowed)."""
    at = jnp.swapaxes(a, -1, -2)

    def small_gram(basis: jax.Array) -> jax.Array:
        b = jnp.swapaxes(basis, -1, -2) @ a
        return b @ jnp.swapaxes(b, -1, -2)

    def probes(key: jax.Array, k: int) -> jax.Array:
        return a @ matrix_normal(key, a.shape[:-2], (a.shape[-1], k), a.dtype)

    return _Products(lambda: a @ at, probes, lambda basis: a @ (at @ basis), small_gram)


def _start_block(ops: _Products, k: int, key: jax.Array, start: jax.Array | None) -> jax.Array:
    """The range finder's ``p x k`` start: ``A`` times ``k`` Gaussian probes, or ``start`` (the
    previous basis's vectors) beside ``A`` times ``k - start.shape[-1]`` probes."""
    if start is None:
        return ops.probes(key, k)
    return jnp.concatenate([start, ops.probes(key, k - start.shape[-1])], axis=-1)


def _range_basis(ops: _Products, block: jax.Array, power_iters: int) -> jax.Array:
    """An orthonormal basis of ``A``'s dominant range from a start ``block`` (:func:`_start_block`):
    its QR, then ``power_iters`` iterations ``Q = qr(A A^T Q)``."""
    basis, _ = jnp.linalg.qr(block)
    for _ in range(power_iters):  # one QR per iteration, on the basis side (randomized_svd)
        basis, _ = jnp.linalg.qr(ops.power(basis))
    return basis


def _ritz_columns(ops: _Products, basis: jax.Array, rank: int) -> jax.Array:
    """Rayleigh-Ritz on the basis side: ``Q`` times the top eigenvectors of ``(Q^T A)(Q^T A)^T``."""
    return basis @ _top_eigenvectors(ops.small_gram(basis), rank)


def subspace_iteration(
    g: jax.Array, previous: jax.Array, rank: int, side: str, key: jax.Array, oversample: int, power_iters: int,
    both: bool = True,
) -> tuple[jax.Array | None, jax.Array | None]:  # fmt: skip
    r"""Top-``rank`` singular vectors by a subspace iteration warm-started from the previous basis.

    With :math:`A = G^\top` (right side) or :math:`G` (left side) and :math:`Q_0` an orthonormal
    basis of the previous basis's span and ``oversample`` Gaussian directions of :math:`A`'s range,

    .. math::
      Q_{i+1} = \operatorname{qr}(A A^\top Q_i), \quad i < \text{power\_iters},
      \qquad U_r \Sigma_r V_r^\top \approx \operatorname{svd}(Q^\top A)

    (Rayleigh-Ritz). Each iteration costs two products with G, ``O(m n (r + oversample))``, against
    ``O(m n min(m, n))`` for an exact SVD. The gradient's top subspace moves slowly between
    refreshes, so the previous basis is a good start and one iteration usually suffices.

    Args:
      g: the float32 gradient, ``batch + (m, n)``.
      previous: the previous basis's vectors as columns, ``batch + (p, rank)`` (``p = n`` on the
        right side, ``m`` on the left).
      rank: how many singular vectors.
      side: ``"left"``, ``"right"`` or ``"full"`` (the left vectors start the iteration).
      key: the Gaussian probes' key.
      oversample: how many Gaussian probes join the previous basis.
      power_iters: how many iterations (≥ 0).
      both: False: only the side that forms the basis (the other None), by a cheaper Rayleigh-Ritz
        step (:func:`randomized_svd`).

    Returns:
      ``(u, vh)`` shaped like ``svd(g)[0][..., :rank]`` and ``svd(g)[2][..., :rank, :]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fira_jax._src.basis import subspace_iteration
      >>> g = jax.random.normal(jax.random.key(0), (16, 8))
      >>> vh_exact = jnp.linalg.svd(g, full_matrices=False)[2][:2]
      >>> _, vh = subspace_iteration(g, vh_exact.T, 2, "right", jax.random.key(1), 2, 1)
      >>> float(jnp.abs(vh @ vh_exact.T).max(axis=1).min()) > 0.999  # started at the answer: stays
      True
    """
    return randomized_svd(g, rank, side, key, oversample, power_iters, start=previous, both=both)


def random_projection(key: jax.Array, layout: Layout, dtype: Any = jnp.float32) -> Basis:
    r"""APOLLO's projection: a Gaussian random matrix with entries of variance ``1 / rank``.

    .. math::
      P \in \mathbb{R}^{r \times n} \ (\text{right}) \ \text{or} \ \mathbb{R}^{m \times r} \
      (\text{left}), \qquad P_{ij} \sim \mathcal{N}(0, 1/r)

    so that ``E[P^T P] = I`` (right side): the projection preserves norms in expectation
    (Johnson-Lindenstrauss) without an SVD. It is not orthonormal and does not depend on the
    gradient; APOLLO draws a new one from a fresh seed every ``update_proj_gap`` steps.

    Args:
      key: the PRNG key of this leaf and refresh, or one key per matrix (shape ``layout.batch``:
        each matrix then draws what it would draw alone).
      layout: the leaf's :class:`fira_jax.Layout` (its ``batch``, matrix shape, rank and side;
        ``"full"`` is not supported).
      dtype: the stored projection's dtype (drawn in float32, then cast, as the reference).

    Returns:
      A :class:`fira_jax.Basis` whose ``left`` (``batch + (m, r)``) or ``right`` (``batch + (r, n)``) is
      the projection.

    Example:
      >>> import jax, fira_jax
      >>> from fira_jax._src.basis import random_projection
      >>> lay = fira_jax.Layout("w", (512, 256), (0, 1), 1, (), 512, 256, 64, "right")
      >>> p = random_projection(jax.random.key(0), lay).right
      >>> p.shape, round(float(p.var() * 64), 1)  # variance 1 / rank
      ((64, 256), 1.0)
    """
    r = layout.rank
    if layout.side == "right":
        shape = (*layout.batch, r, layout.n)
    elif layout.side == "left":
        shape = (*layout.batch, layout.m, r)
    else:
        raise ValueError(f"a random projection is one-sided; leaf '{layout.path}' has side {layout.side!r}")
    p = (matrix_normal(key, layout.batch, shape[len(layout.batch) :], jnp.float32) / math.sqrt(r)).astype(dtype)
    return Basis(p if layout.side == "left" else None, p if layout.side == "right" else None, layout)


def gram_top_vectors(g: jax.Array, rank: int, side: str) -> tuple[jax.Array | None, jax.Array | None]:
    r"""Top-``rank`` singular vectors of ``g`` from the eigenvectors of its Gram matrix.

    .. math::
      G^\top G = V \Sigma^2 V^\top \ (\text{right side}), \qquad
      G G^\top = U \Sigma^2 U^\top \ (\text{left side})

    The Gram matrix of the basis side is as small as the basis's vectors are long, and its
    symmetric eigendecomposition compiles in seconds on TPU (one-sided Jacobi), where the TPU's
    SVD is a program that takes minutes to compile per matrix shape (jax-ml/jax#28315); CPU and
    GPU use LAPACK / cuSOLVER. Squaring the singular values makes the vectors near the rank
    cutoff less accurate than an SVD's (by about ``s_1 / s_r``); the subspace of a gradient whose
    spectrum decays is unaffected in practice. Returns ``(U[..., :, :r], None)`` (left),
    ``(None, Vh[..., :r, :])`` (right) or both (full), largest first.
    """

    u = _top_eigenvectors(_products(g).gram(), rank) if side in ("left", "full") else None
    vh = None
    if side in ("right", "full"):
        vh = jnp.swapaxes(_top_eigenvectors(_products(_oriented(g, "right")).gram(), rank), -1, -2)
    return u, vh


def _top_eigenvectors(a: jax.Array, rank: int) -> jax.Array:
    """The ``rank`` eigenvectors of the symmetric ``a`` with the largest eigenvalues, largest first, as
    columns (one-sided Jacobi on TPU, whose default eigendecomposition compiles slowly; LAPACK / cuSOLVER
    elsewhere).

    The eigendecomposition leaves its eigenpairs unsorted, and the ``rank`` largest are picked by
    ``top_k``: sorting all ``p`` pairs moves every vector through a sort, which on the TPU
    compiler costs a 4096-square eigendecomposition a third of its compile time (9.4 s against
    6.3 s on libtpu 0.0.42.1). On eigenvalues that come back ascending (LAPACK, cuSOLVER), the
    pick equals the last ``rank`` reversed, ties included.
    """

    def jacobi(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.lax.linalg.eigh(a, implementation=jax.lax.linalg.EighImplementation.JACOBI, sort_eigenvalues=False)

    def default(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.lax.linalg.eigh(a, sort_eigenvalues=False)

    vecs, vals = jax.lax.platform_dependent(a, tpu=jacobi, default=default)
    p = a.shape[-1]
    _, reversed_index = jax.lax.top_k(vals[..., ::-1], rank)  # ties: the later eigenpair first
    return jnp.take_along_axis(vecs, (p - 1 - reversed_index)[..., None, :], axis=-1)


def _previous_columns(old: Basis) -> jax.Array:
    """The vectors of the side that starts a subspace iteration, as columns: ``batch + (p, r)``, in
    the basis's dtype (the iteration casts one matrix at a time)."""
    if old.left is not None:
        return old.left
    return jnp.swapaxes(old.right, -1, -2)


def _indexers(stacks: list[jax.Array]) -> list:
    """One function per ``(k, ...)`` stack: ``j -> stack[j]``, for ``lax.switch`` over the leaves."""
    return [lambda j, f=f: jax.lax.dynamic_index_in_dim(f, j, keepdims=False) for f in stacks]


def _top_vectors(
    g32: jax.Array,
    layout: Layout,
    signs: bool,
    svd: str,
    key: jax.Array | None,
    oversample: int,
    power_iters: int,
    previous: jax.Array | None = None,
    first: Any = True,
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(U[..., :, :r], Vh[..., :r, :])`` of float32 matrices ``g32`` by the chosen method.

    ``previous`` (the old basis's vectors as columns) and ``first`` (no basis computed yet) are
    used by ``"subspace"`` only; ``"random"`` (APOLLO) ignores ``g32`` and draws a projection.
    """
    r = layout.rank
    if svd == "random":
        b = random_projection(key, layout._replace(batch=tuple(g32.shape[:-2])))
        return b.left, b.right
    both = layout.side == "full"  # one-sided bases need one side's vectors only
    if svd == "randomized":
        u, vh = randomized_svd(g32, r, layout.side, key, oversample, power_iters, both=both)
    elif svd == "subspace":
        u, vh = jax.lax.cond(
            first,
            lambda: randomized_svd(g32, r, layout.side, key, oversample, power_iters, both=both),
            lambda: subspace_iteration(g32, previous, r, layout.side, key, oversample, power_iters, both=both),
        )
    elif svd == "gram":
        u, vh = gram_top_vectors(g32, r, layout.side)
    else:
        u, _, vh = jnp.linalg.svd(g32, full_matrices=False)
        u, vh = u[..., :, :r], vh[..., :r, :]
    if signs:
        u, vh = canonical_signs(u, vh, layout.side)
    return u, vh


def top_singular_bases(
    grads: list[jax.Array],
    olds: list[Basis],
    *,
    signs: bool = False,
    svd: str = "exact",
    keys: list[jax.Array] | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    first: Any = True,
    spread: bool = True,
) -> list[Basis]:
    """Top-r singular vectors of canonical gradients, in float32, with as few compiled decompositions
    as their shapes allow.

    ``grads[i]`` (``batch + (m, n)``) gets a new basis from ``olds[i]``. The leaves are split into
    *sites* (``site_key``), and every matrix of a site, of every leaf and of every stacked
    leaf, goes through one ``lax.map`` body, one after another: the decomposition is compiled
    once per site (the TPU compiler expands every SVD or eigendecomposition call site into its own
    program) and its float32 workspace is one matrix's. The exact SVD and APOLLO's projection have
    one site per matrix shape and side. The Gram, randomized and subspace refreshes of one-sided
    bases have one per length of the basis's vectors (and rank): they decompose ``A = G^T``
    (right side) or ``G`` (left side), whose products with the gradient are the only steps that
    depend on the matrix's other dimension and are picked per leaf, so at LLaMA's shapes the
    ``d x d``, ``d x f`` (left side) and ``f x d`` (right side) matrices share one Gram
    eigendecomposition. Explicitly sharded leaves are decomposed where they live, one leaf at a
    time, as one batch. Matrices whose gradient or new basis is not finite (a NaN/Inf gradient,
    or an SVD that failed) keep their previous basis.

    Args:
      grads: the gradients, canonical layout.
      olds: their current bases (the same layouts' shapes).
      signs: make the largest-magnitude entry of each basis vector positive
        (``Refresh(canonical_signs=True)``).
      svd: ``"exact"``, ``"randomized"``, ``"subspace"``, ``"gram"``, or ``"random"``
        (APOLLO's :func:`random_projection`).
      keys: per gradient, one PRNG key per matrix (shape ``batch``; for ``"randomized"``,
        ``"subspace"`` and ``"random"``).
      oversample: extra probes of the randomized SVD and the subspace iteration.
      power_iters: power iterations of the randomized SVD and the subspace iteration.
      first: whether no basis has been computed yet (a traced bool): the subspace iteration
        then starts from Gaussian probes instead of the previous basis.
      spread: under a mesh of several devices set with ``jax.set_mesh``, spread the matrices
        over its devices, each decomposing its share whole (``Refresh(spread=...)``).

    Returns:
      The new bases, in order.
    """
    options = {"signs": signs, "svd": svd, "oversample": oversample, "power_iters": power_iters, "first": first,
               "spread": spread}  # fmt: skip
    sites: dict[Any, list[int]] = {}
    for i, (g, old) in enumerate(zip(grads, olds, strict=True)):
        sites.setdefault(site_key(g, old, svd, oversample), []).append(i)
    if len(sites) > 1:  # one call per site
        return _per_group(list(sites.values()), grads, olds, keys, options)
    layout = olds[0].layout
    warm = svd == "subspace"
    spec = sharding.explicit_spec(grads[0])
    if spec is not None and any(a is not None for a in tuple(spec)[: len(layout.batch)]):
        if len(grads) > 1:
            raise ValueError("leaves sharded along their stacking axes are refreshed one leaf at a time")
        u, vh = _top_vectors(sharding.gather_matrix(grads[0].astype(jnp.float32)), layout, signs, svd,
                             None if keys is None else keys[0], oversample, power_iters,
                             _previous_columns(olds[0]) if warm else None, first)  # fmt: skip
        return [_keep_finite(grads[0], u, vh, olds[0])]
    flats = [sharding.gather_matrix(g).reshape(-1, *g.shape[-2:]) for g in grads]
    sizes = [f.shape[0] for f in flats]
    item_keys = None
    if keys is not None:
        item_keys = jnp.concatenate([k.reshape(-1) for k in keys])
    mesh = sharding.spread_mesh() if spread and spec is None and sum(sizes) > 1 else None
    if mesh is not None:
        shapes: dict[Any, list[int]] = {}
        for i, old in enumerate(olds):
            shapes.setdefault((old.layout.m, old.layout.n, old.layout.side), []).append(i)
        if len(shapes) > 1:  # the spread stacks a site's matrices: one spread per matrix shape
            return _per_group(list(shapes.values()), grads, olds, keys, options)
        u, vh = _spread_top_vectors(flats, olds, item_keys, mesh, signs, svd, oversample, power_iters, first)
        return _split(grads, olds, sizes, u, vh, None)
    if _by_vectors(layout, svd):
        one = _columns_body(flats, olds, signs, svd, oversample, power_iters, first)
    else:
        takes = _indexers(flats)
        prev_takes = _indexers(_stacked_previous(olds)) if warm else []
        decompose = _decomposer(olds, signs, svd, oversample, power_iters)

        def one(item: tuple[jax.Array, jax.Array, Any]) -> tuple[jax.Array | None, jax.Array | None, None]:
            leaf, j, key = item
            return *decompose(_pick(takes, leaf, j), key, _pick(prev_takes, leaf, j) if warm else None, first), None

    if len(grads) == 1 and grads[0].ndim == 2:  # one matrix: no loop
        u, vh, ok = jax.tree.map(lambda x: x[None], one((0, 0, None if item_keys is None else item_keys[0])))
    else:  # item i is matrix matrix_ids[i] of leaf leaf_ids[i]
        leaf_ids = jnp.concatenate([jnp.full(k, i, jnp.int32) for i, k in enumerate(sizes)])
        matrix_ids = jnp.concatenate([jnp.arange(k, dtype=jnp.int32) for k in sizes])
        u, vh, ok = jax.lax.map(one, (leaf_ids, matrix_ids, item_keys))
    return _split(grads, olds, sizes, u, vh, ok)


def _per_group(
    groups: list[list[int]], grads: list[jax.Array], olds: list[Basis], keys: list[jax.Array] | None,
    options: dict[str, Any],
) -> list[Basis]:  # fmt: skip
    """:func:`top_singular_bases` called once per group of indices, the bases put back in order."""
    out: list[Any] = [None] * len(grads)
    for members in groups:
        picked = None if keys is None else [keys[i] for i in members]
        new = top_singular_bases([grads[i] for i in members], [olds[i] for i in members], keys=picked, **options)
        for i, b in zip(members, new, strict=True):
            out[i] = b
    return out


def _by_vectors(layout: Layout, svd: str) -> bool:
    """Whether a refresh's site is keyed by the basis's vectors (``site_key``)."""
    return svd in ("gram", "randomized", "subspace") and layout.side in ("left", "right")


def site_key(g: jax.Array, old: Basis, svd: str, oversample: int) -> Any:
    """What one compiled decomposition of ``svd`` can serve (hashable): leaves with equal keys are
    refreshed through one ``lax.map`` body (:func:`top_singular_bases`).

    The Gram, randomized and subspace refreshes of a one-sided basis: the length ``p`` of its
    vectors, the rank, the number of range-finder columns and the basis's dtype (any matrix shape
    and side). Otherwise the matrix shape, rank, side, and the gradient's and bases' dtypes. A
    leaf sharded explicitly along its stacking axes is its own site.
    """
    lay = old.layout
    spec = sharding.explicit_spec(g)
    if spec is not None and any(a is not None for a in tuple(spec)[: len(lay.batch)]):
        return ("explicit", id(g))
    if _by_vectors(lay, svd):
        p, q = (lay.n, lay.m) if lay.side == "right" else (lay.m, lay.n)
        dtype = (old.right if lay.side == "right" else old.left).dtype
        return ("vectors", p, lay.rank, min(lay.rank + oversample, p, q), dtype)
    dtypes = (None if old.left is None else old.left.dtype, None if old.right is None else old.right.dtype)
    return ("matrix", lay.m, lay.n, lay.rank, lay.side, g.dtype, dtypes)


def _pick(fns: list, leaf: Any, j: Any, *args: Any) -> Any:
    """``fns[leaf](j, *args)``: a ``lax.switch`` over the leaves of a site (a call when there is one)."""
    return jax.lax.switch(leaf, fns, j, *args) if len(fns) > 1 else fns[0](j, *args)


def _picked_products(flats: list[jax.Array], olds: list[Basis], leaf: Any, j: Any) -> _Products:
    """The :class:`_Products` of matrix ``j`` of leaf ``leaf``, oriented and in float32, each
    product picked per leaf: the leaves of a site may differ in shape and side, not in ``p``."""

    def branches(name: str) -> list:
        def branch(j: Any, *args: Any, f: jax.Array, side: str, **kw: Any) -> jax.Array:
            a = _oriented(jax.lax.dynamic_index_in_dim(f, j, keepdims=False).astype(jnp.float32), side)
            return getattr(_products(a), name)(*args, **kw)

        return [functools.partial(branch, f=f, side=o.layout.side) for f, o in zip(flats, olds, strict=True)]

    gram, probes, power, small_gram = (branches(name) for name in _Products._fields)
    return _Products(
        lambda: _pick(gram, leaf, j),
        lambda key, k: _pick([functools.partial(b, k=k) for b in probes], leaf, j, key),
        lambda basis: _pick(power, leaf, j, basis),
        lambda basis: _pick(small_gram, leaf, j, basis),
    )


def _columns_body(
    flats: list[jax.Array], olds: list[Basis], signs: bool, svd: str, oversample: int, power_iters: int, first: Any
) -> Any:
    """The ``lax.map`` body of a site keyed by the basis's vectors: ``(leaf, j, key) -> (u, vh, ok)``
    for matrix ``j`` of leaf ``leaf``, stacked as the basis's vectors as columns ``(p, r)``, in
    ``u`` (``vh`` None); :func:`_split` turns them back into each leaf's side.

    ``ok`` (the Gram refresh only, else None) says whether the matrix and its new vectors are
    finite, read from the Gram matrix's diagonal: its entries are the sums of the squares of
    ``A``'s rows, so one is NaN or infinite exactly when a row holds a NaN or an infinity (or its
    squares overflow float32, where the Gram matrix is no use either). That replaces a check of
    every gradient entry per leaf, a reduction kernel per leaf shape on the TPU compiler. A
    non-finite Gram matrix is decomposed as zeros: the eigensolver then overwrites a matrix that
    nothing else reads, where a second reader of the Gram matrix made the TPU compiler copy it."""
    lay = olds[0].layout
    k = site_key(flats[0], olds[0], svd, oversample)[3]  # the range finder's columns
    dtype = (olds[0].left if lay.side == "left" else olds[0].right).dtype
    prev_takes = _indexers(_stacked_previous(olds)) if svd == "subspace" else []

    def one(item: tuple[jax.Array, jax.Array, Any]) -> tuple[jax.Array, None, jax.Array | None]:
        leaf, j, key = item
        ops = _picked_products(flats, olds, leaf, j)
        ok = None
        if svd == "gram":
            gram = ops.gram()
            finite = jnp.all(jnp.isfinite(jnp.diagonal(gram, axis1=-2, axis2=-1)))
            cols = _top_eigenvectors(jnp.where(finite, gram, 0.0), lay.rank)
            ok = finite & jnp.all(jnp.isfinite(cols))
        else:  # the subspace iteration's first refresh starts from probes only; one QR site either way

            def warm() -> jax.Array:
                prev = _pick(prev_takes, leaf, j).astype(jnp.float32)
                return jnp.concatenate([prev, ops.probes(key, k - lay.rank)], axis=-1)

            block = ops.probes(key, k) if svd == "randomized" else jax.lax.cond(first, lambda: ops.probes(key, k), warm)
            cols = _ritz_columns(ops, _range_basis(ops, block, power_iters), lay.rank)
        if signs:
            cols = cols * _signs(cols, -2)[..., None, :]
        return cols.astype(dtype), None, ok

    return one


def _split(
    grads: list[jax.Array], olds: list[Basis], sizes: list[int], u: jax.Array | None, vh: jax.Array | None,
    ok: jax.Array | None,
) -> list[Basis]:  # fmt: skip
    """The stacked new vectors of a group back to one basis per leaf (finite ones only: ``ok``,
    one bool per matrix, where the decomposition said so, else checked here)."""
    out, start = [], 0
    for g, old, k in zip(grads, olds, sizes, strict=True):
        left, right = _rows(u, start, k, g), _rows(vh, start, k, g)
        if vh is None and old.left is None:  # a site keyed by the vectors: columns, here a right basis
            left, right = None, jnp.swapaxes(left, -1, -2)
        fine = None if ok is None else ok[start : start + k].reshape(*g.shape[:-2], 1, 1)
        out.append(_keep_finite(g, left, right, old, fine))
        start += k
    return out


def _stacked_previous(olds: list[Basis]) -> list[jax.Array]:
    """Per leaf, its matrices' previous vectors as columns, one ``(p, r)`` matrix per stacked matrix."""
    return [c.reshape(-1, *c.shape[-2:]) for c in map(_previous_columns, olds)]


def _decomposer(olds: list[Basis], signs: bool, svd: str, oversample: int, power_iters: int) -> Any:
    """``(x, key, prev, first) -> (u, vh)``: one matrix's new vectors in its group's bases' dtypes
    (None for a side the bases do not have): a bf16 basis needs no float32 stack. Non-finite
    vectors stay non-finite in the basis dtype (and are then rejected by ``_keep_finite``)."""
    layout = olds[0].layout
    u_dtype = olds[0].left.dtype if layout.side in ("left", "full") else None
    vh_dtype = olds[0].right.dtype if layout.side in ("right", "full") else None

    def decompose(x: jax.Array, key: Any, prev: Any, first: Any) -> tuple[jax.Array | None, jax.Array | None]:
        u, vh = _top_vectors(x.astype(jnp.float32), layout, signs, svd, key, oversample, power_iters, prev, first)
        return (None if u_dtype is None else u.astype(u_dtype)), (None if vh_dtype is None else vh.astype(vh_dtype))

    return decompose


def _spread_top_vectors(
    flats: list[jax.Array], olds: list[Basis], keys: jax.Array | None, mesh: Any, signs: bool, svd: str,
    oversample: int, power_iters: int, first: Any,
) -> tuple[jax.Array | None, jax.Array | None]:  # fmt: skip
    """The group's matrices decomposed across ``mesh``: each device takes its share of the stacked
    matrices whole (:func:`fira_jax._src.sharding.spread_map`) instead of every matrix."""
    warm = svd == "subspace"
    items = {"g": jnp.concatenate(flats) if len(flats) > 1 else flats[0], "key": keys,
             "prev": jnp.concatenate(_stacked_previous(olds)) if warm else None}  # fmt: skip
    decompose = _decomposer(olds, signs, svd, oversample, power_iters)

    def one(item: dict[str, Any], first: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
        return decompose(item["g"], item["key"], item["prev"], first)

    return sharding.spread_map(one, items, jnp.asarray(first), mesh)


def _rows(x: jax.Array | None, start: int, k: int, g: jax.Array) -> jax.Array | None:
    """Rows ``start : start + k`` of the stacked vectors ``x``, shaped for ``g``'s stacking axes."""
    return None if x is None else x[start : start + k].reshape(*g.shape[:-2], *x.shape[1:])


# Whether the CPU compiler fuses ``x * 0`` into the sum that all_finite takes (JAX 0.10.2 does,
# 0.8.1 does not; the versions between are not checked and take the older form).
_REDUCTIONS_FUSE_THEIR_INPUT = jax.__version_info__ >= (0, 10)


def all_finite(x: jax.Array) -> jax.Array:
    """Per matrix of ``x`` (``batch + (m, n)``), whether all its entries are finite: ``batch + (1, 1)``.

    For float32 and wider, ``sum(x * 0) == 0``, which holds exactly when they are (``nan * 0``
    and ``inf * 0`` are NaN, and a NaN reaches the sum): one floating-point reduction, where
    ``all(isfinite(x))`` compiles to a tree of boolean reductions (on the CPU compiler, four
    kernels instead of one). Narrower dtypes keep ``all(isfinite(x))``: the CPU compiler sums
    them on a float32 copy of the matrix, a larger temporary than the boolean one. So does JAX
    before 0.10: its CPU compiler (checked at 0.8.1, the lowest version we support) writes
    ``x * 0`` out whole before summing it, a float32 temporary four times the boolean one.
    """
    if jnp.finfo(x.dtype).bits < 32 or not _REDUCTIONS_FUSE_THEIR_INPUT:
        return jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
    return jnp.sum(x * jnp.zeros((), x.dtype), axis=(-2, -1), keepdims=True) == 0


def _keep_finite(
    g: jax.Array, u: jax.Array | None, vh: jax.Array | None, old: Basis, ok: jax.Array | None = None
) -> Basis:
    """The new basis where the gradient and the new vectors are finite, else the old one, per matrix
    (``ok``, ``batch + (1, 1)``: that, already known)."""
    finite_g = all_finite(g) if ok is None else None

    def keep(new: jax.Array, prev: jax.Array) -> jax.Array:
        fine = finite_g & all_finite(new) if ok is None else ok
        return jnp.where(fine, new.astype(prev.dtype), prev)

    left = keep(u, old.left) if old.left is not None else None
    right = keep(vh, old.right) if old.right is not None else None
    return Basis(left, right, old.layout)
