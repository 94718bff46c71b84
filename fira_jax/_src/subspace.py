r"""The subspace optimizer every member of the family is: one public seam, :func:`scale_by_subspace`.

For each selected leaf, with G its gradient as a stack of ``batch + (m, n)`` matrices
(:class:`fira_jax.Layout`), one update is:

1. P: the basis, recomputed every ``update_proj_gap`` steps by the refresh's ``method`` (top
   singular vectors, or APOLLO's random projection: :func:`fira_jax.projections.refresh_bases`);
   ``R = P^T G`` or ``G P^T`` (:meth:`fira_jax.Basis.project`);
2. ``N = inner(R)``: any optax transformation in the subspace (Adam by default), one call over the
   whole tree: the low-rank gradients of the selected leaves and the other leaves as they are, so
   its state is low-rank; at a refresh its moments are first kept, reset or carried into the new
   basis (``Refresh(moments=...)``);
3. ``ell``: the limiter's divisor, from the norm the compensation names (``gamma`` None: 1);
4. ``U = compensation.update(x, ell)``, with ``x`` the leaf's :class:`Subspace` (G, R, N, P).

GaLore, Fira and APOLLO differ only in the compensation (:mod:`fira_jax` ``galore_update``,
``fira_residual``, ``apollo_scaling``) and the limiter. The other leaves get the inner optimizer's
output. Every value passes from one step to the next as an argument: the state is a
:class:`LowRankState` of arrays, and nothing is carried beside it.
"""

import itertools
import logging
import math
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax._src import masks, moments, sharding
from fira_jax._src.adam import scale_by_torch_adam
from fira_jax._src.basis import RANDOM_METHODS, Basis, default_basis
from fira_jax._src.layout import PROJ_TYPES, Layout, ProjType, describe, layouts, selection
from fira_jax._src.limiter import limit_norm_growth
from fira_jax._src.options import CHUNK_BYTES, PROJ_TYPE, RANK, Refresh
from fira_jax._src.projection import refresh_bases
from fira_jax._src.validation import check_choice, check_float, check_int

_log = logging.getLogger("fira_jax")

STATE_VERSION = 2
"""The format of :class:`LowRankState`: 1 before ``index`` was added, 2 since. Save it
beside the state (the examples record it in each checkpoint) and compare it when you restore."""


