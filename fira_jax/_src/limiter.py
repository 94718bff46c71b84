r"""The norm-growth limiter (step 4 of Fira).

Fira scales the residual by factors borrowed from Adam; when the gradient changes abruptly those
factors can blow the residual up and cause loss spikes. The limiter caps the growth of the
residual's norm from one step to the next at a factor ``gamma``:

.. math::
  \ell = \frac{\max(\|S\| / (s + 10^{-8}), \gamma)}{\gamma}, \qquad
  S \leftarrow S / \ell, \qquad s \leftarrow \|S\| / \ell

with ``s`` the limited norm of the previous step. Each matrix is limited by its own past: the
limiter needs no global view of the gradients.

The limiter re-arms: where the recorded norm is at most ``10^{-8}`` (a zero first gradient: a
zero-initialised output projection, a frozen-then-unfrozen layer, a masked first batch), the step
is not limited and its norm is recorded instead, as at the first step. The reference limits it
against ``1.01 × 10^{-8}``, which freezes that matrix's update for good; this is a deliberate
deviation (docs/semantics.md), and on every input where the recorded norm is above ``10^{-8}``
the limiter is the reference's. :func:`limit_norm_growth` is the equation, used by
:func:`fira_jax.scale_by_fira` (on the scaled residual) and :func:`fira_jax.scale_by_apollo` (on
the scaled gradient); :func:`clip_by_norm_growth` is the same limiter as an optax transformation
of whole updates, to put after any optimizer.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax._src import masks
from fira_jax._src.layout import MatrixAxes, as_matrix_axes, matrix_axes
from fira_jax._src.options import Residual
from fira_jax._src.residual import NORM_EPS
from fira_jax._src.validation import check_float


def limit_norm_growth(norm: jax.Array, previous: jax.Array, gamma: Any, first: Any) -> tuple[jax.Array, jax.Array]:
    """The limiter's divisor ``ell`` and the limited norm to remember, per matrix.

    Args:
      norm: ``||S||`` of this step, per matrix (float32).
      previous: the limited norm of the previous step.
      gamma: the largest allowed growth factor per step, ≥ 1 (1.01 in Fira; ``inf`` disables it).
      first: True at the first step, where ``ell = 1`` and the norm is only recorded; so is it
        wherever ``previous`` is at most ``1e-8`` (the limiter re-arms after a zero norm).

    Returns:
      ``(ell, norm / ell)``: divide S (its scaling factor) by ``ell``, and keep ``norm / ell``
      for the next step.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> ell, kept = fira_jax.limit_norm_growth(jnp.array([3.0]), jnp.array([1.0]), 1.5, False)
      >>> ell, kept  # the norm tripled: it is brought back to 1.5 x the previous one
      (Array([2.], dtype=float32), Array([1.5], dtype=float32))
    """
    ell = jnp.maximum(norm / (previous + NORM_EPS) / gamma, 1.0)
    ell = jnp.where(first | (previous <= NORM_EPS), 1.0, ell)
    return ell, norm / ell


class ClipByNormGrowthState(NamedTuple):
    """State of :func:`clip_by_norm_growth`.

    Attributes:
      count: number of updates so far (int32); the first update passes unchanged.
      norms: per floating-point leaf, the limited norm of the previous update, one float32 per
        matrix: a scalar for a leaf without declared ``axes``, shape ``batch`` (the leaf's
        stacking axes) for a declared stack; ``optax.MaskedNode()`` for integer and boolean
        leaves.
    """

    count: jax.Array
    norms: Any


def _norm_axes(tree: Any, axes: Any) -> list[tuple[int, ...] | None]:
    """Per leaf of ``tree``: the axes one norm is taken over (a declared matrix's rows and columns),
    or None for the whole leaf (no declaration, or a leaf with fewer than 2 axes under a
    :class:`fira_jax.MatrixAxes` given for every leaf)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    if axes is None:
        return [None] * len(with_path)
    single = as_matrix_axes(axes)
    if isinstance(single, MatrixAxes):
        declared: list[Any] = [single if getattr(leaf, "ndim", 0) >= 2 else None for _, leaf in with_path]
    else:
        declared = [as_matrix_axes(a) for a in masks.resolve_per_leaf(tree, axes, lambda x: None, "axes")]
    out = []
    for (path, leaf), ax in zip(with_path, declared, strict=True):
        if ax is None or not masks.is_float(leaf):
            out.append(None)
            continue
        _, rows, cols = matrix_axes(masks.path_str(path), tuple(leaf.shape), ax, vectors=True)
        out.append(rows + cols)
    return out


def _norm_shape(shape: tuple[int, ...], red: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of a leaf's recorded norms: the axes not reduced over (``()`` for the whole leaf)."""
    return () if red is None else tuple(d for a, d in enumerate(shape) if a not in red)


def clip_by_norm_growth(gamma: float = Residual.gamma, *, axes: Any = None) -> optax.GradientTransformation:
    r"""Fira's norm-growth limiter as an optax transformation: no matrix's update norm grows by more
    than ``gamma`` per step.

    For each matrix, with :math:`u_t` its incoming update and :math:`s_{t-1}` the limited norm
    kept from the previous step (:func:`limit_norm_growth`):

    .. math::
      \ell_t = \frac{\max(\|u_t\| / (s_{t-1} + 10^{-8}), \gamma)}{\gamma}, \qquad
      u_t \leftarrow u_t / \ell_t, \qquad s_t = \|u_t\| / \ell_t

    The first update passes unchanged and its norm is recorded (and so does any update after a
    recorded norm of at most ``1e-8``: the limiter re-arms). A matrix is a whole leaf, or, where
    ``axes`` declares a stack (a scanned model's ``(layers, m, n)`` kernels), each matrix of the
    stack: one exploding layer does not clip the others, and the per-layer step, which updates
    one layer's slice at a time, keeps each layer's own norm, exactly as the fused limiter of
    :func:`fira_jax.scale_by_fira` and :func:`fira_jax.scale_by_apollo` does. Unlike
    :func:`optax.clip_by_global_norm`, the bound is relative to each matrix's own past, so it
    needs no threshold and no global view of the gradients. The paper's ablation (Chen et al.,
    2024, Table 5, LLaMA 60M) finds it better than gradient clipping inside Fira (31.06 vs 31.22
    perplexity).

    Args:
      gamma: the largest growth factor per step, ≥ 1 (1.01 in Fira and APOLLO; ``inf``
        passes everything).
      axes: which axes form each leaf's matrices, as in :func:`fira_jax.scale_by_fira`: a
        :class:`fira_jax.MatrixAxes` (for every leaf with at least 2 axes), a pytree of them
        (None: the whole leaf), a callable from the params to one, or
        :func:`fira_jax.axes_by_path`. ``MatrixAxes(rows=-1, cols=())`` declares a stack of
        vectors (a scanned model's ``(layers, d)`` norm scales). Default: one norm per leaf.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ClipByNormGrowthState`. Integer and
      boolean leaves pass unchanged.

    Example:
      >>> import jax.numpy as jnp, optax, fira_jax
      >>> tx = optax.chain(optax.sgd(1.0), fira_jax.clip_by_norm_growth(1.5))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)  # norm 5: recorded
      >>> u, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)  # norm 50: limited to 7.5
      >>> u["w"]
      Array([-4.5, -6. ], dtype=float32)
      >>> stacked = fira_jax.clip_by_norm_growth(1.5, axes=fira_jax.MatrixAxes())  # (layers, m, n)
      >>> stacked.init({"w": jnp.zeros((4, 3, 3))}).norms["w"].shape  # one norm per layer
      (4,)

    References:
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?
      <https://arxiv.org/abs/2410.01623>`_, 2024.
    """
    check_float("gamma", gamma, low=1.0, high=float("inf"), high_open=False)

    def init_fn(params: Any) -> ClipByNormGrowthState:
        leaves, treedef = jax.tree.flatten(params)
        norms = []
        for p, red in zip(leaves, _norm_axes(params, axes), strict=True):
            if not masks.is_float(p):
                norms.append(optax.MaskedNode())
                continue
            norms.append(jnp.zeros(_norm_shape(p.shape, red), jnp.float32))
        return ClipByNormGrowthState(count=jnp.zeros([], jnp.int32), norms=treedef.unflatten(norms))

    def update_fn(updates: Any, state: ClipByNormGrowthState, params: Any = None) -> tuple[Any, ClipByNormGrowthState]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        prevs = treedef.flatten_up_to(state.norms)
        out, kept = [], []
        for u, prev, red in zip(leaves, prevs, _norm_axes(updates, axes), strict=True):
            if not masks.is_float(u) or not hasattr(prev, "dtype"):
                out.append(u)
                kept.append(prev)
                continue
            if tuple(prev.shape) != _norm_shape(u.shape, red):
                raise ValueError(
                    f"clip_by_norm_growth: an update of shape {tuple(u.shape)} meets a recorded norm of shape "
                    f"{tuple(prev.shape)}: the state was built for other shapes or other `axes`."
                )
            norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=red))
            ell, norm = limit_norm_growth(norm, prev, gamma, state.count == 0)
            ell = ell if red is None else jnp.expand_dims(ell, red)
            out.append((u / ell.astype(u.dtype)).astype(u.dtype))
            kept.append(norm)
        new_state = ClipByNormGrowthState(count=optax.safe_int32_increment(state.count), norms=treedef.unflatten(kept))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
