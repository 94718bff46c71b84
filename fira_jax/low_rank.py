r"""GaLore, Fira and APOLLO as optax transformations: the update of every selected matrix, step by step.

For each selected leaf, with G its gradient as a stack of ``batch + (m, n)`` matrices
(:class:`fira_jax.Layout`), one update of :func:`scale_by_fira` is:

1. P: the bases, refreshed every ``update_proj_gap`` steps (:func:`fira_jax.projection.refresh_bases`);
   ``R = P^T G`` or ``G P^T`` (:meth:`fira_jax.Basis.project`);
2. ``N = inner(R)``: the optimizer in the subspace (Adam by default, :func:`fira_jax.scale_by_torch_adam`),
   one call over the whole tree: the low-rank gradients of the selected leaves and the other leaves
   as they are, so its state is low-rank; at a refresh its moments are first kept, reset or carried
   into the new basis (``Refresh(moments=...)``, ``fira_jax.moments``);
3. ``phi = ||N|| / ||R||`` per column (:func:`fira_jax.scaling_factor`), and ``||S||`` of the
   residual ``S = phi ⊙ (G - s back(R))`` (:func:`fira_jax.residual_norm`);
4. ``ell``: the limiter's bound on ``||S||``'s growth (:func:`fira_jax.limit_norm_growth`);
5. ``U = scale · back(N) + S / ell`` (:func:`fira_jax.fira_update`).

:func:`scale_by_galore` stops after step 2: ``U = scale · back(N)``. :func:`scale_by_apollo`
draws a random P in step 1 (:func:`fira_jax.basis.random_projection`), takes phi in step 3, and
then scales the whole gradient instead of the residual: ``U = sqrt(scale) · (phi ⊙ G) / ell``
(:func:`fira_jax.scaled_gradient`), with no projection back. The other leaves get the inner
optimizer's output. Every value passes from one step to the next as an argument: nothing is
carried beside the arrays, and the state is a :class:`LowRankState` of arrays.
"""

import logging
import math
import zlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from fira_jax import masks, moments, sharding
from fira_jax._validation import check_choice, check_float, check_int
from fira_jax.adam import scale_by_torch_adam
from fira_jax.basis import RANDOM_METHODS, Basis, default_basis
from fira_jax.layout import PROJ_TYPES, Layout, ProjType, describe, layouts, selection
from fira_jax.limiter import limit_norm_growth
from fira_jax.options import Refresh, Residual
from fira_jax.projection import refresh_bases
from fira_jax.residual import fira_update, residual_norm, scaled_gradient, scaling_factor

_log = logging.getLogger("fira_jax")
DEFAULT_REFRESH = Refresh()  # the papers': every 200 steps, an exact SVD
DEFAULT_RESIDUAL = Residual()  # Fira's: column-wise phi, s = the update's scale, gamma 1.01


class LowRankState(NamedTuple):
    """State of :func:`scale_by_galore` and :func:`scale_by_fira`.

    Attributes:
      count: number of updates so far (int32); a refresh happens when
        ``count % update_proj_gap == 0``.
      left: ``U[:, :r]`` (``batch + (m, r)``) for each selected leaf projected on the left or on
        both sides (APOLLO: its random projection), ``optax.MaskedNode()`` elsewhere.
      right: ``Vh[:r]`` (``batch + (r, n)``) for each selected leaf projected on the right or on
        both sides (APOLLO: its random projection), ``optax.MaskedNode()`` elsewhere.
      inner: the inner optimizer's state, over the low-rank shapes of the selected leaves and
        the shapes of the others.
      norms: the norm-growth limiter (Fira, APOLLO): per selected leaf, the limited norm of the
        previous step's scaled residual (Fira) or scaled gradient (APOLLO), one float32 per
        matrix (shape ``batch``); ``optax.MaskedNode()`` elsewhere. None for GaLore.
      index: for the refresh methods that draw random numbers (APOLLO's projection, the
        randomized SVD, the subspace iteration), per selected leaf each matrix's index in its
        stack (int32, shape ``batch``; :func:`fira_jax.low_rank.matrix_keys`), ``optax.MaskedNode()`` elsewhere;
        None for the other methods. It travels with the matrix: the per-layer step, which
        updates one layer's slice of the state, draws what the whole-model step draws.

    Only arrays sit at the parameters' leaf positions, so the state survives containers that
    wrap leaves (``nnx.Optimizer`` stores it in Variables); the static layouts are recomputed
    from the gradients' shapes at each update.
    """

    count: jax.Array
    left: Any
    right: Any
    inner: Any
    norms: Any
    index: Any = None


