"""fira_jax: Fira, GaLore and APOLLO, memory-efficient LLM training, as Optax transforms."""

from fira_jax.adam import ScaleByAdamState, adam_bias_correction, scale_by_adam, scale_by_torch_adam
from fira_jax.alias import apollo, apollo_mini, fira, galore
from fira_jax.basis import Basis
from fira_jax.layout import Layout, MatrixAxes, axes_by_path, axes_from_logical
from fira_jax.limiter import ClipByNormGrowthState, clip_by_norm_growth, limit_norm_growth
from fira_jax.low_rank import LowRankState, scale_by_apollo, scale_by_fira, scale_by_galore
from fira_jax.masks import mask_by_path
from fira_jax.options import Refresh, Residual
from fira_jax.residual import fira_update, residual, residual_norm, scaled_gradient, scaling_factor
from fira_jax.weight_decay import AddDecayedWeightsAfterStepState, add_decayed_weights_after_step

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsAfterStepState",
    "Basis",
    "ClipByNormGrowthState",
    "Layout",
    "LowRankState",
    "MatrixAxes",
    "Refresh",
    "Residual",
    "ScaleByAdamState",
    "adam_bias_correction",
    "add_decayed_weights_after_step",
    "apollo",
    "apollo_mini",
    "axes_by_path",
    "axes_from_logical",
    "clip_by_norm_growth",
    "fira",
    "fira_update",
    "galore",
    "limit_norm_growth",
    "mask_by_path",
    "residual",
    "residual_norm",
    "scale_by_adam",
    "scale_by_apollo",
    "scale_by_fira",
    "scale_by_galore",
    "scale_by_torch_adam",
    "scaled_gradient",
    "scaling_factor",
]
