r"""The norm-growth limiter (step 4 of Fira).

Fira scales the residual by factors borrowed from Adam; when the gradient changes abruptly those
factors can blow the residual up and cause loss spikes. The limiter caps the growth of the
residual's norm from one step to the next at a factor ``gamma``:

.. math::
  \ell = \frac{\max(\|S\| / (s + 10^{-8}), \gamma)}{\gamma}, \qquad
  S \leftarrow S / \ell, \qquad s \leftarrow \|S\| / \ell

with ``s`` the limited norm of the previous step. Each matrix is limited by its own past: the
limiter needs no global view of the gradients.
"""

from typing import Any

import jax
import jax.numpy as jnp

from fira_jax.residual import NORM_EPS


def limit_norm_growth(norm: jax.Array, previous: jax.Array, gamma: Any, first: Any) -> tuple[jax.Array, jax.Array]:
    """The limiter's divisor ``ell`` and the limited norm to remember, per matrix.

    Args:
      norm: ``||S||`` of this step, per matrix (float32).
      previous: the limited norm of the previous step.
      gamma: the largest allowed growth factor per step, ≥ 1 (1.01 in Fira; ``inf`` disables it).
      first: True at the first step, where ``ell = 1`` and the norm is only recorded.

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
    ell = jnp.where(first, 1.0, ell)
    return ell, norm / ell
