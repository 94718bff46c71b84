"""Projecting gradients onto, and back from, a low-rank subspace.

This is step 1 of GaLore (Zhao et al., 2024) and Fira (Chen et al., 2024):
every ``update_proj_gap`` steps the top-``rank`` singular vectors P of each
selected gradient G are computed; the optimizer then works on the low-rank
gradient ``P^T G`` (left side) or ``G P^T`` (right side).

:func:`project_gradients` replaces each selected gradient by a :class:`LowRank`
node that carries everything the later pieces of the chain need; the pieces in
between (:func:`fira_jax.in_subspace`,
:func:`fira_jax.scale_residual_by_norm_ratio`,
:func:`fira_jax.clip_by_norm_growth`) read and replace its fields, and
:func:`project_back` turns it back into a dense update.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fira_jax import masks, sharding
from fira_jax._validation import check_choice, check_int

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


class MatrixAxes(NamedTuple):
    """Which axes of a leaf form the matrix that is projected.

    The leaf is viewed as a stack of (rows × cols) matrices: ``rows`` and
    ``cols`` name one axis or a tuple of axes each (flattened, in that order);
    every other axis indexes independent matrices, each with its own basis,
    moments, scaling factors and limiter norm. The default for a selected leaf
    is ``MatrixAxes(rows=-2, cols=-1)``, which treats layers stacked by
    ``nnx.scan`` as separate matrices.

    Example: a ``DenseGeneral`` kernel of shape (embed, heads, head_dim) is one
    embed × (heads·head_dim) matrix with ``MatrixAxes(rows=0, cols=(1, 2))``.
    """

    rows: int | tuple[int, ...] = -2
    cols: int | tuple[int, ...] = -1


class Layout(NamedTuple):
    """Static description of one selected leaf (hashable; pytree aux data).

    The *canonical* form of the leaf is ``batch + (m, n)``: batch axes first,
    then the flattened row axes and column axes.
    """

    path: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]  # batch axes, then row axes, then column axes
    n_rows: int  # how many of perm's non-batch axes are row axes
    batch: tuple[int, ...]
    m: int
    n: int
    rank: int
    side: str  # "left", "right" or "full"

    def canonical(self, x: jax.Array) -> jax.Array:
        """The leaf as a stack of ``batch + (m, n)`` matrices."""
        return jnp.transpose(x, self.perm).reshape((*self.batch, self.m, self.n))

    def restore(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`canonical`."""
        permuted = tuple(self.shape[a] for a in self.perm)
        inverse = tuple(sorted(range(len(self.perm)), key=lambda a: self.perm[a]))
        return jnp.transpose(x.reshape(permuted), inverse)

    @property
    def low_shape(self) -> tuple[int, ...]:
        """Shape of the low-rank gradient (and of the subspace optimizer's state)."""
        r = self.rank
        return self.batch + {"right": (self.m, r), "left": (r, self.n), "full": (r, r)}[self.side]


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Basis:
    """Orthonormal basis of one selected leaf's subspace.

    ``left`` is U[:, :r] (batch + (m, r)), used on the left and two-sided
    ("full") side; ``right`` is Vh[:r] (batch + (r, n)), used on the right and
    full side; the unused one is ``None``.
    """

    left: jax.Array | None
    right: jax.Array | None
    layout: Layout

    def tree_flatten(self) -> tuple[tuple[Any, ...], Layout]:
        return (self.left, self.right), self.layout

    @classmethod
    def tree_unflatten(cls, layout: Layout, children: tuple[Any, ...]) -> "Basis":
        return cls(*children, layout)

    def project(self, g: jax.Array) -> jax.Array:
        """Low-rank coordinates: ``G P^T`` (right), ``P^T G`` (left), ``U^T G V`` (full)."""
        out = g
        if self.left is not None:
            spec = sharding.out_sharding(g, self.layout, "cols" if self.right is not None else "moments")
            out = jnp.einsum("...mr,...mn->...rn", self.left.astype(g.dtype), out, out_sharding=spec)
        if self.right is not None:
            spec = sharding.out_sharding(g, self.layout, "moments")
            out = jnp.einsum("...mn,...rn->...mr", out, self.right.astype(g.dtype), out_sharding=spec)
        return out

    def back(self, x: jax.Array, like: jax.Array | None = None) -> jax.Array:
        """Back to the full space: ``X P`` (right), ``P X`` (left), ``U X V^T`` (full).

        ``like`` is the canonical gradient, whose sharding the result takes (explicit meshes).
        """
        spec = None if like is None else sharding.out_sharding(like, self.layout, "dense")
        out = x
        if self.left is not None:
            mid = None if like is None or self.right is None else sharding.out_sharding(like, self.layout, "rows")
            out = jnp.einsum("...mr,...rn->...mn", self.left.astype(x.dtype), out, out_sharding=mid or spec)
        if self.right is not None:
            out = jnp.einsum("...mr,...rn->...mn", out, self.right.astype(x.dtype), out_sharding=spec)
        return out


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LowRank:
    """A selected gradient on its way through the chain.

    Attributes:
      coeffs: the low-rank update being transformed; starts as ``low``, and
        :func:`fira_jax.in_subspace` replaces it by the subspace optimizer's
        output (``N`` in the Fira paper).
      low: the raw low-rank gradient ``P^T G`` or ``G P^T``.
      grad: the full gradient G, in canonical ``batch + (m, n)`` form.
      basis: the :class:`Basis` used at this step.
      residual: the (scaled, limited) residual once
        :func:`fira_jax.scale_residual_by_norm_ratio` has set it (a
        :class:`fira_jax.Residual`, kept factored), else None.
    """

    coeffs: jax.Array
    low: jax.Array
    grad: jax.Array
    basis: Basis
    residual: Any = None

    def tree_flatten(self) -> tuple[tuple[Any, ...], None]:
        return (self.coeffs, self.low, self.grad, self.basis, self.residual), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[Any, ...]) -> "LowRank":
        del aux
        return cls(*children)

    @property
    def layout(self) -> Layout:
        return self.basis.layout

    def replace(self, **changes: Any) -> "LowRank":
        return dataclasses.replace(self, **changes)


