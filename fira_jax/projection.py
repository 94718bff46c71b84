"""Projecting gradients onto, and back from, a low-rank subspace (step 1 and 5 of Fira).

This is step 1 of GaLore (Zhao et al., 2024) and Fira (Chen et al., 2024): every
``update_proj_gap`` steps the top-``rank`` singular vectors P of each selected gradient G are
computed (:mod:`fira_jax.basis`); the optimizer then works on the low-rank gradient ``P^T G``
(left side) or ``G P^T`` (right side).

:func:`project_gradients` replaces each selected gradient by a :class:`LowRank` node whose only
pytree leaf is the low-rank update ``coeffs``; everything else the later Fira pieces need (the
raw low-rank gradient, G, the basis, the residual) rides along as static data that ordinary optax
transforms never see. :func:`project_back` turns the node back into a dense update.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import masks, sharding
from fira_jax._validation import check_choice, check_int
from fira_jax.basis import SVD_METHODS, Basis, default_basis, top_singular_bases
from fira_jax.layout import PROJ_TYPES, Layout, layouts

COMPOSITION_HINT = (
    "Between fira_jax.project_gradients and fira_jax.project_back, ordinary optax transformations act "
    "on the low-rank update only and cannot keep state shaped like the parameters: wrap a stateful "
    "one in fira_jax.in_subspace(inner, projection=project)."
)


@dataclasses.dataclass(frozen=True, eq=False)
class Carried:
    """What a :class:`LowRank` node carries besides its update (static data, compared by identity).

    Attributes:
      low: the raw low-rank gradient ``R = P^T G`` or ``G P^T``.
      grad: the full gradient G, in canonical ``batch + (m, n)`` form.
      basis: the :class:`fira_jax.Basis` used at this step.
      residual: Fira's residual (a :class:`fira_jax.Residual`, kept factored) once
        :func:`fira_jax.scale_residual_by_norm_ratio` has set it, else None.
      in_subspace: whether :func:`fira_jax.in_subspace` has run on ``coeffs``.
    """

    low: jax.Array
    grad: jax.Array
    basis: Basis
    residual: Any = None
    in_subspace: bool = False


class _NodeType(type):
    """Makes JAX's structure-mismatch errors, which print a node's class, say what to do."""

    def __repr__(cls) -> str:
        return f"<class 'fira_jax.{cls.__name__}'> ({COMPOSITION_HINT})"


@dataclasses.dataclass(frozen=True)
class LowRank(metaclass=_NodeType):
    """A selected gradient on its way through the chain.

    ``coeffs`` is the node's only pytree leaf: the low-rank update being transformed. It starts
    as the low-rank gradient R, and :func:`fira_jax.in_subspace` replaces it by the subspace
    optimizer's output (``N`` in the Fira paper). An ordinary optax transformation placed
    between :func:`project_gradients` and :func:`project_back` therefore acts on ``coeffs``
    alone (``optax.scale(0.5)`` halves the low-rank update, ``optax.clip_by_global_norm`` clips
    it), while R, G and the basis, in ``carried``, are untouched.
    """

    coeffs: jax.Array
    carried: Carried

    low = property(lambda self: self.carried.low)
    grad = property(lambda self: self.carried.grad)
    basis = property(lambda self: self.carried.basis)
    residual = property(lambda self: self.carried.residual)
    layout = property(lambda self: self.carried.basis.layout)

    def replace(self, coeffs: jax.Array | None = None, **carried: Any) -> "LowRank":
        """A copy with a new ``coeffs`` and/or new fields of ``carried``."""
        new_carried = dataclasses.replace(self.carried, **carried) if carried else self.carried
        return LowRank(self.coeffs if coeffs is None else coeffs, new_carried)


jax.tree_util.register_dataclass(LowRank, data_fields=["coeffs"], meta_fields=["carried"])


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


class Projection(optax.GradientTransformationExtraArgs):
    """The transformation :func:`project_gradients` returns: ``init``, ``update`` and ``layouts``.

    ``layouts(tree)`` gives each leaf's static :class:`fira_jax.Layout` (None for unselected
    leaves); :func:`fira_jax.in_subspace` and :func:`fira_jax.clip_by_norm_growth` use it to
    shape their per-matrix state. It is an ordinary 2-tuple ``(init, update)`` for optax.
    """

    def layouts(self, tree: Any) -> list[Layout | None]:
        return self._layouts(sharding.pure(tree))


def projection_layouts(projection: Any, params: Any) -> list[Layout | None]:
    """The layouts ``projection`` (from :func:`project_gradients`) gives ``params``' leaves."""
    if not isinstance(projection, Projection):
        raise TypeError(
            "`projection` must be the transformation returned by fira_jax.project_gradients, "
            f"got {type(projection).__name__}."
        )
    return projection.layouts(params)


