"""Which leaves are projected, and how: the static layout of each selected matrix.

A :class:`fira_jax.Layout` says, for one selected leaf, which axes form its matrix (m × n), which axes
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

from fira_jax._src import masks

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
    """The :class:`fira_jax.Layout` of one selected leaf; raises naming ``path`` if it cannot be projected."""
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
    """The :class:`fira_jax.Layout` of every leaf of ``tree`` (None for leaves left full-rank).

    Raises a ValueError or TypeError naming the leaf's path when a selected
    leaf cannot be projected. :func:`selection` also says why a leaf was left full-rank.
    """
    return selection(tree, rank, proj_type, mask, axes)[0]


BIAS_NAMES = ("bias",)  # Flax's name of a layer's bias


def as_matrix_axes(axes: Any) -> Any:
    """``axes`` as a :class:`fira_jax.MatrixAxes`: optax.contrib's ``MuonDimensionNumbers`` and
    ``GaLoreDimensionNumbers`` (``reduction_axis`` -> rows, ``output_axis`` -> cols, the other axes
    stacked) are what optax's own Muon and GaLore users write; anything else is returned as is."""
    if isinstance(axes, MatrixAxes) or axes is None:
        return axes
    if type(axes).__name__ in ("MuonDimensionNumbers", "GaLoreDimensionNumbers"):

        def norm(a: Any) -> int | tuple[int, ...]:
            return a if isinstance(a, int) else tuple(a)

        return MatrixAxes(rows=norm(axes.reduction_axis), cols=norm(axes.output_axis))
    return axes


def _is_global(axes: Any) -> bool:
    """Whether ``axes`` is one declaration for every leaf (rather than a tree or a callable)."""
    return isinstance(as_matrix_axes(axes), MatrixAxes)


