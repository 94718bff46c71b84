"""The options GaLore, Fira and APOLLO share, as small frozen dataclasses.

:class:`Refresh` says when and how each projected matrix's basis is recomputed;
:class:`Residual` how Fira scales and limits the part of the gradient outside the subspace. The
``scale_by_*`` transformations take them as keyword arguments; the aliases (:func:`fira_jax.fira`,
:func:`fira_jax.galore`, :func:`fira_jax.apollo`) keep optax's flat keywords and build them.
Both are validated when made, hashable and immutable (``dataclasses.replace`` makes a variant).
"""

import dataclasses
import functools
import warnings
from typing import Any, Literal, get_args

from fira_jax._src.basis import METHODS, Method, SvdMethod
from fira_jax._src.moments import MOMENT_POLICIES, MomentPolicy
from fira_jax._src.validation import check_choice, check_float, check_int

Granularity = Literal["column", "matrix", "none"]  # Fira's scaling factor: per column, per matrix, or none
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

# The family's other defaults, written once: every transformation and optimizer takes its default
# from here (and the refresh's and residual's from Refresh's and Residual's fields).
RANK = 128  # the subspace's rank (the papers' LLaMA-60M runs)
SCALE = 0.25  # GaLore's and Fira's alpha, the low-rank update's scale
APOLLO_SCALE = 1.0  # APOLLO's --apollo_scale (the update is multiplied by its square root)
APOLLO_MINI_SCALE = 128.0  # APOLLO-Mini's
PROJ_TYPE = "std"  # right if m >= n else left (the authors')
SCALE_TYPE = "channel"  # APOLLO's factor per channel; "tensor" for APOLLO-Mini
PROJECTION = "random"  # APOLLO's projection
B1, B2, EPS = 0.9, 0.999, 1e-6  # Adam's, in the reference's convention (eps added to sqrt(v))
WEIGHT_DECAY = 0.0
# A stacked leaf's update runs in chunks of at most this much gradient (the update's temporaries
# are one chunk's): 128 MiB keeps the 1b and 7b steps within 1.01 x their floor on the CPU compiler.
CHUNK_BYTES = 128 * 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refresh:
    """When and how the bases are recomputed.

    Attributes:
      update_proj_gap: ``T``, steps between refreshes (≥ 1); 200 in the papers' pre-training.
      method: how the top singular vectors are computed (formerly ``svd``, deprecated: not every
        method is an SVD): ``"exact"`` (a full SVD, as the reference); ``"randomized"``: a range finder with
        ``rank + oversample`` Gaussian probes, ``power_iters`` power iterations and QR
        re-orthonormalization, then the SVD of a small matrix, much cheaper for large matrices;
        ``"subspace"``: the same iteration warm-started from the previous basis (plus
        ``oversample`` probes), ``O(m n r)`` per refresh
        (:func:`fira_jax.projections.subspace_iteration`); ``"gram"``: the top eigenvectors of
        ``G^T G`` (right) or ``G G^T`` (left), whose eigendecomposition compiles in seconds on
        TPU where the exact SVD takes minutes per matrix shape
        (:func:`fira_jax.projections.gram_top_vectors`); ``"random"``: a Gaussian random projection
        of variance ``1 / rank``, no SVD (APOLLO's: :func:`fira_jax.projections.random_projection`;
        not orthonormal, so not for Fira). Which to pick: :doc:`family`.
      oversample: extra Gaussian probes of ``"randomized"`` and ``"subspace"``.
      power_iters: their iterations; None: 2 for ``"randomized"``, 1 for ``"subspace"``.
      stagger: spread the leaves' refreshes over the gap
        (:func:`fira_jax.projections.refresh_groups`), so that no later step computes every SVD.
        Off by default, as in the reference.
      by_shape: refresh together the leaves one compiled decomposition can serve, for the TPU
        compiler (which expands every SVD or eigendecomposition call site into its own program):
        for ``"exact"``, the matrices of one shape; for ``"gram"``, ``"randomized"`` and
        ``"subspace"`` with one-sided bases, every matrix whose basis vectors have the same
        length, whatever its shape and side (LLaMA's ``d x d``, ``d x f`` and ``f x d`` kernels:
        one eigendecomposition; :func:`fira_jax.projections.top_singular_bases`). It can cost
        memory, since the step then keeps every gradient of the group alive until the refresh.
        By default each leaf has its own refresh, which waits only for that leaf's gradient.
      canonical_signs: fix each singular vector's sign so that its largest-magnitude entry is
        positive (where the largest positive and negative entries tie, the vector is kept). SVD
        signs are implementation-defined (LAPACK, cuSOLVER and TPU differ), and because the
        moments are kept across refreshes the signs shape the trajectory: with the reference's
        own signs, the same seed trains differently on each backend. On by default (a deviation
        from the reference, which uses whatever its SVD returns: docs/semantics.md); ``False``
        is the reference's behaviour.
      moments: what the inner optimizer's moments become at a refresh
        (:func:`fira_jax.projections.carried`): ``"keep"`` (the reference's: the numbers stay, read in the new
        coordinates), ``"reset"`` (zeros for the refreshed matrices) or ``"reproject"`` (carried
        into the new basis: ``mu C``, ``nu (C ⊙ C)``; independent of the SVD's signs). Which to
        pick, with the losses each gives: :doc:`family`.
      seed: seed of the random probes and of APOLLO's projections: each matrix's draws are a
        function of the seed, the refresh's step, the leaf's path and the matrix's index in its
        stack (:func:`fira_jax.projections.matrix_keys`), so a layer draws the same numbers in the
        whole-model step and in the per-layer step.
      spread: under a mesh of several devices with automatic axes set by ``jax.set_mesh``
        (``with jax.set_mesh(mesh):`` around the jitted step), spread the matrices of each
        refresh over the mesh's devices: each device decomposes its share of them whole (the
        compiler moves them with an all-to-all) instead of gathering and decomposing every
        matrix itself, and the bases come back to where the step needs them. Without a mesh
        in context, or ``False``, every device decomposes every matrix. The bases are the same.

    Example:
      >>> import fira_jax
      >>> fira_jax.Refresh(update_proj_gap=500, method="subspace").iterations
      1
    """

    update_proj_gap: int = 200
    method: Method = "exact"
    oversample: int = 8
    power_iters: int | None = None
    stagger: bool = False
    by_shape: bool = False
    canonical_signs: bool = True
    moments: MomentPolicy = "keep"
    seed: int = 0
    spread: bool = True

    def __post_init__(self) -> None:
        check_int("update_proj_gap", self.update_proj_gap, 1)
        check_choice("method", self.method, METHODS)
        check_int("oversample", self.oversample, 0)
        if self.power_iters is not None:
            check_int("power_iters", self.power_iters, 0)
        check_int("seed", self.seed, 0)
        check_choice("moments", self.moments, MOMENT_POLICIES)

    @property
    def iterations(self) -> int:
        """``power_iters``, or its default: one iteration from a warm start, two from Gaussian probes."""
        if self.power_iters is not None:
            return self.power_iters
        return 1 if self.method == "subspace" else 2


