"""fira_jax: Fira and GaLore, memory-efficient full-rank training, as Optax transforms."""

from fira_jax.alias import fira, galore
from fira_jax.basis import Basis
from fira_jax.layout import Layout, MatrixAxes
from fira_jax.limiter import ClipByNormGrowthState, clip_by_norm_growth
from fira_jax.masks import mask_by_path
from fira_jax.projection import LowRank, Projection, ProjectionState, project_back, project_gradients
from fira_jax.residual import Residual, scale_residual_by_norm_ratio, scaling_factor
from fira_jax.subspace import ScaleByAdamState, adam_bias_correction, in_subspace, scale_by_adam
from fira_jax.weight_decay import AddDecayedWeightsAfterStepState, add_decayed_weights_after_step

__version__ = "0.1.0"

__all__ = [
    "AddDecayedWeightsAfterStepState",
    "Basis",
    "ClipByNormGrowthState",
    "Layout",
    "LowRank",
    "MatrixAxes",
    "Projection",
    "ProjectionState",
    "Residual",
    "ScaleByAdamState",
    "adam_bias_correction",
    "add_decayed_weights_after_step",
    "clip_by_norm_growth",
    "fira",
    "galore",
    "in_subspace",
    "mask_by_path",
    "project_back",
    "project_gradients",
    "scale_by_adam",
    "scale_residual_by_norm_ratio",
    "scaling_factor",
]