def matrix_keys(seed: int, path: str, index: jax.Array, count: jax.Array) -> jax.Array:
    """The PRNG key of each matrix of a leaf at a refresh: a function of the ``seed``, the leaf's
    ``path``, the matrix's ``index`` in its stack and the refresh's step ``count``, nothing else.

    Returns:
      A key array shaped like ``index``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fira_jax.low_rank import matrix_keys
      >>> stack = matrix_keys(0, "layers/mlp/kernel", jnp.arange(3), jnp.int32(200))
      >>> alone = matrix_keys(0, "layers/mlp/kernel", jnp.int32(1), jnp.int32(200))  # layer 1's slice
      >>> bool((jax.random.key_data(stack[1]) == jax.random.key_data(alone)).all())
      True
    """
    leaf = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)
    flat = jnp.reshape(index, -1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(leaf, i), count))(flat)
    return keys.reshape(jnp.shape(index))


# One selected leaf's update from its canonical G, R, N and basis, the limiter's previous norm and
# whether this is the first step: (U, the norm to keep). GaLore, Fira and APOLLO differ only here.
LeafUpdate = Callable[[jax.Array, jax.Array, jax.Array, Basis, Any, Any], tuple[jax.Array, Any]]


def _galore_leaf(scale: Any) -> LeafUpdate:
    """GaLore: ``U = scale · back(N)``."""

    def update(g: jax.Array, low: jax.Array, n: jax.Array, basis: Basis, prev: Any, first: Any) -> tuple:
        del low, first
        return scale * basis.back(n, like=g), prev

    return update


def _fira_leaf(scale: Any, granularity: str, residual_scale: Any, gamma: Any) -> LeafUpdate:
    """Fira: ``U = scale · back(N) + S / ell`` with S the scaled residual (steps 3-5)."""

    def update(g: jax.Array, low: jax.Array, n: jax.Array, basis: Basis, prev: Any, first: Any) -> tuple:
        phi = scaling_factor(n, low, basis.layout, granularity)
        norm = residual_norm(g, low, basis, phi, residual_scale)
        ell, kept = limit_norm_growth(norm, prev, gamma, first)
        return fira_update(g, low, n, basis, phi / ell[..., None, None], residual_scale, scale), kept

    return update


def _apollo_leaf(scale: Any, granularity: str, gamma: Any) -> LeafUpdate:
    """APOLLO: ``U = sqrt(scale) · (phi ⊙ G) / ell``: the whole gradient scaled, then limited."""

    def update(g: jax.Array, low: jax.Array, n: jax.Array, basis: Basis, prev: Any, first: Any) -> tuple:
        phi = scaling_factor(n, low, basis.layout, granularity)
        s = scaled_gradient(g, phi, basis.layout)
        ell, kept = limit_norm_growth(jnp.linalg.norm(s.astype(jnp.float32), axis=(-2, -1)), prev, gamma, first)
        factor = jnp.sqrt(jnp.asarray(scale, jnp.float32)) / ell[..., None, None]
        return factor.astype(g.dtype) * s, kept

    return update


