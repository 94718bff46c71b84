"""fira_jax: Fira, GaLore and APOLLO, memory-efficient LLM training, as Optax transforms.

Every public name is here or in the two namespaces :mod:`fira_jax.projections` (how bases are
computed and carried) and :mod:`fira_jax.matrices` (which leaves are matrices); the code lives
under ``fira_jax._src``, which is private.
"""

from fira_jax import matrices, projections
from fira_jax._src.adam import ScaleByAdamState, adam_bias_correction, scale_by_adam, scale_by_torch_adam
from fira_jax._src.alias import apollo, apollo_mini, fira, galore
from fira_jax._src.basis import Basis
from fira_jax._src.deprecated import alias_old_modules
from fira_jax._src.family import (
    apollo_scaling,
    fira_residual,
    galore_update,
    scale_by_apollo,
    scale_by_fira,
    scale_by_galore,
)
from fira_jax._src.layout import Layout, MatrixAxes, axes_by_path, axes_from_logical
from fira_jax._src.limiter import ClipByNormGrowthState, clip_by_norm_growth, limit_norm_growth
from fira_jax._src.masks import mask_by_path
from fira_jax._src.options import Refresh, Residual
from fira_jax._src.residual import fira_update, residual, residual_norm, scaled_gradient, scaling_factor
from fira_jax._src.subspace import STATE_VERSION, Compensation, LowRankState, Subspace, scale_by_subspace
from fira_jax._src.weight_decay import AddDecayedWeightsAfterStepState, add_decayed_weights_after_step

__version__ = "0.1.0"

__all__ = [
    "STATE_VERSION",
    "AddDecayedWeightsAfterStepState",
    "Basis",
    "ClipByNormGrowthState",
    "Compensation",
    "Layout",
    "LowRankState",
    "MatrixAxes",
    "Refresh",
    "Residual",
    "ScaleByAdamState",
    "Subspace",
    "adam_bias_correction",
    "add_decayed_weights_after_step",
    "apollo",
    "apollo_mini",
    "apollo_scaling",
    "axes_by_path",
    "axes_from_logical",
    "clip_by_norm_growth",
    "fira",
    "fira_residual",
    "fira_update",
    "galore",
    "galore_update",
    "limit_norm_growth",
    "mask_by_path",
    "matrices",
    "projections",
    "residual",
    "residual_norm",
    "scale_by_adam",
    "scale_by_apollo",
    "scale_by_fira",
    "scale_by_galore",
    "scale_by_subspace",
    "scale_by_torch_adam",
    "scaled_gradient",
    "scaling_factor",
]

alias_old_modules(__name__)  # fira_jax.low_rank, fira_jax.layout, ...: deprecated, for one release
