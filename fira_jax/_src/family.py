r"""GaLore, Fira and APOLLO: each a compensation (what a leaf's update is) on :func:`fira_jax.scale_by_subspace`.

With x a leaf's :class:`fira_jax.Subspace` (G, R, N, P) and ``ell`` the limiter's divisor:

- GaLore (:func:`galore_update`): ``U = scale · back(N)``, no limiter;
- Fira (:func:`fira_residual`): ``U = scale · back(N) + S / ell`` with
  ``S = phi ⊙ (G - s · back(R))``, ``phi = ||N|| / ||R||`` per column, ``ell`` bounding ``||S||``;
- APOLLO (:func:`apollo_scaling`): ``U = sqrt(scale) · (phi ⊙ G) / ell``, P a random projection,
  ``ell`` bounding ``||phi ⊙ G||``.
"""

import dataclasses
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import optax

from fira_jax._src import masks
from fira_jax._src.layout import ProjType
from fira_jax._src.options import (
    APOLLO_SCALE,
    PROJ_TYPE,
    PROJECTION,
    RANK,
    SCALE,
    SCALE_TYPE,
    Refresh,
    Residual,
)
from fira_jax._src.residual import Granularity, fira_update, residual_norm, scaled_gradient, scaling_factor
from fira_jax._src.subspace import Compensation, Subspace, scale_by_subspace
from fira_jax._src.validation import check_choice, check_float

# APOLLO's scaling factor: per channel (Fira's column) or per matrix.
ScaleType = Literal["channel", "tensor"]
SCALE_TYPES: tuple[str, ...] = get_args(ScaleType)
# APOLLO's projection: a Gaussian random matrix, or GaLore's SVD basis.
Projection = Literal["random", "svd"]
PROJECTIONS: tuple[str, ...] = get_args(Projection)


def galore_update(scale: float = SCALE) -> Compensation:
    r"""GaLore's update, :math:`U = \text{scale} \cdot \text{back}(N)`: nothing outside the subspace.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> from fira_jax.projections import Basis
      >>> lay = fira_jax.Layout("w", (1, 2), (0, 1), 1, (), 1, 2, 1, "right")
      >>> x = fira_jax.Subspace(jnp.ones((1, 2)), None, jnp.array([[4.0]]), Basis(None, jnp.array([[1.0, 0.0]]), lay))
      >>> fira_jax.galore_update(0.25).update(x, jnp.ones(()))
      Array([[1., 0.]], dtype=float32)
    """
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)
    return Compensation(lambda x, ell: scale * x.basis.back(x.inner, like=x.grad))


def fira_residual(scale: float = SCALE, residual: Residual = Residual()) -> Compensation:
    r"""Fira's update: GaLore's plus the residual outside the subspace, scaled by Adam's ratio inside it.

    .. math::
      U = \text{scale} \cdot \text{back}(N) + \frac{S}{\ell}, \qquad
      S = \phi \odot (G - s \cdot \text{back}(R)), \qquad \phi = \frac{\|N\|}{\|R\| + 10^{-8}}

    with ``phi`` per column (:func:`fira_jax.scaling_factor`, ``residual.granularity``), ``s``
    the ``residual.residual_scale`` (default ``scale``) and the limiter bounding ``||S||``
    (:func:`fira_jax.residual_norm`; S is not formed where P's orthonormality allows). P must be
    orthonormal (an SVD method, not a random projection).

    Example:
      >>> import fira_jax
      >>> tx = fira_jax.scale_by_subspace(fira_jax.fira_residual(0.25), rank=2, gamma=1.01)  # Fira
    """
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)
    if not isinstance(residual, Residual):
        raise TypeError(f"`residual` must be a fira_jax.Residual, got {residual!r}.")
    s = scale if residual.residual_scale is None else residual.residual_scale

    def phi(x: Subspace) -> jax.Array:
        return scaling_factor(x.inner, x.low, x.basis.layout, residual.granularity)

    def norm(x: Subspace) -> jax.Array:
        return residual_norm(x.grad, x.low, x.basis, phi(x), s)

    def update(x: Subspace, ell: jax.Array) -> jax.Array:
        return fira_update(x.grad, x.low, x.inner, x.basis, phi(x) / ell[..., None, None], s, scale)

    return Compensation(update, norm)


