"""Decoupled weight decay applied after the step, in the reference's order."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax._src import masks


class AddDecayedWeightsAfterStepState(NamedTuple):
    """State of :func:`add_decayed_weights_after_step`: the step count for schedules."""

    count: jax.Array


def add_decayed_weights_after_step(
    weight_decay: float,
    learning_rate: optax.ScalarOrSchedule,
    mask: masks.Mask = None,
) -> optax.GradientTransformation:
    r"""Decoupled weight decay on the stepped weights, as the reference applies it.

    The reference (``transformers.AdamW`` as copied into ``fira`` and
    ``galore-torch``) first steps, ``W' = W + u``, then decays the stepped
    weights, ``W'' = W' - lr \cdot wd \cdot W'``. So this turns the incoming
    update ``u`` (already scaled by ``-lr``) into

    .. math::
      u - \text{lr}_t \cdot \text{wd} \cdot (W + u).

    :func:`optax.add_decayed_weights` decays the pre-step ``W`` instead; the
    two differ by ``lr^2 wd u``.

    Place it last in the chain, after the learning rate.

    Args:
      weight_decay: the decay rate ``wd``.
      learning_rate: the learning rate (a float or a schedule of the step count),
        the same one that scaled ``u``.
      mask: which leaves to decay, as in :func:`optax.masked`; default all
        floating-point leaves (integer and boolean leaves are never decayed).

    Returns:
      An ``optax.GradientTransformation`` that needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.add_decayed_weights_after_step(0.5, learning_rate=0.1)
      >>> params = {"w": jnp.array([1.0])}
      >>> out, _ = tx.update({"w": jnp.array([-0.2])}, tx.init(params), params)
      >>> out["w"]  # -0.2 - 0.1 * 0.5 * (1.0 - 0.2)
      Array([-0.24...], dtype=float32)
    """

    def init_fn(params: Any) -> AddDecayedWeightsAfterStepState:
        del params
        return AddDecayedWeightsAfterStepState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Any, state: AddDecayedWeightsAfterStepState, params: Any = None
    ) -> tuple[Any, AddDecayedWeightsAfterStepState]:
        if params is None:
            raise ValueError("add_decayed_weights_after_step needs `params` in update(updates, state, params).")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        leaves, treedef = jax.tree.flatten(updates)
        selected = masks.resolve_per_leaf(updates, mask, lambda x: True, "mask")
        param_leaves = treedef.flatten_up_to(params)
        out = [
            (u - lr * weight_decay * (p + u)).astype(u.dtype) if sel and masks.is_float(p) else u
            for u, p, sel in zip(leaves, param_leaves, selected, strict=True)
        ]
        return treedef.unflatten(out), AddDecayedWeightsAfterStepState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