def is_low_rank(x: Any) -> bool:
    """True for a :class:`LowRank` node (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, LowRank)


class ProjectionState(NamedTuple):
    """State of :func:`project_gradients`.

    Attributes:
      count: number of updates so far (int32); a refresh happens when
        ``count % update_proj_gap == 0``.
      left: ``U[:, :r]`` (``batch + (m, r)``) for each selected leaf projected
        on the left or on both sides, ``optax.MaskedNode()`` elsewhere.
      right: ``Vh[:r]`` (``batch + (r, n)``) for each selected leaf projected
        on the right or on both sides, ``optax.MaskedNode()`` elsewhere.

    Only arrays sit at the parameters' leaf positions, so the state survives
    containers that wrap leaves (``nnx.Optimizer`` stores it in Variables);
    the static layout is recomputed from the gradients' shapes at each update.
    """

    count: jax.Array
    left: Any
    right: Any


def _side(proj_type: str, m: int, n: int) -> str:
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _normalize_axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if not axes or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError
    return tuple(a % ndim for a in axes)


def _layout(path: str, leaf: Any, axes: MatrixAxes | None, rank: int, proj_type: str) -> Layout:
    shape = tuple(leaf.shape)
    if len(shape) < 2:
        raise ValueError(
            f"Leaf '{path}' with shape {shape} is selected for low-rank projection, "
            "but only leaves with at least 2 dimensions can be projected. "
            "Leave it out of `mask`."
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(
            f"Leaf '{path}' has dtype {leaf.dtype}; low-rank projection needs a "
            "floating-point leaf. Leave it out of `mask`."
        )
    axes = MatrixAxes() if axes is None else axes
    if not isinstance(axes, MatrixAxes):
        raise TypeError(f"`axes` for leaf '{path}' must be a fira_jax.MatrixAxes or None, got {axes!r}.")
    try:
        rows = _normalize_axes(axes.rows, len(shape))
        cols = _normalize_axes(axes.cols, len(shape))
    except ValueError:
        raise ValueError(f"`axes` {axes} is not valid for leaf '{path}' with shape {shape}.") from None
    if len(set(rows + cols)) != len(rows + cols):
        raise ValueError(f"`axes` {axes} repeats an axis for leaf '{path}' with shape {shape}.")
    batch_axes = tuple(a for a in range(len(shape)) if a not in rows + cols)
    m = math.prod(shape[a] for a in rows)
    n = math.prod(shape[a] for a in cols)
    return Layout(
        path=path,
        shape=shape,
        perm=batch_axes + rows + cols,
        n_rows=len(rows),
        batch=tuple(shape[a] for a in batch_axes),
        m=m,
        n=n,
        rank=min(rank, m, n),
        side=_side(proj_type, m, n),
    )


def layouts(tree: Any, rank: int, proj_type: str, mask: masks.Mask = None, axes: Any = None) -> list[Layout | None]:
    """The :class:`Layout` of every leaf of ``tree`` (None for unselected leaves).

    Raises a ValueError or TypeError naming the leaf's path when a selected
    leaf cannot be projected.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    selected = masks.resolve_per_leaf(tree, mask, lambda x: getattr(x, "ndim", 0) >= 2, "mask")
    if isinstance(axes, MatrixAxes):
        leaf_axes = [axes] * len(with_path)
    else:
        leaf_axes = masks.resolve_per_leaf(tree, axes, lambda x: None, "axes")
    out = []
    for (path, leaf), sel, ax in zip(with_path, selected, leaf_axes, strict=True):
        if not isinstance(sel, bool | np.bool_):
            raise TypeError(f"`mask` must hold bools; got {sel!r} for leaf '{masks.path_str(path)}'.")
        out.append(_layout(masks.path_str(path), leaf, ax, rank, proj_type) if sel else None)
    return out


