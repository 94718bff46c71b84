"""The norm-growth limiter (step 4 of Fira).

Fira scales the residual by factors borrowed from Adam; when the gradient
changes abruptly those factors can blow the residual up and cause loss
spikes. The limiter caps the growth of the residual's norm from one step to
the next at a factor ``gamma``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax import projection as proj
from fira_jax import sharding
from fira_jax._validation import check_float
from fira_jax.residual import NORM_EPS


class ClipByNormGrowthState(NamedTuple):
    """State of :func:`clip_by_norm_growth`.

    Attributes:
      count: number of updates so far (int32).
      norms: per selected leaf, the limited residual norm of the previous step,
        one float32 per matrix (shape ``batch``); ``optax.MaskedNode()`` elsewhere.
    """

    count: jax.Array
    norms: Any


def clip_by_norm_growth(
    gamma: float = 1.01, *, projection: optax.GradientTransformation
) -> optax.GradientTransformation:
    r"""Limits the growth of each residual's norm to a factor ``gamma`` per step.

    For each matrix, with :math:`s` the limited norm of the previous step:

    .. math::
      \ell = \frac{\max(\|S\| / (s + 10^{-8}), \gamma)}{\gamma}, \qquad
      S \leftarrow S / \ell, \qquad s \leftarrow \|S\|

    At the first step ``s = ||S||`` is recorded and ``S`` is left unchanged.
    ``gamma = inf`` disables the limiter. Norms are Frobenius norms of the
    uncorrected residual, as in the reference (the bias correction is applied
    later to the whole update).

    Must follow :func:`fira_jax.scale_residual_by_norm_ratio`. Unselected
    leaves pass through.

    Args:
      gamma: the largest allowed growth factor per step, ≥ 1 (1.01 in Fira).
      projection: the :func:`fira_jax.project_gradients` transformation of the
        chain; it tells the number of matrices per leaf at init.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ClipByNormGrowthState`.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> project = fira_jax.project_gradients(rank=2, update_proj_gap=10)
      >>> limiter = fira_jax.clip_by_norm_growth(1.01, projection=project)
      >>> limiter.init({"w": jnp.ones((3, 6, 4))}).norms["w"].shape  # one norm per stacked matrix
      (3,)

    References:
      Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
      Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024, Sec. 4.3.
    """
    check_float("gamma", gamma, low=1.0, high=float("inf"), high_open=False)

    def init_fn(params: Any) -> ClipByNormGrowthState:
        slots, treedef = sharding.flatten(params)
        lays = proj.projection_layouts(projection, params)
        norms = [
            optax.MaskedNode() if lay is None else sharding.place(jnp.zeros(lay.batch, jnp.float32), slot, lay, "norms")
            for slot, lay in zip(slots, lays, strict=True)
        ]
        return ClipByNormGrowthState(count=jnp.zeros([], jnp.int32), norms=treedef.unflatten(norms))

    def update_fn(updates: Any, state: ClipByNormGrowthState, params: Any = None) -> tuple[Any, ClipByNormGrowthState]:
        del params
        first = state.count == 0

        def limit(u: Any, prev: Any) -> tuple[Any, Any]:
            if not proj.is_low_rank(u):
                return u, prev
            if u.residual is None:
                raise ValueError(
                    f"Leaf '{u.layout.path}' has no residual to limit: put "
                    "fira_jax.scale_residual_by_norm_ratio before clip_by_norm_growth."
                )
            norm = u.residual.norm(u)
            ell = jnp.maximum(norm / (prev + NORM_EPS) / gamma, 1.0)
            ell = jnp.where(first, 1.0, ell)
            limited = u.residual.replace(phi=u.residual.phi / ell[..., None, None])
            return u.replace(residual=limited), norm / ell

        leaves, treedef = jax.tree.flatten(updates, is_leaf=proj.is_low_rank)
        prevs = treedef.flatten_up_to(state.norms)
        pairs = [limit(u, prev) for u, prev in zip(leaves, prevs, strict=True)]
        new_updates = treedef.unflatten([p[0] for p in pairs])
        norms = treedef.unflatten([p[1] for p in pairs])
        return new_updates, ClipByNormGrowthState(count=optax.safe_int32_increment(state.count), norms=norms)

    return optax.GradientTransformation(init_fn, update_fn)