def _deprecated_svd(self: Refresh) -> str:
    """Deprecated: ``method``."""
    warnings.warn("Refresh.svd is deprecated: use Refresh.method", DeprecationWarning, stacklevel=2)
    return self.method


_dataclass_init = Refresh.__init__


@functools.wraps(_dataclass_init)
def _init(self: Refresh, *, svd: SvdMethod | None = None, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, and ``svd=``: the deprecated name of ``method``, for one release."""
    if svd is not None:
        warnings.warn("Refresh(svd=...) is deprecated: use Refresh(method=...)", DeprecationWarning, stacklevel=2)
        if kwargs.get("method", svd) != svd:
            raise ValueError(f"Refresh: `svd` {svd!r} and `method` {kwargs['method']!r} disagree; pass `method` only.")
        kwargs["method"] = svd
    _dataclass_init(self, **kwargs)


Refresh.__init__ = _init  # type: ignore[method-assign]
Refresh.svd = property(_deprecated_svd)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Residual:
    """How Fira scales and limits the residual ``S = phi ⊙ (G - s · back(R))``.

    Attributes:
      granularity: ``"column"`` (Fira: one factor per column of G on the left side, per row on
        the right), ``"matrix"`` (one factor per matrix) or ``"none"`` (``phi = 1``, the paper's
        "w/o scaling" ablation).
      residual_scale: ``s``; None: the update's ``scale``, as the reference (which subtracts
        ``scale · P P^T G``); 1.0 gives the paper's orthogonal complement.
      gamma: the limiter's largest growth factor of ``||S||`` per step, ≥ 1 (``inf`` disables
        it; 1.01 in the paper).

    Example:
      >>> import fira_jax
      >>> fira_jax.Residual(residual_scale=1.0)  # the paper's form of the residual
      Residual(granularity='column', residual_scale=1.0, gamma=1.01)
    """

    granularity: Granularity = "column"
    residual_scale: float | None = None
    gamma: float = 1.01

    def __post_init__(self) -> None:
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_float("gamma", self.gamma, low=1.0, high=float("inf"), high_open=False)
        if self.residual_scale is not None:
            check_float("residual_scale", self.residual_scale, low=0.0, high=float("inf"), high_open=False)