def structure(tree: Any) -> tuple[dict[int, str], dict[int, int]]:
    """The 2-D leaves of ``tree`` that are not matrices by their place in the tree, with why (by
    leaf index in flattening order):

    * a stack of vectors: under a module in which every leaf has at least 2 axes and the same
      first axis ``L``, and some leaf more than 2 (a scanned or vmapped stack of layers: its
      ``(L, d)`` norm scales and biases beside its ``(L, m, n)`` kernels);
    * the bias of a ``DenseGeneral`` (``MultiHeadAttention``'s ``(heads, head_dim)``): a leaf
      named ``bias`` whose shape is the trailing axes of a sibling with more axes.

    And, second, the leaves with more than 2 axes in such a stack of layers, with its ``L``.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(masks.path_str(path).split("/")) for path, _ in with_path]
    shapes = [tuple(getattr(leaf, "shape", ())) for _, leaf in with_path]
    under: dict[tuple[str, ...], list[int]] = {}
    for i, name in enumerate(names):
        for k in range(len(name)):
            under.setdefault(name[:k], []).append(i)
    stacks: dict[tuple[str, ...], int] = {}  # module -> L, for the modules that are stacks of layers
    for module, members in under.items():
        leading = {shapes[i][0] if len(shapes[i]) >= 2 else None for i in members}
        if len(leading) == 1 and None not in leading and any(len(shapes[i]) > 2 for i in members):
            stacks[module] = leading.pop()
    out, kernels = {}, {}
    for i, name in enumerate(names):
        stacked = [m for m in stacks if name[: len(m)] == m]
        if len(shapes[i]) > 2 and stacked:
            kernels[i] = stacks[min(stacked, key=len)]
        if len(shapes[i]) != 2:
            continue
        if stacked:
            module = min(stacked, key=len)
            where = "/".join(module) + "/" if module else "the tree"
            out[i] = (f"shape {shapes[i]}: a stack of {stacks[module]} vectors, not a matrix (every leaf under "
                      f"{where} stacks {stacks[module]} layers on its first axis)")  # fmt: skip
            continue
        if name[-1] not in BIAS_NAMES:
            continue
        for j in under.get(name[:-1], []):
            if len(shapes[j]) > 2 and shapes[j][-2:] == shapes[i]:
                out[i] = (f"shape {shapes[i]}: the bias of '{'/'.join(names[j])}' {shapes[j]} (its trailing axes), "
                          "not a matrix")  # fmt: skip
                break
    return out, kernels


def selection(
    tree: Any, rank: int, proj_type: str, mask: masks.Mask = None, axes: Any = None
) -> tuple[list[Layout | None], list[tuple[str, str]]]:
    """Which leaves are projected, and how; and the ``(path, reason)`` of each leaf left full-rank.

    The matrix of a leaf is declared, never guessed:

    * With the default ``mask`` (None) and ``axes`` declared leaf by leaf (a pytree, a callable,
      :func:`fira_jax.axes_by_path`), exactly the floating-point leaves with declared axes are
      projected. Otherwise (``axes`` None, or one :class:`fira_jax.MatrixAxes` for every leaf) the
      floating-point leaves with exactly two axes are, and those with more only where a
      :class:`fira_jax.MatrixAxes` for every leaf declares them: an undeclared leaf with more axes (a
      ``DenseGeneral`` or ``MultiHeadAttention`` kernel, a stack of layers) is left full-rank.
    * A 2-D leaf whose place in the tree says it is not a matrix (:func:`fira_jax.matrices.structure`: a
      scanned model's ``(layers, d)`` norm scales and biases, a ``DenseGeneral``'s
      ``(heads, head_dim)`` bias) is left full-rank unless its axes are declared leaf by leaf.
    * With an explicit ``mask``, a selected leaf with fewer than two axes or not floating is an
      error; one with more axes and no declared ``axes`` is left full-rank.
    * Either way, a matrix whose smaller side is at most ``rank`` is left full-rank: projecting
      it would keep at least Adam's state and add a decomposition every refresh.

    Declarations may also be optax.contrib's ``MuonDimensionNumbers`` or
    ``GaLoreDimensionNumbers`` (:func:`as_matrix_axes`). Leaves left full-rank get the subspace
    optimizer on their whole gradient (as unselected leaves do); the transformations' ``init``
    logs, once, every projected leaf and every leaf left full-rank with the reason
    (``fira_jax.matrices.describe``).
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    per_leaf = axes is not None and not _is_global(axes)
    if not per_leaf:
        leaf_axes: list[Any] = [as_matrix_axes(axes)] * len(with_path)
    else:
        leaf_axes = [as_matrix_axes(a) for a in masks.resolve_per_leaf(tree, axes, lambda x: None, "axes")]

    if mask is None:
        selected = [
            getattr(leaf, "ndim", 0) >= 2 and masks.is_float(leaf) and (ax is not None or not per_leaf)
            for (_, leaf), ax in zip(with_path, leaf_axes, strict=True)
        ]
    else:
        selected = masks.resolve_per_leaf(tree, mask, lambda x: None, "mask")
    vectors, kernels = ({}, {}) if per_leaf else structure(tree)
    out: list[Layout | None] = []
    skipped: list[tuple[str, str]] = []
    for i, ((path, leaf), sel, ax) in enumerate(zip(with_path, selected, leaf_axes, strict=True)):
        name = masks.path_str(path)
        if not isinstance(sel, bool | np.bool_):
            raise TypeError(f"`mask` must hold bools; got {sel!r} for leaf '{name}'.")
        if not sel:
            out.append(None)
            continue
        if i in vectors:
            skipped.append((name, vectors[i]))
            out.append(None)
            continue
        if getattr(leaf, "ndim", 0) > 2 and ax is None:
            why = f"shape {tuple(leaf.shape)}: more than 2 axes and no `axes` declared for it"
            if i in kernels:
                why += f"; it stacks {kernels[i]} layers' matrices"
            skipped.append((name, why))
            out.append(None)
            continue
        lay = layout(name, leaf, ax, rank, proj_type)
        if rank >= min(lay.m, lay.n):
            skipped.append((name, f"{lay.m} x {lay.n} matrix: rank {rank} is not below its smaller side"))
            out.append(None)
            continue
        out.append(lay)
    return out, skipped