def apollo_scaling(scale: float = APOLLO_SCALE, granularity: Granularity = Residual.granularity) -> Compensation:
    r"""APOLLO's update: the whole gradient scaled by Adam's ratio measured in the subspace.

    .. math::
      U = \sqrt{\text{scale}} \cdot \frac{\phi \odot G}{\ell}, \qquad \phi = \frac{\|N\|}{\|R\| + 10^{-8}}

    with ``phi`` per channel (``"column"``) or per matrix (``"matrix"``), the limiter bounding
    ``||phi ⊙ G||`` (:func:`fira_jax.scaled_gradient`); nothing is projected back.

    Example:
      >>> import fira_jax
      >>> tx = fira_jax.scale_by_subspace(  # APOLLO-Mini's update
      ...     fira_jax.apollo_scaling(128.0, "matrix"), rank=1, gamma=1.01,
      ...     refresh=fira_jax.Refresh(method="random"))
    """
    check_float("scale", scale, low=0.0, high=float("inf"), high_open=False)

    def scaled(x: Subspace) -> jax.Array:
        return scaled_gradient(x.grad, scaling_factor(x.inner, x.low, x.basis.layout, granularity), x.basis.layout)

    def norm(x: Subspace) -> jax.Array:
        return jnp.linalg.norm(scaled(x).astype(jnp.float32), axis=(-2, -1))

    def update(x: Subspace, ell: jax.Array) -> jax.Array:
        factor = jnp.sqrt(jnp.asarray(scale, jnp.float32)) / ell[..., None, None]
        return factor.astype(x.grad.dtype) * scaled(x)

    return Compensation(update, norm)


def scale_by_galore(
    rank: int = RANK,
    scale: float = SCALE,
    *,
    refresh: Refresh = Refresh(),
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
    chunk_bytes: float | None = None,
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
      base_optimizer: the optimizer in the subspace (``inner`` of :func:`fira_jax.scale_by_subspace`: one
        that reads the parameters gets them projected), default :func:`fira_jax.scale_by_torch_adam`
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
        :func:`fira_jax.matrices.selection`).
      axes: which axes form each leaf's matrix: a :class:`fira_jax.MatrixAxes` (for every leaf),
        a pytree of them (None: undeclared), a callable from the params to one, or
        :func:`fira_jax.axes_by_path`. A 2-D leaf is its own matrix; a leaf with more axes is
        projected only where declared (``MatrixAxes()`` declares a stack of matrices over the
        leading axes, as ``nnx.scan`` makes them).
      basis_dtype: dtype of the stored bases; default the leaf's dtype, as in the reference
        (which casts the float32 SVD to the gradient's dtype).
      chunk_bytes: a stacked leaf's update runs in chunks of at most this much gradient, to stay
        at the step's memory floor (:func:`fira_jax.scale_by_subspace`; None: 128 MiB,
        ``float("inf")``: whole stacks at once).
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
    return scale_by_subspace(
        galore_update(scale), rank, refresh=refresh, inner=base_optimizer, proj_type=proj_type, mask=mask, axes=axes,
        basis_dtype=basis_dtype, chunk_bytes=chunk_bytes,
    )  # fmt: skip


def scale_by_fira(
    rank: int = RANK,
    scale: float = SCALE,
    *,
    refresh: Refresh = Refresh(),
    residual: Residual = Residual(),
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
    chunk_bytes: float | None = None,
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
    if isinstance(refresh, Refresh) and refresh.method == "random":
        raise ValueError(
            "Refresh(method='random') is APOLLO's projection: Fira's residual needs an orthonormal basis (an SVD "
            "method). Use fira_jax.scale_by_apollo for a random projection."
        )
    return scale_by_subspace(
        fira_residual(scale, residual), rank, refresh=refresh, inner=base_optimizer, gamma=residual.gamma,
        proj_type=proj_type, mask=mask, axes=axes, basis_dtype=basis_dtype, chunk_bytes=chunk_bytes,
    )  # fmt: skip


def scale_by_apollo(
    rank: int = RANK,
    scale: float = APOLLO_SCALE,
    *,
    refresh: Refresh = Refresh(),
    scale_type: ScaleType = SCALE_TYPE,
    proj: Projection = PROJECTION,
    gamma: float = Residual.gamma,
    base_optimizer: optax.GradientTransformation | None = None,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    axes: Any = None,
    basis_dtype: Any = None,
    chunk_bytes: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO's update: the whole gradient, scaled by factors measured in a random subspace, limited.

    For each selected leaf (Zhu et al., 2025, Algorithm 1, as the authors' ``APOLLOAdamW`` in
    ``apollo-torch`` 1.0.3 implements it):

    .. math::
      R = G P^T \ (\text{right}) \ \text{or} \ P^T G \ (\text{left}), \qquad N = \text{inner}(R),
      \qquad \phi = \frac{\|N\|}{\|R\| + 10^{-8}}, \qquad
      U = \sqrt{\text{scale}} \cdot \frac{\phi \odot G}{\ell}

    with P a Gaussian random matrix of variance ``1 / rank`` drawn from a fresh seed every
    ``update_proj_gap`` steps (:func:`fira_jax.projections.random_projection`; ``proj="svd"``: GaLore's
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
    if proj == "random" and isinstance(refresh, Refresh):
        refresh = dataclasses.replace(refresh, method="random")
    elif isinstance(refresh, Refresh) and refresh.method == "random":
        raise ValueError("`proj` 'svd' takes its bases from an SVD method, and `refresh.method` is 'random'.")
    return scale_by_subspace(
        apollo_scaling(scale, granularity), rank, refresh=refresh, inner=base_optimizer, gamma=gamma,
        proj_type=proj_type, mask=mask, axes=axes, basis_dtype=basis_dtype, chunk_bytes=chunk_bytes,
    )  # fmt: skip
