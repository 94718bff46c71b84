"""Ready-made optimizers: Fira, GaLore, APOLLO and APOLLO-Mini with AdamW's schedule, as ``optax.chain`` s."""

from __future__ import annotations  # type hints stay names (optax.ScalarOrSchedule) on the API page

import warnings
from typing import Any

import optax

from fira_jax._src import masks
from fira_jax._src.adam import adam_bias_correction, scale_by_torch_adam
from fira_jax._src.basis import SvdMethod
from fira_jax._src.family import Projection, ScaleType, scale_by_apollo, scale_by_fira, scale_by_galore
from fira_jax._src.layout import ProjType
from fira_jax._src.moments import MomentPolicy
from fira_jax._src.options import (
    APOLLO_MINI_SCALE,
    APOLLO_SCALE,
    B1,
    B2,
    EPS,
    PROJ_TYPE,
    PROJECTION,
    RANK,
    SCALE,
    SCALE_TYPE,
    WEIGHT_DECAY,
    Granularity,
    Refresh,
    Residual,
)
from fira_jax._src.validation import check_float
from fira_jax._src.weight_decay import add_decayed_weights_after_step


def _adamw_tail(
    learning_rate: optax.ScalarOrSchedule,
    b1: float,
    b2: float,
    weight_decay: float,
    weight_decay_mask: masks.Mask,
    base_optimizer: optax.GradientTransformation | None,
) -> list[optax.GradientTransformation]:
    """What follows the low-rank update: Adam's bias correction c_t, the learning rate, the decay."""
    tail = []
    if base_optimizer is None:  # the reference's bias correction, on the whole update
        tail.append(optax.scale_by_schedule(adam_bias_correction(b1, b2)))
    tail.append(optax.scale_by_learning_rate(learning_rate))
    # Leave the decay out only for a plain 0 (with inject_hyperparams it is an array at init
    # and a tracer at update: it must be in the chain both times).
    if not (isinstance(weight_decay, int | float) and weight_decay == 0):
        tail.append(add_decayed_weights_after_step(weight_decay, learning_rate, mask=weight_decay_mask))
    return tail


def _refresh(refresh_method: str, svd: str | None, **fields: Any) -> Refresh:
    """The :class:`Refresh` the flat keywords describe; ``svd`` is the deprecated name of
    ``refresh_method`` (a DeprecationWarning pointing at the optimizer's caller)."""
    if svd is not None:
        warnings.warn("the `svd` keyword is deprecated: use `refresh_method`", DeprecationWarning, stacklevel=3)
        if refresh_method not in (Refresh.method, svd):
            raise ValueError(
                f"`svd` {svd!r} and `refresh_method` {refresh_method!r} disagree; pass `refresh_method` only."
            )
        refresh_method = svd
    return Refresh(method=refresh_method, **fields)


def _inner(base_optimizer: optax.GradientTransformation | None, b1: float, b2: float, eps: float, mu_dtype: Any,
           nu_dtype: Any) -> optax.GradientTransformation:  # fmt: skip
    """The optimizer in the subspace: ``base_optimizer``, or the reference's Adam."""
    if base_optimizer is not None:
        return base_optimizer
    return scale_by_torch_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)


