"""Which leaves are projected, and how: the static layout of each selected matrix.

A :class:`Layout` says, for one selected leaf, which axes form its matrix (m × n), which axes
stack independent matrices, which side the basis projects on and at what rank. It depends only
on the leaf's shape and the projection's configuration, never on values, so it is computed
wherever it is needed (at init, at every update) and is never stored in the state.
"""

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from fira_jax import masks

ProjType = Literal["std", "reverse_std", "right", "left", "full"]
PROJ_TYPES: tuple[str, ...] = get_args(ProjType)


class MatrixAxes(NamedTuple):
    """Which axes of a leaf form the matrix that is projected.

    The leaf is viewed as a stack of (rows × cols) matrices: ``rows`` and
    ``cols`` name one axis or a tuple of axes each (flattened, in that order);
    every other axis indexes independent matrices, each with its own basis,
    moments, scaling factors and limiter norm. ``MatrixAxes()`` (rows -2, cols
    -1) declares a stack of matrices over the leading axes, as ``nnx.scan``
    stacks layers. A 2-D leaf needs no declaration; a leaf with more axes is
    projected only where one is given (:func:`fira_jax.axes_by_path`).

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


def side(proj_type: str, m: int, n: int) -> str:
    """The side an m × n matrix is projected on: ``std`` the smaller dimension's (right if m ≥ n), so
    the basis is the smaller one and the moments the larger (m × r): for m > n it keeps more state
    than ``reverse_std`` (2 m r + r n against 2 r n + m r; docs/semantics.md has the table)."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def _normalize_axes(axes: int | tuple[int, ...], ndim: int, empty: bool = False) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    if (not axes and not empty) or any(not isinstance(a, int) or not -ndim <= a < ndim for a in axes):
        raise ValueError
    return tuple(a % ndim for a in axes)