def describe(lays: list[Layout | None], skipped: list[tuple[str, str]]) -> str:
    """What a selection does, in one message: every projected leaf with its matrix shape and rank,
    every selected leaf left full-rank with the reason, and, for undeclared stacks of layers, the
    declaration that would project them."""
    projected = [
        f"{lay.path} ({lay.m} x {lay.n}{f' x{math.prod(lay.batch)} stacked' if lay.batch else ''}, rank {lay.rank})"
        for lay in lays
        if lay is not None
    ]
    parts = [f"fira_jax: {len(projected)} leaves projected: " + ("; ".join(projected) or "none")]
    if skipped:
        parts.append(
            f"{len(skipped)} selected leaves left full-rank (the subspace optimizer on their whole gradient): "
            + "; ".join(f"{path} ({why})" for path, why in skipped)
        )
        stacked = sorted({path for path, why in skipped if "layers' matrices" in why})
        if stacked:
            rules = ", ".join(f'"{path}": fira_jax.MatrixAxes()' for path in stacked)
            parts.append(
                f"to project the stacked layers' matrices, declare them: axes=fira_jax.axes_by_path({{{rules}}})"
            )
    return ". ".join(parts)


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
      rules: pattern -> :class:`fira_jax.MatrixAxes`.

    Returns:
      A callable from the params to a pytree of :class:`fira_jax.MatrixAxes` or None, the ``axes`` of
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


def axes_from_logical(names: Any, layer_axis: str = "layers") -> Any:
    """Matrix declarations from logical axis names: the partitioning metadata a model carries.

    Flax's ``nnx.with_partitioning`` (and MaxText's and levanter's logical axes) name each
    parameter's axes, e.g. ``("layers", "embed", "mlp")`` for a scanned MLP kernel.
    ``nnx.get_partition_spec(nnx.state(model, nnx.Param))`` gives those names as a tree of
    ``PartitionSpec`` s. A leaf whose axes, leaving out ``layer_axis``, are exactly two is
    declared a matrix (rows, cols), stacked over its ``layer_axis`` axes if it has any; any other
    leaf (a norm scale, an attention kernel with three named axes) is left undeclared, and so,
    with the default ``mask``, full-rank. Names cannot tell a ``(heads, head_dim)`` bias from a
    matrix: leave such leaves out with ``mask``.

    Args:
      names: a pytree whose leaves are ``PartitionSpec`` s or tuples of axis names (str or None),
        with the parameters' structure.
      layer_axis: the name of the stacking axis.

    Returns:
      A pytree of :class:`fira_jax.MatrixAxes` or None, for ``axes=`` of the ``scale_by_*``
      transformations, the optimizers and :func:`fira_jax.clip_by_norm_growth`.

    Example:
      >>> import jax, jax.numpy as jnp, fira_jax
      >>> from jax.sharding import PartitionSpec as P
      >>> names = {"mlp": P("layers", "embed", "mlp"), "norm": P("layers", "embed"), "head": P("embed", "vocab")}
      >>> fira_jax.axes_from_logical(names)
      {'head': MatrixAxes(rows=0, cols=1), 'mlp': MatrixAxes(rows=1, cols=2), 'norm': None}
    """

    def is_names(x: Any) -> bool:
        return isinstance(x, jax.sharding.PartitionSpec) or (
            isinstance(x, tuple) and all(isinstance(n, str) or n is None for n in x)
        )

    def declare(x: Any) -> MatrixAxes | None:
        axes = [a for a, n in enumerate(tuple(x)) if n != layer_axis]
        return MatrixAxes(rows=axes[0], cols=axes[1]) if len(axes) == 2 else None

    return jax.tree.map(declare, names, is_leaf=is_names)