def _scale_by_low_rank(
    rank: int,
    refresh: Refresh,
    base_optimizer: optax.GradientTransformation | None,
    proj_type: str,
    mask: masks.Mask,
    *,
    leaf_update: LeafUpdate,
    limited: bool,
    axes: Any,
    basis_dtype: Any,
    method: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The machinery GaLore, Fira and APOLLO share: bases, the inner optimizer, and each selected
    leaf's ``leaf_update``; ``limited`` keeps the limiter's norms in the state; ``method`` is the
    refresh's (None: ``refresh.method``; APOLLO's ``"random"``)."""
    check_int("rank", rank, 1, static=True)
    check_choice("proj_type", proj_type, PROJ_TYPES)
    if not isinstance(refresh, Refresh):
        raise TypeError(f"`refresh` must be a fira_jax.Refresh, got {refresh!r}.")
    update_proj_gap, stagger, refresh_by_shape = refresh.update_proj_gap, refresh.stagger, refresh.by_shape
    canonical_signs, oversample, seed = refresh.canonical_signs, refresh.oversample, refresh.seed
    power_iters, svd = refresh.iterations, refresh.method if method is None else method
    drawn = svd in RANDOM_METHODS  # the refresh draws random numbers: each matrix keeps its index
    if refresh.moments == "reproject" and svd == "random":
        raise ValueError(
            "Refresh(moments='reproject') needs orthonormal bases; APOLLO's random projection is not one. "
            "Use moments='keep' (the reference's) or 'reset', or proj='svd'."
        )
    inner = optax.with_extra_args_support(scale_by_torch_adam() if base_optimizer is None else base_optimizer)

    def tree_layouts(tree: Any) -> list[Layout | None]:
        return layouts(tree, rank, proj_type, mask, axes)

    def init_fn(params: Any) -> LowRankState:
        slots, treedef = sharding.flatten(params)
        left, right, proxies, norms, index = [], [], [], [], []
        lays, skipped = selection(sharding.pure(params), rank, proj_type, mask, axes)
        if skipped:
            _log.warning("%s", describe(lays, skipped))
        elif any(lay is not None for lay in lays):
            _log.info("%s", describe(lays, skipped))
        elif slots and all(lay is None for lay in lays):  # a mask matching nothing (a typo) saves nothing
            paths = [masks.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(sharding.pure(params))[0]]
            _log.warning(
                "fira_jax: the mask selects none of the %d leaves (%s): every leaf gets the subspace "
                "optimizer's full state and no memory is saved; check the mask",
                len(paths), ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else ""),
            )  # fmt: skip
        for slot, lay in zip(slots, lays, strict=True):
            if lay is None:
                left.append(optax.MaskedNode())
                right.append(optax.MaskedNode())
                proxies.append(slot)
                norms.append(optax.MaskedNode())
                index.append(optax.MaskedNode())
                continue
            dtype = sharding.value(slot).dtype
            b = default_basis(lay, basis_dtype or dtype)
            left.append(optax.MaskedNode() if b.left is None else sharding.place(b.left, slot, lay, "left"))
            right.append(optax.MaskedNode() if b.right is None else sharding.place(b.right, slot, lay, "right"))
            proxies.append(sharding.place(jnp.zeros(lay.low_shape, dtype), slot, lay, "moments"))
            norms.append(sharding.place(jnp.zeros(lay.batch, jnp.float32), slot, lay, "norms"))
            ids = jnp.arange(math.prod(lay.batch), dtype=jnp.int32).reshape(lay.batch)
            index.append(sharding.place(ids, slot, lay, "norms"))
        inner_state = inner.init(treedef.unflatten(proxies))
        low_shapes = {i: lay.low_shape for i, lay in enumerate(lays) if lay is not None}
        moments.check(inner_state, treedef, low_shapes, refresh.moments)
        return LowRankState(
            count=jnp.zeros([], jnp.int32),
            left=treedef.unflatten(left),
            right=treedef.unflatten(right),
            inner=inner_state,
            norms=treedef.unflatten(norms) if limited else None,
            index=treedef.unflatten(index) if drawn else None,
        )

    def update_fn(updates: Any, state: LowRankState, params: Any = None, **extra_args: Any) -> tuple[Any, LowRankState]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        lays = tree_layouts(updates)
        old_left, old_right = treedef.flatten_up_to(state.left), treedef.flatten_up_to(state.right)
        picked = [i for i, lay in enumerate(lays) if lay is not None]
        _check_bases(lays, old_left, old_right)
        grads = {i: lays[i].canonical(leaves[i]) for i in picked}

        # 1. The bases (refreshed where due) and the low-rank gradients R.
        old = [
            Basis(
                old_left[i] if lays[i].side in ("left", "full") else None,
                old_right[i] if lays[i].side in ("right", "full") else None,
                lays[i],
            )
            for i in picked
        ]
        keys = None
        if drawn:
            if state.index is None:
                raise ValueError(
                    "this state has no matrix indices (`index`): it was not made by this transformation's init"
                )
            index = treedef.flatten_up_to(state.index)
            keys = [matrix_keys(seed, lays[i].path, index[i], state.count) for i in picked]
        new, dues = refresh_bases(
            [grads[i] for i in picked], old, state.count, update_proj_gap=update_proj_gap, stagger=stagger,
            refresh_by_shape=refresh_by_shape, keys=keys, signs=canonical_signs, svd=svd, oversample=oversample,
            power_iters=power_iters,
        )  # fmt: skip
        bases = dict(zip(picked, new, strict=True))
        lows = {i: bases[i].project(grads[i]) for i in picked}

        # 2. N: the inner optimizer on the low-rank gradients (and on the other leaves as they are),
        # its moments first carried to the refreshed bases as `refresh.moments` says.
        changes = {i: (o, n, d) for i, o, n, d in zip(picked, old, new, dues, strict=True)}
        inner_state = moments.carry(state.inner, treedef, changes, refresh.moments)
        inner_in = [lows.get(i, leaf) for i, leaf in enumerate(leaves)]
        coeffs, inner_state = inner.update(treedef.unflatten(inner_in), inner_state, None, **extra_args)
        out = treedef.flatten_up_to(coeffs)  # the other leaves' updates, as the inner optimizer gives them

        # 3-5. Each selected leaf's update (GaLore, Fira or APOLLO), and the limiter's norm to keep.
        norms = treedef.flatten_up_to(state.norms) if limited else [None] * len(leaves)
        for i in picked:
            u, norms[i] = leaf_update(grads[i], lows[i], out[i], bases[i], norms[i], state.count == 0)
            out[i] = lays[i].restore(u.astype(grads[i].dtype))

        def side(attr: str) -> Any:  # one side's bases, MaskedNode where a leaf has none
            found = [getattr(bases[i], attr) if i in bases else None for i in range(len(leaves))]
            return treedef.unflatten([optax.MaskedNode() if b is None else b for b in found])

        new_state = LowRankState(
            count=optax.safe_int32_increment(state.count),
            left=side("left"),
            right=side("right"),
            inner=inner_state,
            norms=treedef.unflatten(norms) if limited else None,
            index=state.index,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_bases(lays: list[Layout | None], left: list[Any], right: list[Any]) -> None:
    """Each projected leaf's bases in the state have the shapes its update's layout needs, else a
    ValueError naming the leaf (updates of another shape than the parameters, e.g. transposed)."""
    for lay, lb, rb in zip(lays, left, right, strict=True):
        if lay is None:
            continue
        need = {
            "left": (*lay.batch, lay.m, lay.rank) if lay.side in ("left", "full") else None,
            "right": (*lay.batch, lay.rank, lay.n) if lay.side in ("right", "full") else None,
        }
        for kind, have in (("left", lb), ("right", rb)):
            have_shape, need_shape = getattr(have, "shape", None), need[kind]
            if have_shape is not None:
                have_shape = tuple(have_shape)
            if have_shape != need_shape:
                raise ValueError(
                    f"The update of leaf '{lay.path}' has shape {lay.shape}, but the state was built for another "
                    f"shape (its {kind} basis is {have_shape}, this update needs {need_shape}): updates must have "
                    "the parameters' shapes (a transposed gradient?), and the state must come from this "
                    "transformation's init on those parameters."
                )


def scale_by_galore(
    rank: int = 128,
    scale: float = 0.25,
    *,
    refresh: Refresh = DEFAULT_REFRESH,
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = "std",
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore's update: the inner optimizer in the top-``rank`` singular subspace of each gradient.

    For each selected leaf, with P the top-``rank`` singular vectors of G (computed in float32
    every ``update_proj_gap`` steps, kept in between):

    .. math::
      R = G P^T \ (\text{right}) \ \text{or} \ P^T G \ (\text{left}), \qquad
      N = \text{inner}(R), \qquad U = \text{scale} \cdot \text{back}(N)

    ``proj_type="full"`` projects on both sides: ``R = U_r^T G V_r``. Other leaves get the
    inner optimizer's update. :func:`fira_jax.galore` follows this with Adam's bias correction,
    the learning rate and weight decay.

    Args:
      rank: the subspace's dimension ``r`` (an int ≥ 1); a matrix whose smaller side is at most
        ``rank`` is left full-rank.
      scale: the low-rank update's scale (``alpha``; 0.25 in the papers' pre-training runs).
      base_optimizer: the optimizer in the subspace, any optax transformation that does not need
        the parameters' values (it receives ``params=None``): default :func:`fira_jax.scale_by_torch_adam`
        (no bias correction); :func:`optax.scale_by_lion`, :func:`optax.scale_by_factored_rms`,
        a chain with a stateless transformation such as ``optax.clip_by_global_norm`` (which then
        sees the low-rank update only), and so on. Its state is low-rank.
      proj_type: which side each m × n matrix is projected on: ``"std"`` right if m ≥ n else left
        (the authors' default: the smaller basis, the larger moments), ``"reverse_std"`` the
        opposite (the smaller state when m ≠ n), ``"right"``, ``"left"`` or ``"full"``; the state
        each keeps is tabled in docs/semantics.md.
      mask: which leaves to project: a pytree of bools or a callable from the params to one (as
        in :func:`optax.masked`); default every floating-point leaf with exactly 2 dimensions,
        and those with more whose ``axes`` are declared. See :func:`fira_jax.mask_by_path`. A
        selected matrix whose smaller side is at most ``rank``, or a leaf with more than 2 axes
        and no declared ``axes``, is left full-rank (``init`` logs which;
        :func:`fira_jax.layout.selection`).
      axes: which axes form each leaf's matrix: a :class:`fira_jax.MatrixAxes` (for every leaf),
        a pytree of them (None: undeclared), a callable from the params to one, or
        :func:`fira_jax.axes_by_path`. A 2-D leaf is its own matrix; a leaf with more axes is
        projected only where declared (``MatrixAxes()`` declares a stack of matrices over the
        leading axes, as ``nnx.scan`` makes them).
      basis_dtype: dtype of the stored bases; default the leaf's dtype, as in the reference
        (which casts the float32 SVD to the gradient's dtype).
      refresh: when and how the bases are recomputed (:class:`fira_jax.Refresh`: the gap, the
        method, staggering, refreshing by shape, canonical signs, what the moments become).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`LowRankState`; extra arguments
      of ``update`` are passed on to the inner optimizer.

    Raises:
      ValueError: at construction, for an invalid value (naming the argument); at ``init``, for
        a selected leaf that has fewer than 2 dimensions or is not floating point (naming its path).
      TypeError: at construction, for an argument of the wrong type (``refresh`` that is not a
        :class:`fira_jax.Refresh`, a non-integer ``rank``).

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.scale_by_galore(rank=2, refresh=fira_jax.Refresh(update_proj_gap=10))
      >>> state = tx.init({"w": jnp.ones((6, 4))})
      >>> state.right["w"].shape, state.inner.mu["w"].shape  # P is 2 x 4; Adam's moments 6 x 2
      ((2, 4), (6, 2))

    References:
      Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
      <https://arxiv.org/abs/2403.03507>`_, 2024.
    """
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)
    return _scale_by_low_rank(
        rank, refresh, base_optimizer, proj_type, mask, leaf_update=_galore_leaf(scale), limited=False, axes=axes,
        basis_dtype=basis_dtype,
    )  # fmt: skip


