"""The optimizers compared in the example: Fira, GaLore, APOLLO, APOLLO-Mini and AdamW, plus Fira's ablations.

Fira, GaLore and APOLLO project the attention and MLP kernels (the papers' target modules, selected
by path); the embedding, norms and output head get plain Adam with the same hyperparameters. The
schedule is the papers': linear warmup, then cosine decay to 10% of the peak learning rate.
"""

import optax

import fira_jax

OPTIMIZERS = ("fira", "galore", "apollo", "apollo-mini", "adamw")
# APOLLO's scale multiplies its update by sqrt(scale); the authors' scripts: 1 (APOLLO), 128 (Mini).
APOLLO_SCALES = {"apollo": 1.0, "apollo-mini": 128.0}
# The paper's Table 5: no residual scaling, matrix-level phi, no limiter, gradient clipping
# instead of the limiter.
ABLATIONS = ("none", "no-scaling", "matrix-level", "no-limiter", "grad-clip")
TARGET_MODULES = ("attn", "mlp")
TARGET_AXES = fira_jax.axes_by_path({f"{m}/": fira_jax.MatrixAxes() for m in TARGET_MODULES})
# Weight decay, when asked for, goes to the kernels only: norms' scales and the embedding are
# exempt, as in LLM recipes (the model has no biases).
DECAY_MODULES = ("attn/", "mlp/", "lm_head")


def schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine to ``0.1 * lr`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=0.1 * lr)


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int,
    scale: float = 0.25,
    update_proj_gap: int = 200,
    gamma: float = 1.01,
    weight_decay: float = 0.0,
    ablation: str = "none",
    svd: str = "exact",
    refresh_by_shape: bool = False,
    apollo_scale: float | None = None,
    moments: str = "keep",
) -> optax.GradientTransformation:
    """Builds one of :data:`OPTIMIZERS`; ``ablation`` applies to Fira only, ``svd`` and
    ``refresh_by_shape`` to Fira and GaLore (and APOLLO's refresh, which draws a random projection
    instead of an SVD), ``apollo_scale`` to APOLLO (default :data:`APOLLO_SCALES`); ``scale`` is
    Fira's and GaLore's; ``moments`` (what Adam's moments become at a refresh: ``fira_jax.Refresh``)
    to all three.

    The projected leaves are declared by path (:data:`TARGET_AXES`): every kernel under "attn/" and
    "mlp/" is a stack of matrices over its last two axes, one per layer of the scanned model (or
    one matrix, for a layer's slice in per-layer updates); the stacked norm scales ("attn_norm",
    2-D but not matrices), the embedding and the head get the subspace optimizer's plain Adam."""
    decay_mask = fira_jax.mask_by_path(*DECAY_MODULES)
    if name == "adamw":
        return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6, weight_decay=weight_decay, mask=decay_mask)
    if name in APOLLO_SCALES:
        common = {"update_proj_gap": update_proj_gap, "weight_decay": weight_decay, "gamma": gamma,
                  "weight_decay_mask": decay_mask, "axes": TARGET_AXES, "moments": moments,
                  "scale": APOLLO_SCALES[name] if apollo_scale is None else apollo_scale}  # fmt: skip
        if name == "apollo-mini":
            return fira_jax.apollo_mini(learning_rate, **common)
        return fira_jax.apollo(learning_rate, rank=rank, refresh_by_shape=refresh_by_shape, **common)
    if name == "galore":
        return fira_jax.galore(
            learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, weight_decay=weight_decay,
            weight_decay_mask=decay_mask, refresh_method=svd, refresh_by_shape=refresh_by_shape, axes=TARGET_AXES,
            moments=moments,
        )  # fmt: skip
    if name != "fira":
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"--ablation must be one of {ABLATIONS}, got {ablation!r}")
    granularity = {"no-scaling": "none", "matrix-level": "matrix"}.get(ablation, "column")
    if ablation in ("no-limiter", "grad-clip"):
        gamma = float("inf")
    tx = fira_jax.fira(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, weight_decay=weight_decay,
        gamma=gamma, granularity=granularity, weight_decay_mask=decay_mask, refresh_method=svd,
        refresh_by_shape=refresh_by_shape, axes=TARGET_AXES, moments=moments,
    )  # fmt: skip
    if ablation == "grad-clip":
        tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    return tx