def refresh_groups(n_leaves: int, update_proj_gap: Any, stagger: bool) -> list[tuple[Any, list[int]]]:
    """Which selected leaves refresh together, and at which offset in the gap.

    Without ``stagger``, one group at offset 0: every leaf refreshes when
    ``t % T == 0``. With it, leaf ``j`` of ``k`` has offset ``j T // k`` and refreshes when
    ``(t + offset) % T == 0`` (and at ``t = 0``); leaves sharing an offset form one group. A
    traced ``T`` (``optax.inject_hyperparams``) gives one group per leaf with traced offsets.
    """
    if not stagger or n_leaves == 0:
        return [(0, list(range(n_leaves)))]
    if not isinstance(update_proj_gap, int):  # an array: traced or injected
        return [((j * update_proj_gap) // n_leaves, [j]) for j in range(n_leaves)]
    groups: dict[int, list[int]] = {}
    for j in range(n_leaves):
        groups.setdefault((j * update_proj_gap) // n_leaves, []).append(j)
    return list(groups.items())


def shape_groups(members: list[int], grads: list[jax.Array], bases: list[Basis]) -> list[list[int]]:
    """``members`` grouped by what one compiled SVD can serve: matrix shape, rank, side and dtypes.

    A leaf under explicit sharding forms its own group (it is decomposed where it lives).
    """
    groups: dict[Any, list[int]] = {}
    for j in members:
        g, b = grads[j], bases[j]
        if sharding.explicit_spec(g) is not None:
            key: Any = ("explicit", j)
        else:
            dtypes = (g.dtype, None if b.left is None else b.left.dtype, None if b.right is None else b.right.dtype)
            key = (b.layout.m, b.layout.n, b.layout.rank, b.layout.side, dtypes)
        groups.setdefault(key, []).append(j)
    return list(groups.values())


def refresh_due(count: jax.Array, offset: Any, update_proj_gap: Any) -> jax.Array:
    """Whether a group at ``offset`` refreshes at step ``count`` (always at step 0)."""
    return ((count + offset) % update_proj_gap == 0) | (count == 0)


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
    refresh_by_shape: bool = False,
    seed: int = 0,
) -> Projection:
    r"""Projects each selected gradient onto its top-``rank`` singular subspace.

    At steps ``t = 0, T, 2T, ...`` (``T = update_proj_gap``) the SVD of each
    selected gradient ``G`` (m × n, computed in float32) gives the basis ``P``:

    * right side: ``P = Vh[:r]`` (r × n) and the low-rank gradient is ``G P^T``;
    * left side: ``P = U[:, :r]`` (m × r) and the low-rank gradient is ``P^T G``;
    * full (two-sided, GaLore only): ``U[:, :r]^T G Vh[:r]^T``.

    ``proj_type`` chooses the side: ``"std"`` is right if m ≥ n else left (the
    smaller state), ``"reverse_std"`` the opposite, ``"right"``, ``"left"`` and
    ``"full"`` are fixed. The effective rank is ``min(rank, m, n)``. Between
    refreshes the basis is kept. The refresh is a ``lax.cond`` on the step
    count, so one compiled update serves every step: one cond per leaf, which
    waits only for that leaf's gradient and decomposes its matrices (those of
    a stacked leaf one after another), so the refresh holds one matrix's SVD
    workspace at a time and gradients can be freed as they are used. With
    ``refresh_by_shape=True``, one cond per matrix shape decomposes the
    matrices of every leaf of that shape with one compiled SVD: the compiler
    builds one SVD program per shape instead of per leaf (on TPU, minutes
    each), but every gradient of that shape stays alive until the refresh.

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
        the spectrum decays (see README's Performance section). ``"gram"``:
        the top eigenvectors of ``G^T G`` (right) or ``G G^T`` (left), whose
        eigendecomposition compiles in seconds on TPU where the exact SVD
        takes minutes per matrix shape (``fira_jax.basis.gram_top_vectors``).
      oversample: extra probes of the randomized SVD.
      power_iters: power iterations of the randomized SVD.
      stagger: spread the leaves' refreshes over the gap (see
        :func:`refresh_groups`), so that no later step computes every SVD.
        Off by default, as in the reference.
      refresh_by_shape: refresh same-shaped matrices together, one compiled
        SVD per shape (see above): for the TPU compiler, whose SVD takes
        minutes to compile per call site; it costs memory, since the step
        then keeps every gradient of that shape alive until the refresh.
      seed: seed of the randomized SVD's probes (folded with the step and leaf).

    Returns:
      A :class:`Projection` (an ``optax.GradientTransformationExtraArgs``) whose
      state is a :class:`ProjectionState`.

    Raises:
      ValueError or TypeError at construction for an invalid ``rank``,
      ``update_proj_gap`` or ``proj_type``; at init for a selected leaf that
      has fewer than 2 dimensions or is not floating point (naming its path).

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> project = fira_jax.project_gradients(rank=2, update_proj_gap=10)
      >>> state = project.init({"w": jnp.ones((6, 4))})
      >>> state.right["w"].shape  # a 6 x 4 matrix is projected on the right: P is 2 x 4
      (2, 4)

    References:
      Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection <https://arxiv.org/abs/2403.03507>`_, 2024.
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
      Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024.
    """
    check_int("rank", rank, 1, static=True)
    check_int("update_proj_gap", update_proj_gap, 1)
    check_choice("proj_type", proj_type, PROJ_TYPES)
    check_choice("svd", svd, SVD_METHODS)
    check_int("oversample", oversample, 0)
    check_int("power_iters", power_iters, 0)

    def tree_layouts(tree: Any) -> list[Layout | None]:
        return layouts(tree, rank, proj_type, mask, axes)

    def split(treedef: Any, bases: list[Basis | None]) -> tuple[Any, Any]:
        def side(b: Basis | None, attr: str) -> Any:
            value = None if b is None else getattr(b, attr)
            return optax.MaskedNode() if value is None else value

        return treedef.unflatten([side(b, "left") for b in bases]), treedef.unflatten([side(b, "right") for b in bases])

    def init_fn(params: Any) -> ProjectionState:
        slots, treedef = sharding.flatten(params)
        bases = []
        for slot, lay in zip(slots, tree_layouts(sharding.pure(params)), strict=True):
            if lay is None:
                bases.append(None)
                continue
            b = default_basis(lay, basis_dtype or sharding.value(slot).dtype)
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

        def refreshed(members: list[int]) -> list[Basis]:
            keys = None if key is None else [jax.random.fold_in(key, j) for j in members]
            return top_singular_bases(
                [grads[j] for j in members], [old[j] for j in members], signs=canonical_signs, svd=svd, keys=keys,
                oversample=oversample, power_iters=power_iters,
            )  # fmt: skip

        # One cond per leaf (each waits only for its own gradient) or, refresh_by_shape, per
        # group of same-shaped matrices; a branch decomposes its matrices one after another
        # (top_singular_bases). A cond is never vmapped (that would run every SVD).
        new = list(old)
        for offset, members in refresh_groups(len(picked), update_proj_gap, stagger):
            due = refresh_due(state.count, offset, update_proj_gap)
            groups = shape_groups(members, grads, old) if refresh_by_shape else [[j] for j in members]
            for group in groups:
                bases = jax.lax.cond(due, lambda g=group: refreshed(g), lambda g=group: [old[j] for j in g])
                for j, b in zip(group, bases, strict=True):
                    new[j] = b
        out: list[Any] = list(leaves)
        bases: list[Basis | None] = [None] * len(leaves)
        for i, g, basis in zip(picked, grads, new, strict=True):
            low = basis.project(g)
            out[i] = LowRank(coeffs=low, carried=Carried(low=low, grad=g, basis=basis))
            bases[i] = basis
        new_state = ProjectionState(optax.safe_int32_increment(state.count), *split(treedef, bases))
        return treedef.unflatten(out), new_state

    projection = Projection(init_fn, update_fn)
    projection._layouts = tree_layouts
    return projection


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

    Example:
      >>> import jax.numpy as jnp, optax, fira_jax
      >>> project = fira_jax.project_gradients(rank=1, update_proj_gap=10)
      >>> tx = optax.chain(project, fira_jax.project_back(scale=1.0))  # G -> P P^T G
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
      >>> tx.update(g, tx.init(g))[0]["w"]  # the rank-1 part of G
      Array([[3., 0.],
             [0., 0.]], dtype=float32)
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