def scale_by_fira(
    rank: int = 128,
    scale: float = 0.25,
    *,
    refresh: Refresh = DEFAULT_REFRESH,
    residual: Residual = DEFAULT_RESIDUAL,
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = "std",
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fira's update: GaLore's, plus the residual outside the subspace, scaled and limited.

    For each selected leaf (Chen et al., 2024, Algorithm 1; steps 1-5 of this module):

    .. math::
      U = \text{scale} \cdot \text{back}(N) + \frac{S}{\ell}, \qquad
      S = \phi \odot (G - s \cdot \text{back}(R)), \qquad \phi = \frac{\|N\|}{\|R\| + 10^{-8}}

    with R, N as in :func:`scale_by_galore`, ``s`` the residual's ``residual_scale`` and ``ell``
    the limiter's divisor, which keeps ``||S||`` from growing by more than its ``gamma`` per step.
    :func:`fira_jax.fira` follows this with Adam's bias correction (so the limiter sees
    uncorrected norms, as in the reference), the learning rate and weight decay.

    The other arguments are :func:`scale_by_galore`'s (``proj_type="full"`` excepted).

    Args:
      residual: how the residual is scaled and limited (:class:`fira_jax.Residual`:
        ``granularity``, ``residual_scale``, ``gamma``; the paper's Table 5 ablations are its
        ``granularity="matrix"`` / ``"none"`` and ``gamma=inf``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`LowRankState`.

    Raises:
      ValueError: at construction, for an invalid value (naming the argument), including
        ``proj_type="full"`` (the column scaling is undefined there); at ``init``, for a selected
        leaf that has fewer than 2 dimensions or is not floating point (naming its path).
      TypeError: at construction, for an argument of the wrong type (``refresh`` or ``residual``
        that is not a :class:`fira_jax.Refresh` or :class:`fira_jax.Residual`, a non-integer ``rank``).

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.scale_by_fira(rank=2, axes=fira_jax.MatrixAxes())  # w: a stack
      >>> state = tx.init({"w": jnp.ones((3, 6, 4)), "b": jnp.zeros(4)})
      >>> state.norms["w"].shape  # the limiter keeps one norm per stacked matrix
      (3,)

    References:
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?
      <https://arxiv.org/abs/2410.01623>`_, 2024.
    """
    if proj_type == "full":
        raise ValueError(
            "`proj_type` 'full' (two-sided projection) is GaLore-only: Fira's column-wise scaling of the "
            "residual is undefined there. Use fira_jax.galore, or a one-sided proj_type."
        )
    if not isinstance(residual, Residual):
        raise TypeError(f"`residual` must be a fira_jax.Residual, got {residual!r}.")
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)
    s = scale if residual.residual_scale is None else residual.residual_scale
    leaf_update = _fira_leaf(scale, residual.granularity, s, residual.gamma)
    return _scale_by_low_rank(
        rank,
        refresh,
        base_optimizer,
        proj_type,
        mask,
        leaf_update=leaf_update,
        limited=True,
        axes=axes,
        basis_dtype=basis_dtype,
    )


# APOLLO's scaling factor: per channel (Fira's column) or per matrix.
ScaleType = Literal["channel", "tensor"]
SCALE_TYPES: tuple[str, ...] = get_args(ScaleType)
# APOLLO's projection: a Gaussian random matrix, or GaLore's SVD basis.
Projection = Literal["random", "svd"]
PROJECTIONS: tuple[str, ...] = get_args(Projection)


def scale_by_apollo(
    rank: int = 128,
    scale: float = 1.0,
    *,
    refresh: Refresh = DEFAULT_REFRESH,
    scale_type: ScaleType = "channel",
    proj: Projection = "random",
    gamma: float = 1.01,
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = "std",
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO's update: the whole gradient, scaled by factors measured in a random subspace, limited.

    For each selected leaf (Zhu et al., 2025, Algorithm 1, as the authors' ``APOLLOAdamW`` in
    ``apollo-torch`` 1.0.3 implements it):

    .. math::
      R = G P^T \ (\text{right}) \ \text{or} \ P^T G \ (\text{left}), \qquad N = \text{inner}(R),
      \qquad \phi = \frac{\|N\|}{\|R\| + 10^{-8}}, \qquad
      U = \sqrt{\text{scale}} \cdot \frac{\phi \odot G}{\ell}

    with P a Gaussian random matrix of variance ``1 / rank`` drawn from a fresh seed every
    ``update_proj_gap`` steps (:func:`fira_jax.basis.random_projection`; ``proj="svd"``: GaLore's
    top singular vectors instead), phi per channel (Fira's :func:`fira_jax.scaling_factor` with
    ``"column"``) or per matrix (``"matrix"``), and ``ell`` Fira's norm-growth limiter on
    ``||phi ⊙ G||`` (:func:`fira_jax.limit_norm_growth`). Nothing is projected back: the
    subspace only measures how Adam would scale each channel, and the state is Adam's moments of
    R plus P. :func:`fira_jax.apollo` follows this with Adam's bias correction, the learning rate
    and weight decay; :func:`fira_jax.apollo_mini` is rank 1 with one factor per matrix.

    ``scale`` follows the authors' convention: the update is multiplied by ``sqrt(scale)``
    (their ``--apollo_scale``: 1 for APOLLO, 128 for APOLLO-Mini in their scripts).

    The other arguments are :func:`scale_by_galore`'s (``proj_type="full"`` excepted).

    Args:
      scale: the update is multiplied by ``sqrt(scale)`` (≥ 0).
      scale_type: ``"channel"`` (APOLLO: one factor per row of G on the right side, per
        column on the left) or ``"tensor"`` (APOLLO-Mini: one factor per matrix).
      proj: ``"random"`` (APOLLO's Gaussian projection, no SVD) or ``"svd"`` (the top singular
        vectors, computed by ``refresh.method``).
      gamma: the limiter's largest growth factor of ``||phi ⊙ G||`` per step, ≥ 1 (1.01 in the
        reference, which hard-codes it; ``inf`` is its ``disable_nl``).
      refresh: when the projections are redrawn (``update_proj_gap``) and their ``seed``
        (folded with the refresh step and the leaf); :class:`fira_jax.Refresh`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`LowRankState`.

    Raises:
      ValueError: at construction, for an invalid value (naming the argument), including
        ``proj_type="full"`` (a random projection is one-sided); at ``init``, for a selected leaf
        that has fewer than 2 dimensions or is not floating point (naming its path).
      TypeError: at construction, for an argument of the wrong type (``refresh`` or ``residual``
        that is not a :class:`fira_jax.Refresh` or :class:`fira_jax.Residual`, a non-integer ``rank``).

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.scale_by_apollo(rank=2, refresh=fira_jax.Refresh(update_proj_gap=10))
      >>> state = tx.init({"w": jnp.ones((6, 4))})
      >>> state.right["w"].shape, state.inner.mu["w"].shape  # P is 2 x 4; Adam's moments 6 x 2
      ((2, 4), (6, 2))

    References:
      Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
      <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
    """
    if proj_type == "full":
        raise ValueError("`proj_type` 'full' (two-sided projection) is GaLore-only: APOLLO projects on one side.")
    check_choice("scale_type", scale_type, SCALE_TYPES)
    check_choice("proj", proj, PROJECTIONS)
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)
    check_float("gamma", gamma, low=1.0, high=float("inf"), high_open=False)
    granularity = "column" if scale_type == "channel" else "matrix"
    return _scale_by_low_rank(
        rank,
        refresh,
        base_optimizer,
        proj_type,
        mask,
        leaf_update=_apollo_leaf(scale, granularity, gamma),
        limited=True,
        axes=axes,
        basis_dtype=basis_dtype,
        method="random" if proj == "random" else None,
    )