class LowRankState(NamedTuple):
    """State of :func:`scale_by_subspace` and of the family built on it (format :data:`STATE_VERSION`).

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
        previous step (one float32 per matrix, shape ``batch``); ``optax.MaskedNode()``
        elsewhere. None without a limiter (GaLore).
      index: for the refresh methods that draw random numbers (APOLLO's projection, the
        randomized SVD, the subspace iteration), per selected leaf each matrix's index in its
        stack (int32, shape ``batch``; :func:`fira_jax.projections.matrix_keys`),
        ``optax.MaskedNode()`` elsewhere; None for the other methods. It travels with the matrix:
        the per-layer step, which updates one layer's slice of the state, draws what the
        whole-model step draws.

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


class Subspace(NamedTuple):
    """One selected leaf at one step, as a :class:`Compensation` sees it (canonical arrays).

    Attributes:
      grad: G, ``batch + (m, n)``.
      low: R, the low-rank gradient (:meth:`Basis.project`).
      inner: N, the inner optimizer's output on R (R's shape).
      basis: P, with the leaf's :class:`fira_jax.Layout` as ``basis.layout``.
    """

    grad: jax.Array
    low: jax.Array
    inner: jax.Array
    basis: Basis


class Compensation(NamedTuple):
    r"""How a subspace optimizer turns one leaf's :class:`Subspace` into its update.

    Attributes:
      update: ``(x, ell) -> U``, canonical, with ``ell`` the limiter's divisor per matrix (shape
        ``batch``; ones without a limiter); e.g. GaLore's ``scale · back(N)``.
      norm: ``x -> ||C||`` per matrix (float32, shape ``batch``): the norm of the part of U that
        the limiter bounds (Fira: its scaled residual; APOLLO: its scaled gradient), which
        ``update`` divides by ``ell``. None: nothing to limit.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> sign_sgd = fira_jax.Compensation(lambda x, ell: jnp.sign(x.grad))  # ignores the subspace
      >>> tx = fira_jax.scale_by_subspace(sign_sgd, rank=2)
      >>> updates, _ = tx.update({"w": -jnp.ones((6, 4))}, tx.init({"w": jnp.ones((6, 4))}))
      >>> float(updates["w"].sum())
      -24.0
    """

    update: Callable[[Subspace, jax.Array], jax.Array]
    norm: Callable[[Subspace], jax.Array] | None = None


def matrix_keys(seed: int, path: str, index: jax.Array, count: jax.Array) -> jax.Array:
    """The PRNG key of each matrix of a leaf at a refresh: a function of the ``seed``, the leaf's
    ``path``, the matrix's ``index`` in its stack and the refresh's step ``count``, nothing else.

    Returns:
      A key array shaped like ``index``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fira_jax.projections import matrix_keys
      >>> stack = matrix_keys(0, "layers/mlp/kernel", jnp.arange(3), jnp.int32(200))
      >>> alone = matrix_keys(0, "layers/mlp/kernel", jnp.int32(1), jnp.int32(200))  # layer 1's slice
      >>> bool((jax.random.key_data(stack[1]) == jax.random.key_data(alone)).all())
      True
    """
    return leaves_matrix_keys(seed, [path], [index], count)[0]


def leaves_matrix_keys(seed: int, paths: list[str], indices: list[jax.Array], count: jax.Array) -> list[jax.Array]:
    """:func:`matrix_keys` of several leaves at once: the same keys, derived in one vectorized
    computation (a PRNG derivation per leaf would compile its own Threefry rounds, three per leaf)."""
    if not paths:  # no projected leaf
        return []
    tags = [zlib.crc32(path.encode()) & 0x7FFFFFFF for path in paths]
    sizes = [math.prod(jnp.shape(index)) for index in indices]
    leaf_tags = jnp.concatenate([jnp.full(n, t, jnp.uint32) for t, n in zip(tags, sizes, strict=True)])
    flat = jnp.concatenate([jnp.reshape(index, -1).astype(jnp.uint32) for index in indices])
    root = jax.random.key(seed)
    fold = jax.random.fold_in
    keys = jax.vmap(lambda tag, i: fold(fold(fold(root, tag), i), count))(leaf_tags, flat)
    ends = itertools.accumulate(sizes)
    return [keys[e - n : e].reshape(jnp.shape(index)) for e, n, index in zip(ends, sizes, indices, strict=True)]


def scale_by_subspace(
    compensation: Compensation,
    rank: int = RANK,
    *,
    refresh: Refresh = Refresh(),
    inner: optax.GradientTransformation | None = None,
    gamma: float | None = None,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
    chunk_bytes: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Any subspace optimizer: a basis, an optimizer inside it, a compensation outside it, a limiter.

    For each selected leaf, with P refreshed every ``refresh.update_proj_gap`` steps by
    ``refresh.method`` and x the leaf's :class:`Subspace`:

    .. math::
      R = G P^T \ (\text{right}) \ \text{or} \ P^T G \ (\text{left}), \qquad N = \text{inner}(R),
      \qquad \ell = \text{limiter}(\|C\|), \qquad U = \text{compensation.update}(x, \ell)

    with the limiter :func:`fira_jax.limit_norm_growth` at ``gamma`` on ``compensation.norm(x)``
    (``gamma`` None: ``ell = 1`` and no limiter state). :func:`fira_jax.scale_by_galore`,
    :func:`fira_jax.scale_by_fira` and :func:`fira_jax.scale_by_apollo` are this function with
    their compensations (:func:`fira_jax.galore_update`, :func:`fira_jax.fira_residual`,
    :func:`fira_jax.apollo_scaling`); :doc:`build_your_own` writes a new one.

    Args:
      compensation: what each selected leaf's update is (:class:`Compensation`).
      rank: the subspace's dimension ``r`` (an int ≥ 1); a matrix whose smaller side is at most
        ``rank`` is left full-rank.
      refresh: when and how the bases are recomputed, including ``method="random"`` (APOLLO's
        Gaussian projection) and what the inner optimizer's moments become
        (:class:`fira_jax.Refresh`).
      inner: the optimizer in the subspace, any optax transformation (default
        :func:`fira_jax.scale_by_torch_adam`). Its state is low-rank. One that needs the
        parameters receives them projected on the current basis, ``P^T W`` or ``W P^T`` (the
        low-rank shape; zeros at ``init``), and the other leaves' as they are.
      gamma: the limiter's largest growth factor of ``||C||`` per step (≥ 1; ``inf``: recorded,
        never limiting); None: no limiter.
      proj_type: which side each m × n matrix is projected on: ``"std"`` right if m ≥ n else left
        (the authors' default), ``"reverse_std"`` the opposite, ``"right"``, ``"left"`` or
        ``"full"`` (both); the state each keeps is tabled in docs/semantics.md.
      mask: which leaves to project: a pytree of bools or a callable from the params to one (as
        in :func:`optax.masked`); default every floating-point leaf with exactly 2 dimensions,
        and those with more whose ``axes`` are declared (:func:`fira_jax.mask_by_path`;
        ``init`` logs which leaves stay full-rank and why: :func:`fira_jax.matrices.selection`).
      axes: which axes form each leaf's matrix: a :class:`fira_jax.MatrixAxes` (for every leaf),
        a pytree of them (None: undeclared), a callable from the params to one,
        :func:`fira_jax.axes_by_path` or :func:`fira_jax.axes_from_logical`.
      basis_dtype: dtype of the stored bases; default the leaf's dtype, as in the references.
      chunk_bytes: a stacked leaf whose gradient is larger is compensated (steps 3-4) a chunk of
        matrices of at most this many bytes at a time (at least one matrix), in a loop that writes
        each chunk's update over its gradient, so that the update stays at the step's memory
        floor; None: 128 MiB (``fira_jax._src.options.CHUNK_BYTES``); ``float("inf")``: every
        stack at once (no loop; more temporaries). The numbers are the same either way.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`LowRankState`; extra arguments
      of ``update`` are passed on to the inner optimizer.

    Raises:
      ValueError: at construction, for an invalid value (naming the argument); at ``init``, for
        a selected leaf that has fewer than 2 dimensions or is not floating point (naming its path).
      TypeError: at construction, for an argument of the wrong type.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> galore = fira_jax.galore_update(scale=0.25)  # U = 0.25 back(N): GaLore
      >>> tx = fira_jax.scale_by_subspace(galore, rank=2, refresh=fira_jax.Refresh(update_proj_gap=10))
      >>> state = tx.init({"w": jnp.ones((6, 4))})
      >>> state.right["w"].shape, state.inner.mu["w"].shape  # P is 2 x 4; Adam's moments 6 x 2
      ((2, 4), (6, 2))
    """
    _check_seam(compensation, rank, refresh, gamma, proj_type, chunk_bytes)
    inner = optax.with_extra_args_support(scale_by_torch_adam() if inner is None else inner)
    limited, drawn = gamma is not None, refresh.method in RANDOM_METHODS

    def init_fn(params: Any) -> LowRankState:
        slots, treedef = sharding.flatten(params)
        lays = _selected(params, rank, proj_type, mask, axes)
        per_leaf = [_init_leaf(slot, lay, basis_dtype) for slot, lay in zip(slots, lays, strict=True)]
        left, right, proxies, norms, index = ([leaf[k] for leaf in per_leaf] for k in range(5))
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
        leaves, treedef = jax.tree.flatten(updates)
        lays = layouts(updates, rank, proj_type, mask, axes)
        picked = [i for i, lay in enumerate(lays) if lay is not None]
        grads = {i: lays[i].canonical(leaves[i]) for i in picked}
        old, bases, dues = _refreshed(grads, lays, state, treedef, refresh)  # 1. P, where due
        lows = {i: bases[i].project(grads[i]) for i in picked}

        # 2. N: the inner optimizer on the low-rank gradients and on the other leaves as they are,
        # its moments first carried to the refreshed bases as `refresh.moments` says.
        changes = {i: (old[i], bases[i], dues[i]) for i in picked}
        inner_state = moments.carry(state.inner, treedef, changes, refresh.moments)
        inner_in = treedef.unflatten([lows.get(i, leaf) for i, leaf in enumerate(leaves)])
        inner_params = _projected_params(params, treedef, lays, bases)
        coeffs, inner_state = inner.update(inner_in, inner_state, inner_params, **extra_args)
        out = treedef.flatten_up_to(coeffs)  # the other leaves' updates, as the inner optimizer gives them

        # 3-4. The limiter's divisor and each selected leaf's update.
        norms = treedef.flatten_up_to(state.norms) if limited else [None] * len(leaves)
        for i in picked:
            x = Subspace(grads[i], lows[i], out[i], bases[i])
            update, norms[i] = _compensate(compensation, x, norms[i], gamma, state.count == 0, chunk_bytes)
            out[i] = lays[i].restore(update)

        new_state = LowRankState(
            count=optax.safe_int32_increment(state.count),
            left=_side(bases, treedef, "left"),
            right=_side(bases, treedef, "right"),
            inner=inner_state,
            norms=treedef.unflatten(norms) if limited else None,
            index=state.index,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def chunk_size(layout: Layout, itemsize: int, chunk_bytes: float | None) -> int:
    """How many matrices of a stack are compensated at once: as many as fit in ``chunk_bytes`` of
    gradient (None: ``CHUNK_BYTES``), at least one, rounded down to a divisor of the stack's size."""
    size = math.prod(layout.batch)
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if budget == float("inf"):
        return max(size, 1)
    fit = max(1, int(budget) // (layout.m * layout.n * itemsize))
    return size if fit >= size else max(d for d in range(1, fit + 1) if size % d == 0)


def _compensate(
    compensation: Compensation, x: Subspace, previous: Any, gamma: Any, first: Any, chunk_bytes: float | None
) -> tuple[jax.Array, Any]:
    """Steps 3-4 for one leaf: its update (G's dtype) and the limiter's norm to keep.

    A stack larger than ``chunk_bytes`` is compensated a chunk of matrices at a time
    (:func:`chunk_size`): a first loop takes each matrix's norm for the limiter, a second writes each
    chunk's update over that chunk of the gradient, so the update's temporaries are one chunk's,
    not the stack's (the update of a stack of ``L`` matrices otherwise holds several ``L``-matrix
    temporaries, above the step's floor). A stack sharded along its stacking axes: at once.
    """
    lay = x.basis.layout
    size, k = math.prod(lay.batch), chunk_size(lay, x.grad.dtype.itemsize, chunk_bytes)
    spec = sharding.explicit_spec(x.grad)
    if k >= size or (spec is not None and any(a is not None for a in tuple(spec)[: len(lay.batch)])):
        ell, kept = _limit(compensation, x, previous, gamma, first)
        return compensation.update(x, ell).astype(x.grad.dtype), kept
    chunks = _chunked(x, size // k, k)
    if gamma is None:
        ell, kept = jnp.ones((size,), jnp.float32), previous
    else:
        norm = jax.lax.map(compensation.norm, chunks).reshape(lay.batch)
        ell, kept = limit_norm_growth(norm, previous, gamma, first)
    ells = ell.reshape(size // k, *chunks.basis.layout.batch)

    def body(c: jax.Array, g: jax.Array) -> jax.Array:
        # The chunk's gradient is read from the loop's own buffer, which its update then overwrites.
        x_c = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, c, keepdims=False), chunks._replace(grad=None))
        x_c = x_c._replace(
            grad=jax.lax.dynamic_slice_in_dim(g, c * k, k, 0).reshape(x_c.basis.layout.batch + g.shape[1:])
        )
        u = compensation.update(x_c, jax.lax.dynamic_index_in_dim(ells, c, keepdims=False)).astype(g.dtype)
        return jax.lax.dynamic_update_slice_in_dim(g, u.reshape(k, *g.shape[1:]), c * k, 0)

    update = jax.lax.fori_loop(0, size // k, body, x.grad.reshape(size, *x.grad.shape[-2:]))
    return update.reshape(x.grad.shape), kept


def _chunked(x: Subspace, n: int, k: int) -> Subspace:
    """``x`` with its stacking axes as ``(n, k)``: ``n`` chunks of ``k`` matrices (layout batch ``(k,)``,
    or ``()`` for chunks of one matrix: no unit axis, which the CPU compiler would copy the stacks for)."""
    nb, batch = len(x.basis.layout.batch), (k,) if k > 1 else ()

    def split(a: jax.Array | None) -> jax.Array | None:
        return None if a is None else a.reshape(n, *batch, *a.shape[nb:])

    basis = Basis(split(x.basis.left), split(x.basis.right), x.basis.layout._replace(batch=batch))
    return Subspace(split(x.grad), split(x.low), split(x.inner), basis)


def _limit(compensation: Compensation, x: Subspace, previous: Any, gamma: Any, first: Any) -> tuple[jax.Array, Any]:
    """Step 3: the limiter's divisor for ``compensation.norm(x)`` and the norm to keep (ones and None
    without a limiter)."""
    if gamma is None:
        return jnp.ones(x.basis.layout.batch, jnp.float32), previous
    return limit_norm_growth(compensation.norm(x), previous, gamma, first)


def _check_seam(compensation: Any, rank: Any, refresh: Any, gamma: Any, proj_type: Any, chunk_bytes: Any) -> None:
    """The seam's arguments, checked where the transformation is built (each named)."""
    if chunk_bytes is not None and chunk_bytes != float("inf"):
        check_int("chunk_bytes", chunk_bytes, 1, static=True)
    if not isinstance(compensation, Compensation):
        raise TypeError(f"`compensation` must be a fira_jax.Compensation, got {compensation!r}.")
    check_int("rank", rank, 1, static=True)
    check_choice("proj_type", proj_type, PROJ_TYPES)
    if not isinstance(refresh, Refresh):
        raise TypeError(f"`refresh` must be a fira_jax.Refresh, got {refresh!r}.")
    if gamma is not None:
        check_float("gamma", gamma, low=1.0, high=float("inf"), high_open=False)
        if compensation.norm is None:
            raise ValueError("`gamma` limits the norm that `compensation.norm` gives, and this compensation has none.")
    if refresh.moments == "reproject" and refresh.method == "random":
        raise ValueError(
            "Refresh(moments='reproject') needs orthonormal bases; APOLLO's random projection is not one. "
            "Use moments='keep' (the reference's) or 'reset', or an SVD method."
        )
    if proj_type == "full" and refresh.method == "random":
        raise ValueError(
            "`proj_type` 'full' (two-sided projection) needs an SVD method: a random projection is one-sided."
        )


def _selected(params: Any, rank: int, proj_type: str, mask: masks.Mask, axes: Any) -> list[Layout | None]:
    """Each leaf's layout (None: full-rank), logging what was selected and why the rest was not."""
    lays, skipped = selection(sharding.pure(params), rank, proj_type, mask, axes)
    if skipped:
        _log.warning("%s", describe(lays, skipped))
    elif any(lay is not None for lay in lays):
        _log.info("%s", describe(lays, skipped))
    elif lays:  # a mask matching nothing (a typo) saves nothing
        paths = [masks.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(sharding.pure(params))[0]]
        _log.warning(
            "fira_jax: the mask selects none of the %d leaves (%s): every leaf gets the subspace "
            "optimizer's full state and no memory is saved; check the mask",
            len(paths), ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else ""),
        )  # fmt: skip
    return lays


def _init_leaf(slot: Any, lay: Layout | None, basis_dtype: Any) -> tuple[Any, Any, Any, Any, Any]:
    """One leaf's initial (left basis, right basis, inner optimizer's stand-in, norms, index)."""
    if lay is None:
        return optax.MaskedNode(), optax.MaskedNode(), slot, optax.MaskedNode(), optax.MaskedNode()
    dtype = sharding.value(slot).dtype
    b = default_basis(lay, basis_dtype or dtype)
    ids = jnp.arange(math.prod(lay.batch), dtype=jnp.int32).reshape(lay.batch)
    return (
        optax.MaskedNode() if b.left is None else sharding.place(b.left, slot, lay, "left"),
        optax.MaskedNode() if b.right is None else sharding.place(b.right, slot, lay, "right"),
        sharding.place(jnp.zeros(lay.low_shape, dtype), slot, lay, "moments"),
        sharding.place(jnp.zeros(lay.batch, jnp.float32), slot, lay, "norms"),
        sharding.place(ids, slot, lay, "norms"),
    )


def _refreshed(
    grads: dict[int, jax.Array], lays: list[Layout | None], state: LowRankState, treedef: Any, refresh: Refresh
) -> tuple[dict[int, Basis], dict[int, Basis], dict[int, jax.Array]]:
    """Step 1: each selected leaf's (old basis, basis for this step, whether it was refreshed)."""
    picked = list(grads)
    old_left, old_right = treedef.flatten_up_to(state.left), treedef.flatten_up_to(state.right)
    _check_bases(lays, old_left, old_right)
    old = [
        Basis(
            old_left[i] if lays[i].side in ("left", "full") else None,
            old_right[i] if lays[i].side in ("right", "full") else None,
            lays[i],
        )
        for i in picked
    ]
    keys = None
    if refresh.method in RANDOM_METHODS:
        if state.index is None:
            raise ValueError(
                "this state has no matrix indices (`index`): it was not made by this transformation's init"
            )
        index = treedef.flatten_up_to(state.index)
        keys = leaves_matrix_keys(refresh.seed, [lays[i].path for i in picked], [index[i] for i in picked], state.count)
    new, dues = refresh_bases(
        [grads[i] for i in picked], old, state.count, update_proj_gap=refresh.update_proj_gap,
        stagger=refresh.stagger, refresh_by_shape=refresh.by_shape, keys=keys, signs=refresh.canonical_signs,
        svd=refresh.method, oversample=refresh.oversample, power_iters=refresh.iterations, spread=refresh.spread,
    )  # fmt: skip
    return (
        dict(zip(picked, old, strict=True)),
        dict(zip(picked, new, strict=True)),
        dict(zip(picked, dues, strict=True)),
    )


def _projected_params(params: Any, treedef: Any, lays: list[Layout | None], bases: dict[int, Basis]) -> Any:
    """What the inner optimizer gets as ``params``: the selected leaves' ``P^T W`` / ``W P^T`` (their
    low-rank shapes), the others as they are; None without params. Unused values compile away."""
    if params is None:
        return None
    values = treedef.flatten_up_to(params)
    return treedef.unflatten(
        [
            v if lay is None else bases[i].project(lay.canonical(v))
            for i, (v, lay) in enumerate(zip(values, lays, strict=True))
        ]
    )


def _side(bases: dict[int, Basis], treedef: Any, attr: str) -> Any:
    """One side's bases as a tree, ``optax.MaskedNode()`` where a leaf has none."""
    found = [getattr(bases[i], attr) if i in bases else None for i in range(treedef.num_leaves)]
    return treedef.unflatten([optax.MaskedNode() if b is None else b for b in found])


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
