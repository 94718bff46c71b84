"""Which leaves are projected, and how: the static layout of each selected matrix.

A :class:`Layout` says, for one selected leaf, which axes form its matrix (m × n), which axes
stack independent matrices, which side the basis projects on and at what rank. It depends only
on the leaf's shape and the projection's configuration, never on values, so it is computed
wherever it is needed (at init, at every update) and is never stored in the state.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fira_jax import masks

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


def side(proj_type: str, m: int, n: int) -> str:
    """The side an m × n matrix is projected on: ``std`` the smaller dimension's (right if m ≥ n), so
    the basis is the smaller one and the moments the larger (m × r): for m > n it keeps more state
    than ``reverse_std`` (2 m r + r n against 2 r n + m r; docs/semantics.md has the table)."""
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
        side=side(proj_type, m, n),
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
        out.append(layout(masks.path_str(path), leaf, ax, rank, proj_type) if sel else None)
    return out