def _default_basis(layout: Layout, dtype: Any) -> Basis:
    """A valid orthonormal basis (the first r coordinate vectors), used before the first refresh."""
    r = layout.rank
    left = right = None
    if layout.side in ("left", "full"):
        left = jnp.broadcast_to(jnp.eye(layout.m, r, dtype=dtype), (*layout.batch, layout.m, r))
    if layout.side in ("right", "full"):
        right = jnp.broadcast_to(jnp.eye(r, layout.n, dtype=dtype), (*layout.batch, r, layout.n))
    return Basis(left, right, layout)


def _canonical_signs(u: jax.Array, vh: jax.Array, side: str) -> tuple[jax.Array, jax.Array]:
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


def _randomized_svd(
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


def _svd_basis(
    g: jax.Array, old: Basis, canonical_signs: bool, svd: str, key: jax.Array | None, svd_options: dict
) -> Basis:
    """Top-r singular vectors of the canonical gradient ``g``, in float32.

    Matrices whose gradient or new basis is not finite (a NaN/Inf gradient, or
    an SVD that failed) keep their previous basis.
    """
    layout = old.layout
    r = layout.rank
    g32 = sharding.gather_matrix(g.astype(jnp.float32))
    if svd == "randomized":
        u, vh = _randomized_svd(g32, r, layout.side, key, **svd_options)
    else:
        u, _, vh = jnp.linalg.svd(g32, full_matrices=False)
        u, vh = u[..., :, :r], vh[..., :r, :]
    if canonical_signs:
        u, vh = _canonical_signs(u, vh, layout.side)

    finite_g = jnp.all(jnp.isfinite(g), axis=(-2, -1), keepdims=True)

    def keep_finite(new: jax.Array, prev: jax.Array) -> jax.Array:
        ok = finite_g & jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
        return jnp.where(ok, new.astype(prev.dtype), prev)

    left = keep_finite(u, old.left) if old.left is not None else None
    right = keep_finite(vh, old.right) if old.right is not None else None
    return Basis(left, right, layout)


def project_gradients(
    rank: int,
    update_proj_gap: int,
    proj_type: str = "std",
    mask: masks.Mask = None,
    *,
    axes: Any = None,
    canonical_signs: bool = False,
    basis_dtype: Any = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 2,
    stagger: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects each selected gradient onto its top-``rank`` singular subspace.

    At steps ``t = 0, T, 2T, ...`` (``T = update_proj_gap``) the SVD of each
    selected gradient ``G`` (m × n, computed in float32) gives the basis ``P``:

    * right side: ``P = Vh[:r]`` (r × n) and the low-rank gradient is ``G P^T``;
    * left side: ``P = U[:, :r]`` (m × r) and the low-rank gradient is ``P^T G``;
    * full (two-sided, GaLore only): ``U[:, :r]^T G Vh[:r]^T``.

    ``proj_type`` chooses the side: ``"std"`` is right if m ≥ n else left (the
    smaller state), ``"reverse_std"`` the opposite, ``"right"``, ``"left"`` and
    ``"full"`` are fixed. The effective rank is ``min(rank, m, n)``. Between
    refreshes the basis is kept. The refresh is one ``lax.cond`` on the step
    count for the whole tree, so one compiled update serves every step.

    Each selected leaf of the output is a :class:`LowRank` node; follow this
    transformation with :func:`fira_jax.in_subspace` (the optimizer in the
    subspace) and end with :func:`fira_jax.project_back`. Unselected leaves
    pass through unchanged.

    Args:
      rank: the subspace's dimension ``r`` (an int ≥ 1).
      update_proj_gap: ``T``, steps between refreshes of the basis (≥ 1).
      proj_type: ``"std"``, ``"reverse_std"``, ``"right"``, ``"left"`` or
        ``"full"``.
      mask: which leaves to project: a pytree of bools or a callable from the
        params to one (as in :func:`optax.masked`); default every leaf with at
        least 2 dimensions. See :func:`fira_jax.mask_by_path`.
      axes: which axes form each leaf's matrix: a :class:`MatrixAxes`, a pytree
        of them (None for the default), or a callable from the params to one.
        Default: the last two axes; leading axes index independent matrices.
      canonical_signs: fix each singular vector's sign so that its largest
        entry is positive. SVD signs are implementation-defined (LAPACK,
        cuSOLVER and TPU differ), and because the moments carry over across
        refreshes the signs shape the trajectory; this makes runs agree across
        backends. Off by default to follow the reference implementation.
      basis_dtype: dtype of the stored basis; default the leaf's dtype, as in
        the reference (which casts the float32 SVD to the gradient's dtype).
      svd: ``"exact"`` (a full SVD, as the reference) or ``"randomized"``: a
        range finder with ``rank + oversample`` Gaussian probes,
        ``power_iters`` power iterations and QR re-orthonormalization, then
        the SVD of a small matrix. Much cheaper for large matrices; the basis
        is orthonormal, and it captures nearly the exact basis's energy when
        the spectrum decays (see README's Performance section).
      oversample: extra probes of the randomized SVD.
      power_iters: power iterations of the randomized SVD.
      stagger: spread the leaves' refreshes over the gap (leaf ``i`` of
        ``k`` refreshes when ``(t + i T // k) % T == 0``, and every leaf at
        ``t = 0``), so that no later step computes every SVD. One
        ``lax.cond`` per group of leaves sharing an offset. Off by default,
        as in the reference.
      seed: seed of the randomized SVD's probes (folded with the step and leaf).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`ProjectionState`.

    Raises:
      ValueError or TypeError at construction for an invalid ``rank``,
      ``update_proj_gap`` or ``proj_type``; at init for a selected leaf that
      has fewer than 2 dimensions or is not floating point (naming its path).

    References:
      Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection <https://arxiv.org/abs/2403.03507>`_, 2024.
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
      Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024.
    """
    check_int("rank", rank, 1, static=True)
    check_int("update_proj_gap", update_proj_gap, 1)
    check_choice("proj_type", proj_type, PROJ_TYPES)
    check_choice("svd", svd, ("exact", "randomized"))
    check_int("oversample", oversample, 0)
    check_int("power_iters", power_iters, 0)
    svd_options = {"oversample": oversample, "power_iters": power_iters}

    def tree_layouts(tree: Any) -> list[Layout | None]:
        return layouts(tree, rank, proj_type, mask, axes)

    def split(treedef: Any, bases: list[Basis | None]) -> tuple[Any, Any]:
        def side(b: Basis | None, attr: str) -> Any:
            value = None if b is None else getattr(b, attr)
            return optax.MaskedNode() if value is None else value

        left = treedef.unflatten([side(b, "left") for b in bases])
        right = treedef.unflatten([side(b, "right") for b in bases])
        return left, right

    def init_fn(params: Any) -> ProjectionState:
        slots, treedef = sharding.flatten(params)
        bases = []
        for slot, lay in zip(slots, tree_layouts(params), strict=True):
            if lay is None:
                bases.append(None)
                continue
            b = _default_basis(lay, basis_dtype or sharding.value(slot).dtype)
            left = None if b.left is None else sharding.place(b.left, slot, lay, "left")
            right = None if b.right is None else sharding.place(b.right, slot, lay, "right")
            bases.append(Basis(left, right, lay))
        return ProjectionState(jnp.zeros([], jnp.int32), *split(treedef, bases))

    def update_fn(
        updates: Any, state: ProjectionState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ProjectionState]:
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        lays = tree_layouts(updates)
        old_left = treedef.flatten_up_to(state.left)
        old_right = treedef.flatten_up_to(state.right)
        picked = [i for i, lay in enumerate(lays) if lay is not None]
        grads = [lays[i].canonical(leaves[i]) for i in picked]
        old = [
            Basis(
                old_left[i] if lays[i].side in ("left", "full") else None,
                old_right[i] if lays[i].side in ("right", "full") else None,
                lays[i],
            )
            for i in picked
        ]

        key = jax.random.fold_in(jax.random.key(seed), state.count) if svd == "randomized" else None

        def new_basis(j: int) -> Basis:
            leaf_key = None if key is None else jax.random.fold_in(key, j)
            return _svd_basis(grads[j], old[j], canonical_signs, svd, leaf_key, svd_options)

        # One cond per group of leaves that refresh together: the whole tree, or with
        # `stagger`, each offset. A cond is never vmapped (that would run every SVD).
        groups: dict[int, list[int]] = {}
        for j in range(len(picked)):
            groups.setdefault((j * update_proj_gap) // len(picked) if stagger else 0, []).append(j)
        new = list(old)
        for offset, members in groups.items():
            due = (state.count + offset) % update_proj_gap == 0
            if offset:
                due = due | (state.count == 0)
            refreshed = jax.lax.cond(
                due,
                lambda members=members: [new_basis(j) for j in members],
                lambda members=members: [old[j] for j in members],
            )
            for j, basis in zip(members, refreshed, strict=True):
                new[j] = basis
        out: list[Any] = list(leaves)
        bases: list[Basis | None] = [None] * len(leaves)
        for i, g, basis in zip(picked, grads, new, strict=True):
            low = basis.project(g)
            out[i] = LowRank(coeffs=low, low=low, grad=g, basis=basis)
            bases[i] = basis
        new_state = ProjectionState(optax.safe_int32_increment(state.count), *split(treedef, bases))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_back(scale: float = 1.0) -> optax.GradientTransformation:
    r"""Turns each :class:`LowRank` node back into a dense update.

    .. math::
      U = \text{scale} \cdot \text{back}(N) + S

    where ``back(X)`` is ``X P`` (right side) or ``P X`` (left side), ``N`` is
    the node's ``coeffs`` (the subspace optimizer's output) and ``S`` its
    ``residual`` when :func:`fira_jax.scale_residual_by_norm_ratio` set one
    (Fira), else nothing (GaLore). The update is returned in the leaf's
    original layout and dtype. Other leaves pass through.

    Args:
      scale: GaLore/Fira's ``scale`` (``alpha`` in the Fira code); 0.25 in the
        papers' pre-training runs.

    Returns:
      A stateless ``optax.GradientTransformation``.
    """

    def back(u: Any) -> Any:
        if not is_low_rank(u):
            return u
        dense = (
            scale * u.basis.back(u.coeffs, like=u.grad) if u.residual is None else u.residual.add_to_update(u, scale)
        )
        return u.layout.restore(dense.astype(u.grad.dtype))

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree.map(back, updates, is_leaf=is_low_rank), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def projection_layouts(projection: optax.GradientTransformation, params: Any) -> list[Layout | None]:
    """The layouts ``projection`` (from :func:`project_gradients`) gives ``params``' leaves.

    Used by the pieces that keep per-matrix state (:func:`fira_jax.in_subspace`,
    :func:`fira_jax.clip_by_norm_growth`) to shape it at init. Nothing is
    computed: the projection's init and update are only traced.
    """
    state = jax.eval_shape(projection.init, params)
    if not isinstance(state, ProjectionState):
        raise TypeError(
            "`projection` must be the transformation returned by fira_jax.project_gradients "
            f"(its init returns ProjectionState); its init returned {type(state).__name__}."
        )
    params = sharding.pure(params)
    projected = jax.eval_shape(lambda p: projection.update(p, projection.init(p))[0], params)
    nodes = jax.tree.structure(params).flatten_up_to(projected)
    return [node.layout if is_low_rank(node) else None for node in nodes]