def _check_common(b1: float, b2: float, eps: float, weight_decay: float) -> None:
    """Checks the arguments no piece checks (Adam's are unused by a custom base_optimizer)."""
    check_float("b1", b1, low=0.0, high=1.0)
    check_float("b2", b2, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0, high=float("inf"), high_open=False)
    check_float("weight_decay", weight_decay, low=0.0, high=float("inf"), high_open=False)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = RANK,
    update_proj_gap: int = Refresh.update_proj_gap,
    scale: float = SCALE,
    b1: float = B1,
    b2: float = B2,
    eps: float = EPS,
    weight_decay: float = WEIGHT_DECAY,
    gamma: float = Residual.gamma,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    base_optimizer: optax.GradientTransformation | None = None,
    *,
    axes: Any = None,
    granularity: Granularity = Residual.granularity,
    residual_scale: float | None = Residual.residual_scale,
    canonical_signs: bool = Refresh.canonical_signs,
    moments: MomentPolicy = Refresh.moments,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    basis_dtype: Any = None,
    refresh_method: SvdMethod = Refresh.method,
    stagger: bool = Refresh.stagger,
    refresh_by_shape: bool = Refresh.by_shape,
    weight_decay_mask: masks.Mask = None,
    svd: SvdMethod | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Fira: full-rank training under a low-rank optimizer state.

    For each selected matrix W with gradient G at step t (Chen et al., 2024,
    Algorithm 1, as the authors' ``FiraAdamW`` implements it):

    1. every ``update_proj_gap`` steps, P ← top-``rank`` singular vectors of G;
       ``R = P^T G`` or ``G P^T`` (:func:`fira_jax.projections.refresh_bases`);
    2. ``N = m / (sqrt(v) + eps)`` with Adam's moments kept in the subspace and
       never reset (:func:`fira_jax.scale_by_torch_adam`);
    3. ``S = phi * (G - scale * back(R))`` with ``phi = ||N|| / (||R|| + 1e-8)``
       per column (:func:`fira_jax.scaling_factor`, :func:`fira_jax.residual_norm`);
    4. ``||S||`` may grow at most by ``gamma`` per step
       (:func:`fira_jax.limit_norm_growth`);
    5. ``U = scale * back(N) + S`` (:func:`fira_jax.fira_update`);
    6. ``W ← W - lr c_t U`` with ``c_t = sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``,
       then ``W ← W - lr wd W`` (:func:`fira_jax.add_decayed_weights_after_step`).

    Steps 1-5 are :func:`fira_jax.scale_by_fira`; the whole optimizer is
    ``optax.chain(scale_by_fira(...), optax.scale_by_schedule(adam_bias_correction(b1, b2)),
    optax.scale_by_learning_rate(learning_rate), add_decayed_weights_after_step(...))``.

    Unselected leaves get the same Adam (step 2 and 6) on their full gradient.

    The refresh's keywords (``update_proj_gap``, ``refresh_method``, ``stagger``, ``refresh_by_shape``,
    ``canonical_signs``) build a :class:`fira_jax.Refresh`, the residual's (``granularity``,
    ``residual_scale``, ``gamma``) a :class:`fira_jax.Residual`, which :func:`scale_by_fira` takes.

    Args:
      learning_rate: a float or an optax schedule (0.01 in the paper).
      rank: the subspace's rank (128 for LLaMA 60M in the paper).
      update_proj_gap: steps between basis refreshes (200 in the paper).
      scale: the scale of the low-rank update (``alpha``; 0.25 in the paper).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon, added to ``sqrt(v)`` (the reference's 1e-6).
      weight_decay: decoupled weight decay, applied after the step.
      gamma: the limiter's growth bound (``inf`` disables it).
      proj_type: ``"std"``, ``"reverse_std"``, ``"right"`` or ``"left"``
        (``"full"`` is GaLore-only: the column scaling is undefined there).
      mask: which leaves get Fira (see :func:`fira_jax.mask_by_path`); default every
        floating-point leaf with exactly 2 dimensions, and those with more whose ``axes`` are
        declared (:func:`fira_jax.matrices.selection` says which leaves are left full-rank).
      base_optimizer: run this optax transformation in the subspace instead of
        Adam (e.g. :func:`optax.scale_by_lion`). No Adam bias correction is
        then applied; ``b1``, ``b2`` and ``eps`` are unused.
      axes: which axes form each leaf's matrix (:class:`fira_jax.MatrixAxes`, a pytree of them,
        or :func:`fira_jax.axes_by_path`); a leaf with more than 2 axes is projected only where
        they are declared.
      granularity: ``"column"`` (Fira), ``"matrix"`` (one factor per matrix)
        or ``"none"`` (no scaling: phi = 1) — the paper's Table 5 ablations.
      residual_scale: the multiple of ``P P^T G`` removed from G in step 3;
        default ``scale`` as in the reference; 1.0 gives the paper's
        orthogonal residual.
      canonical_signs: fix the singular vectors' signs (on by default; ``False`` is the reference's
        behaviour: :class:`fira_jax.Refresh`).
      moments: what Adam's moments become at a refresh: ``"keep"`` (the reference's), ``"reset"``
        or ``"reproject"`` (:class:`fira_jax.Refresh`).
      mu_dtype: dtype of Adam's first moment; default float32 for bfloat16 / float16 parameters.
      nu_dtype: dtype of Adam's second moment; default float32 for bfloat16 / float16 parameters.
      basis_dtype: dtype of the stored bases.
      refresh_method: how the bases are computed: ``"exact"``, ``"randomized"``, ``"subspace"`` or
        ``"gram"`` (:class:`fira_jax.Refresh`'s ``method``).
      stagger: spread the leaves' refreshes over the gap.
      refresh_by_shape: one compiled SVD per matrix shape (for TPU; see
        :func:`fira_jax.scale_by_fira`).
      weight_decay_mask: which leaves are decayed, with :func:`optax.adamw`'s
        ``mask`` semantics (a pytree of bools or a callable from the params to
        one); default every floating-point leaf. Independent of ``mask``
        (which leaves are projected): LLM recipes decay the kernels only, e.g.
        ``fira_jax.mask_by_path("attn", "mlp", "lm_head")``.
      svd: deprecated name of ``refresh_method`` (kept for one release).

    Returns:
      An ``optax.GradientTransformationExtraArgs``: the ``optax.chain`` of the
      pieces above.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fira_jax
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fira_jax.fira(learning_rate=1e-2, rank=2)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
      Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024.
    """
    _check_common(b1, b2, eps, weight_decay)
    inner = _inner(base_optimizer, b1, b2, eps, mu_dtype, nu_dtype)
    refresh = _refresh(
        refresh_method,
        svd,
        update_proj_gap=update_proj_gap,
        stagger=stagger,
        by_shape=refresh_by_shape,
        canonical_signs=canonical_signs,
        moments=moments,
    )
    residual = Residual(granularity=granularity, residual_scale=residual_scale, gamma=gamma)
    low_rank = scale_by_fira(
        rank,
        scale,
        refresh=refresh,
        residual=residual,
        base_optimizer=inner,
        proj_type=proj_type,
        mask=mask,
        axes=axes,
        basis_dtype=basis_dtype,
    )
    return optax.chain(low_rank, *_adamw_tail(learning_rate, b1, b2, weight_decay, weight_decay_mask, base_optimizer))


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = RANK,
    update_proj_gap: int = Refresh.update_proj_gap,
    scale: float = SCALE,
    b1: float = B1,
    b2: float = B2,
    eps: float = EPS,
    weight_decay: float = WEIGHT_DECAY,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    base_optimizer: optax.GradientTransformation | None = None,
    *,
    axes: Any = None,
    canonical_signs: bool = Refresh.canonical_signs,
    moments: MomentPolicy = Refresh.moments,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    basis_dtype: Any = None,
    refresh_method: SvdMethod = Refresh.method,
    stagger: bool = Refresh.stagger,
    refresh_by_shape: bool = Refresh.by_shape,
    weight_decay_mask: masks.Mask = None,
    svd: SvdMethod | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore with AdamW, as the authors' ``GaLoreAdamW`` (``galore-torch`` 1.0).

    Fira without the residual: ``U = scale * back(N)`` and
    ``W ← W - lr c_t U``, then ``W ← W - lr wd W``. ``proj_type="full"``
    projects on both sides.

    The refresh's keywords (``update_proj_gap``, ``refresh_method``, ``stagger``, ``refresh_by_shape``,
    ``canonical_signs``) build the :class:`fira_jax.Refresh` that :func:`scale_by_galore` takes.

    Args:
      learning_rate: a float or an optax schedule.
      rank: the subspace's rank.
      update_proj_gap: steps between basis refreshes.
      scale: the scale of the low-rank update (0.25 in the paper).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon, added to ``sqrt(v)``.
      weight_decay: decoupled weight decay, applied after the step.
      proj_type: ``"std"``, ``"reverse_std"``, ``"right"``, ``"left"`` or ``"full"``.
      mask: which leaves to project; default every leaf with at least 2 dims.
      base_optimizer: run this optax transformation in the subspace instead of Adam.
      axes: which axes form each leaf's matrix (:class:`fira_jax.MatrixAxes`, a pytree of them,
        or :func:`fira_jax.axes_by_path`); a leaf with more than 2 axes is projected only where
        they are declared.
      canonical_signs: fix the singular vectors' signs (on by default; ``False`` is the reference's
        behaviour: :class:`fira_jax.Refresh`).
      moments: what Adam's moments become at a refresh: ``"keep"`` (the reference's), ``"reset"``
        or ``"reproject"`` (:class:`fira_jax.Refresh`).
      mu_dtype: dtype of Adam's first moment; default float32 for bfloat16 / float16 parameters.
      nu_dtype: dtype of Adam's second moment; default float32 for bfloat16 / float16 parameters.
      basis_dtype: dtype of the stored bases.
      refresh_method: how the bases are computed: ``"exact"``, ``"randomized"``, ``"subspace"`` or
        ``"gram"`` (:class:`fira_jax.Refresh`'s ``method``).
      stagger: spread the leaves' refreshes over the gap.
      refresh_by_shape: one compiled SVD per matrix shape (for TPU; see
        :func:`fira_jax.scale_by_fira`).
      weight_decay_mask: which leaves are decayed (as in :func:`fira_jax.fira`).
      svd: deprecated name of ``refresh_method`` (kept for one release).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.galore(learning_rate=1e-2, rank=2)
      >>> state = tx.init({"w": jnp.ones((8, 4))})
      >>> state[0].inner.mu["w"].shape  # Adam's moments live in the 8 x 2 subspace
      (8, 2)

    References:
      Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection <https://arxiv.org/abs/2403.03507>`_, 2024.
    """
    _check_common(b1, b2, eps, weight_decay)
    inner = _inner(base_optimizer, b1, b2, eps, mu_dtype, nu_dtype)
    refresh = _refresh(
        refresh_method,
        svd,
        update_proj_gap=update_proj_gap,
        stagger=stagger,
        by_shape=refresh_by_shape,
        canonical_signs=canonical_signs,
        moments=moments,
    )
    low_rank = scale_by_galore(
        rank,
        scale,
        refresh=refresh,
        base_optimizer=inner,
        proj_type=proj_type,
        mask=mask,
        axes=axes,
        basis_dtype=basis_dtype,
    )
    return optax.chain(low_rank, *_adamw_tail(learning_rate, b1, b2, weight_decay, weight_decay_mask, base_optimizer))


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = RANK,
    update_proj_gap: int = Refresh.update_proj_gap,
    scale: float = APOLLO_SCALE,
    b1: float = B1,
    b2: float = B2,
    eps: float = EPS,
    weight_decay: float = WEIGHT_DECAY,
    gamma: float = Residual.gamma,
    proj_type: ProjType = PROJ_TYPE,
    mask: masks.Mask = None,
    base_optimizer: optax.GradientTransformation | None = None,
    *,
    scale_type: ScaleType = SCALE_TYPE,
    proj: Projection = PROJECTION,
    axes: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    basis_dtype: Any = None,
    refresh_method: SvdMethod = Refresh.method,
    canonical_signs: bool = Refresh.canonical_signs,
    moments: MomentPolicy = Refresh.moments,
    stagger: bool = Refresh.stagger,
    refresh_by_shape: bool = Refresh.by_shape,
    seed: int = Refresh.seed,
    weight_decay_mask: masks.Mask = None,
    svd: SvdMethod | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO: AdamW's per-channel scaling, measured in a random low-rank space, on the full gradient.

    For each selected matrix W with gradient G at step t (Zhu et al., 2025, as the authors'
    ``APOLLOAdamW``, ``apollo-torch`` 1.0.3):

    1. every ``update_proj_gap`` steps, P ← a Gaussian random ``rank × n`` (or ``m × rank``)
       matrix of variance ``1 / rank``, from a fresh seed (:func:`fira_jax.projections.random_projection`);
       ``R = G P^T`` or ``P^T G``;
    2. ``N = m / (sqrt(v) + eps)`` with Adam's moments of R (:func:`fira_jax.scale_by_torch_adam`);
    3. ``phi = ||N|| / (||R|| + 1e-8)`` per channel or per matrix (:func:`fira_jax.scaling_factor`);
    4. ``S = phi ⊙ G``, its norm growth limited to ``gamma`` per step
       (:func:`fira_jax.scaled_gradient`, :func:`fira_jax.limit_norm_growth`);
    5. ``W ← W - lr c_t sqrt(scale) S`` with Adam's bias correction ``c_t``, then
       ``W ← W - lr wd W``.

    Steps 1-4 are :func:`fira_jax.scale_by_apollo`; the chain is the same as :func:`fira_jax.fira`'s.
    Unselected leaves get Adam on their full gradient. The state per selected m × n matrix
    (right side) is ``2 m r + r n`` against AdamW's ``2 m n``.

    The refresh's keywords (``update_proj_gap``, ``refresh_method``, ``stagger``, ``refresh_by_shape``,
    ``canonical_signs``, ``seed``) build the :class:`fira_jax.Refresh` that :func:`scale_by_apollo`
    takes.

    Args:
      learning_rate: a float or an optax schedule (0.01 in the paper).
      rank: the random space's rank (the paper: a quarter of the hidden size, e.g. 256 at 350M).
      update_proj_gap: steps between new projections (200 in the paper).
      scale: the update is multiplied by ``sqrt(scale)`` (the authors' ``--apollo_scale``; 1).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon, added to ``sqrt(v)``.
      weight_decay: decoupled weight decay, applied after the step.
      gamma: the limiter's growth bound (``inf`` disables it).
      proj_type: ``"std"``, ``"reverse_std"``, ``"right"`` or ``"left"``. The reference's
        channel-wise factor broadcasts for ``"std"`` only; here it always runs along the rank
        axis, which is the reference's for ``"std"``.
      mask: which leaves are projected (see :func:`fira_jax.mask_by_path`); default every
        floating-point leaf with exactly 2 dimensions, and those with more whose ``axes`` are
        declared.
      base_optimizer: run this optax transformation in the subspace instead of Adam. No Adam
        bias correction is then applied; ``b1``, ``b2`` and ``eps`` are unused.
      scale_type: ``"channel"`` or ``"tensor"`` (see :func:`fira_jax.scale_by_apollo`).
      proj: ``"random"`` or ``"svd"`` (see :func:`fira_jax.scale_by_apollo`).
      axes: which axes form each leaf's matrix (:class:`fira_jax.MatrixAxes`, a pytree of them,
        or :func:`fira_jax.axes_by_path`); a leaf with more than 2 axes is projected only where
        they are declared.
      mu_dtype: dtype of Adam's first moment; default float32 for bfloat16 / float16 parameters.
      nu_dtype: dtype of Adam's second moment; default float32 for bfloat16 / float16 parameters.
      basis_dtype: dtype of the stored projections.
      refresh_method: how the bases are computed when ``proj="svd"`` (:class:`fira_jax.Refresh`).
      canonical_signs: fix the singular vectors' signs (on by default; ``False`` is the reference's
        behaviour: :class:`fira_jax.Refresh`).
      moments: what Adam's moments become at a refresh: ``"keep"`` (the reference's), ``"reset"``
        or ``"reproject"`` (:class:`fira_jax.Refresh`).
      stagger: spread the leaves' refreshes over the gap.
      refresh_by_shape: one compiled refresh per matrix shape.
      seed: seed of the random projections.
      weight_decay_mask: which leaves are decayed (as in :func:`fira_jax.fira`).
      svd: deprecated name of ``refresh_method`` (kept for one release).

    Returns:
      An ``optax.GradientTransformationExtraArgs``: the ``optax.chain`` of the pieces above.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fira_jax
      >>> params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
      >>> tx = fira_jax.apollo(learning_rate=1e-2, rank=2)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> state[0].right["w"].shape  # the random projection: rank x n
      (2, 4)

    References:
      Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
      <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
    """
    _check_common(b1, b2, eps, weight_decay)
    inner = _inner(base_optimizer, b1, b2, eps, mu_dtype, nu_dtype)
    refresh = _refresh(
        refresh_method,
        svd,
        update_proj_gap=update_proj_gap,
        stagger=stagger,
        by_shape=refresh_by_shape,
        canonical_signs=canonical_signs,
        moments=moments,
        seed=seed,
    )
    low_rank = scale_by_apollo(
        rank,
        scale,
        refresh=refresh,
        scale_type=scale_type,
        proj=proj,
        gamma=gamma,
        base_optimizer=inner,
        proj_type=proj_type,
        mask=mask,
        axes=axes,
        basis_dtype=basis_dtype,
    )
    return optax.chain(low_rank, *_adamw_tail(learning_rate, b1, b2, weight_decay, weight_decay_mask, base_optimizer))


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    update_proj_gap: int = Refresh.update_proj_gap,
    scale: float = APOLLO_MINI_SCALE,
    b1: float = B1,
    b2: float = B2,
    eps: float = EPS,
    weight_decay: float = WEIGHT_DECAY,
    gamma: float = Residual.gamma,
    mask: masks.Mask = None,
    *,
    axes: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    seed: int = Refresh.seed,
    moments: MomentPolicy = Refresh.moments,
    weight_decay_mask: masks.Mask = None,
) -> optax.GradientTransformationExtraArgs:
    r"""APOLLO-Mini: APOLLO at rank 1 with one scaling factor per matrix; SGD-level memory.

    :func:`fira_jax.apollo` with ``rank=1``, ``scale_type="tensor"`` and a random projection,
    as the authors' APOLLO-Mini scripts run it (``--rank 1 --scale_type tensor --apollo_scale
    128``). The state per selected m × n matrix (right side) is ``2 m + n`` numbers.

    Args:
      learning_rate: a float or an optax schedule (0.01 in the paper).
      update_proj_gap: steps between new projections (200 in the paper).
      scale: the update is multiplied by ``sqrt(scale)`` (128 in the authors' scripts, so
        ``sqrt(128) ≈ 11.3``: a rank-1 estimate of Adam's scaling is about ``sqrt(r)`` too small).
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay, applied after the step.
      gamma: the limiter's growth bound.
      mask: which leaves are projected; default every floating-point leaf with exactly 2
        dimensions, and those with more whose ``axes`` are declared.
      axes: which axes form each leaf's matrix (:class:`fira_jax.MatrixAxes`, a pytree of them,
        or :func:`fira_jax.axes_by_path`); a leaf with more than 2 axes is projected only where
        they are declared.
      mu_dtype: dtype of Adam's first moment; default float32 for bfloat16 / float16 parameters.
      nu_dtype: dtype of Adam's second moment; default float32 for bfloat16 / float16 parameters.
      seed: seed of the random projections.
      moments: what Adam's moments become at a refresh: ``"keep"`` (the reference's) or ``"reset"``
        (:class:`fira_jax.Refresh`; ``"reproject"`` needs orthonormal bases).
      weight_decay_mask: which leaves are decayed.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.apollo_mini(learning_rate=1e-2)
      >>> state = tx.init({"w": jnp.ones((8, 4))})
      >>> state[0].inner.mu["w"].shape  # Adam's moments: one column
      (8, 1)

    References:
      Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
      <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
    """
    return apollo(
        learning_rate, rank=1, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2, eps=eps,
        weight_decay=weight_decay, gamma=gamma, mask=mask, scale_type="tensor", proj="random", axes=axes,
        mu_dtype=mu_dtype, nu_dtype=nu_dtype, seed=seed, moments=moments, weight_decay_mask=weight_decay_mask,
    )  # fmt: skip