def matrix_axes(
    path: str, shape: tuple[int, ...], axes: MatrixAxes, vectors: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(batch axes, row axes, column axes)`` of a leaf of ``shape`` under ``axes``, each normalized
    to non-negative axes; a ValueError or TypeError naming ``path`` if ``axes`` does not fit.
    ``vectors``: ``cols`` may be empty (a stack of vectors, for :func:`fira_jax.clip_by_norm_growth`)."""
    if not isinstance(axes, MatrixAxes):
        raise TypeError(f"`axes` for leaf '{path}' must be a fira_jax.MatrixAxes or None, got {axes!r}.")
    try:
        rows = _normalize_axes(axes.rows, len(shape))
        cols = _normalize_axes(axes.cols, len(shape), empty=vectors)
    except ValueError:
        raise ValueError(f"`axes` {axes} is not valid for leaf '{path}' with shape {shape}.") from None
    if len(set(rows + cols)) != len(rows + cols):
        raise ValueError(f"`axes` {axes} repeats an axis for leaf '{path}' with shape {shape}.")
    return tuple(a for a in range(len(shape)) if a not in rows + cols), rows, cols


def layout(path: str, leaf: Any, axes: MatrixAxes | None, rank: int, proj_type: str) -> Layout:
    """The :class:`Layout` of one selected leaf; raises naming ``path`` if it cannot be projected."""
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
    batch_axes, rows, cols = matrix_axes(path, shape, MatrixAxes() if axes is None else axes)
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
        side=side(proj_type, m, n),
    )


def layouts(tree: Any, rank: int, proj_type: str, mask: masks.Mask = None, axes: Any = None) -> list[Layout | None]:
    """The :class:`Layout` of every leaf of ``tree`` (None for leaves left full-rank).

    Raises a ValueError or TypeError naming the leaf's path when a selected
    leaf cannot be projected. :func:`selection` also says why a leaf was left full-rank.
    """
    return selection(tree, rank, proj_type, mask, axes)[0]


def selection(
    tree: Any, rank: int, proj_type: str, mask: masks.Mask = None, axes: Any = None
) -> tuple[list[Layout | None], list[tuple[str, str]]]:
    """Which leaves are projected, and how; and the ``(path, reason)`` of each leaf left full-rank.

    The matrix of a leaf is declared, never guessed:

    * With the default ``mask`` (None) and ``axes`` declared leaf by leaf (a pytree, a callable,
      :func:`fira_jax.axes_by_path`), exactly the floating-point leaves with declared axes are
      projected. Otherwise (``axes`` None, or one :class:`MatrixAxes` for every leaf) the
      floating-point leaves with exactly two axes are, and those with more only where a
      :class:`MatrixAxes` for every leaf declares them: an undeclared leaf with more axes (a
      ``DenseGeneral`` or ``MultiHeadAttention`` kernel, a stack of layers) is left full-rank.
    * With an explicit ``mask``, a selected leaf with fewer than two axes or not floating is an
      error; one with more axes and no declared ``axes`` is left full-rank.
    * Either way, a matrix whose smaller side is at most ``rank`` is left full-rank: projecting
      it would keep at least Adam's state and add a decomposition every refresh.

    Leaves left full-rank get the subspace optimizer on their whole gradient (as unselected leaves
    do); the transformations' ``init`` logs them once (logger ``"fira_jax"``, a warning).
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    if isinstance(axes, MatrixAxes):
        leaf_axes: list[Any] = [axes] * len(with_path)
    else:
        leaf_axes = masks.resolve_per_leaf(tree, axes, lambda x: None, "axes")

    if mask is None:
        per_leaf = axes is not None and not isinstance(axes, MatrixAxes)
        selected = [
            getattr(leaf, "ndim", 0) >= 2 and masks.is_float(leaf) and (ax is not None or not per_leaf)
            for (_, leaf), ax in zip(with_path, leaf_axes, strict=True)
        ]
    else:
        selected = masks.resolve_per_leaf(tree, mask, lambda x: None, "mask")
    out: list[Layout | None] = []
    skipped: list[tuple[str, str]] = []
    for (path, leaf), sel, ax in zip(with_path, selected, leaf_axes, strict=True):
        name = masks.path_str(path)
        if not isinstance(sel, bool | np.bool_):
            raise TypeError(f"`mask` must hold bools; got {sel!r} for leaf '{name}'.")
        if not sel:
            out.append(None)
            continue
        if getattr(leaf, "ndim", 0) > 2 and ax is None:
            skipped.append((name, f"shape {tuple(leaf.shape)}: more than 2 axes and no `axes` declared for it"))
            out.append(None)
            continue
        lay = layout(name, leaf, ax, rank, proj_type)
        if rank >= min(lay.m, lay.n):
            skipped.append((name, f"{lay.m} x {lay.n} matrix: rank {rank} is not below its smaller side"))
            out.append(None)
            continue
        out.append(lay)
    return out, skipped


def axes_by_path(rules: dict[str, MatrixAxes]) -> Callable[[Any], Any]:
    """Declares the matrix of each leaf whose '/'-joined path contains a pattern (the first that matches).

    For leaves with more than two axes, whose matrix :func:`fira_jax.fira` and the others never
    guess. With the default ``mask``, exactly the declared leaves are projected, so a scanned
    model's stacked norm scales or biases (2-D, but not matrices) are left out unless declared.

    Common layouts (``nnx`` names):

    * a stack of layers made by ``nnx.scan`` / ``nnx.vmap`` (layers, m, n): ``MatrixAxes()``;
    * ``nnx.MultiHeadAttention``'s query, key and value kernels (features, heads, head_dim):
      ``MatrixAxes(rows=0, cols=(1, 2))``; its output kernel (heads, head_dim, features):
      ``MatrixAxes(rows=(0, 1), cols=2)``; scanned, with a leading layer axis, each axis + 1;
    * a ``DenseGeneral`` kernel: its input axes as ``rows``, its output axes as ``cols``.

    Args:
      rules: pattern -> :class:`MatrixAxes`.

    Returns:
      A callable from the params to a pytree of :class:`MatrixAxes` or None, the ``axes`` of
      :func:`fira_jax.fira`, :func:`fira_jax.galore`, :func:`fira_jax.apollo` and the
      ``scale_by_*`` transformations.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> from fira_jax import MatrixAxes
      >>> params = {"query": {"kernel": jnp.zeros((64, 4, 16))}, "out": {"kernel": jnp.zeros((4, 16, 64))},
      ...           "norm": {"scale": jnp.zeros(64)}}
      >>> axes = fira_jax.axes_by_path({"query": MatrixAxes(rows=0, cols=(1, 2)),  # features x heads.head_dim
      ...                               "out": MatrixAxes(rows=(0, 1), cols=2)})
      >>> state = fira_jax.scale_by_fira(rank=8, axes=axes).init(params)
      >>> state.right["query"]["kernel"].shape  # one 64 x 64 matrix, rank 8
      (8, 64)
    """
    if not isinstance(rules, dict) or not rules:
        raise TypeError(f"axes_by_path needs a non-empty dict of pattern -> MatrixAxes, got {rules!r}.")
    for pattern, ax in rules.items():
        if not isinstance(pattern, str) or not pattern or not isinstance(ax, MatrixAxes):
            raise TypeError(f"axes_by_path: {pattern!r}: {ax!r} is not a pattern (str) -> MatrixAxes rule.")

    def axes_fn(params: Any) -> Any:
        def declare(path: tuple[Any, ...], leaf: Any) -> MatrixAxes | None:
            name = masks.path_str(path)
            return next((ax for pattern, ax in rules.items() if pattern in name), None)

        return jax.tree_util.tree_map_with_path(declare, params)

    return axes_fn
