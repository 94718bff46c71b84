"""When the bases are refreshed (step 1 of GaLore and Fira).

Every ``update_proj_gap`` steps the top-``rank`` singular vectors P of each selected gradient G
are recomputed (:func:`fira_jax.projections.top_singular_bases`); in between the basis is kept. The
low-rank gradient is then ``R = G P^T`` (right side) or ``P^T G`` (left side):
:meth:`fira_jax.Basis.project`.

:func:`refresh_bases` arranges the refresh in the compiled step: one ``lax.cond`` per leaf (or,
``refresh_by_shape``, per matrix shape), so that each refresh waits only for its own gradients
and the step holds one matrix's SVD workspace at a time.
"""

from typing import Any

import jax
import jax.numpy as jnp

from fira_jax._src.basis import Basis, site_key, top_singular_bases
from fira_jax._src.options import Refresh


def refresh_groups(n_leaves: int, update_proj_gap: Any, stagger: bool) -> list[tuple[Any, list[int]]]:
    """Which selected leaves refresh together, and at which offset in the gap.

    Without ``stagger``, one group at offset 0: every leaf refreshes when
    ``t % T == 0``. With it, leaf ``j`` of ``k`` has offset ``j T // k`` and refreshes when
    ``(t + offset) % T == 0`` (and at ``t = 0``); leaves sharing an offset form one group. A
    traced ``T`` (``optax.inject_hyperparams``) gives one group per leaf with traced offsets.
    """
    if not stagger or n_leaves == 0:
        return [(0, list(range(n_leaves)))]
    if not isinstance(update_proj_gap, int):  # an array: traced or injected
        return [((j * update_proj_gap) // n_leaves, [j]) for j in range(n_leaves)]
    groups: dict[int, list[int]] = {}
    for j in range(n_leaves):
        groups.setdefault((j * update_proj_gap) // n_leaves, []).append(j)
    return list(groups.items())


def shape_groups(
    members: list[int], grads: list[jax.Array], bases: list[Basis], svd: str = Refresh.method,
    oversample: int = Refresh.oversample,
) -> list[list[int]]:  # fmt: skip
    """``members`` grouped by what one compiled decomposition can serve
    (``fira_jax._src.basis.site_key``): for the exact SVD, matrix shape, rank, side and dtypes;
    for the Gram, randomized and subspace refreshes of one-sided bases, the length of the basis's
    vectors and the rank, whatever the matrix's shape and side. A leaf under explicit sharding
    along its stacking axes forms its own group (it is decomposed where it lives).
    """
    groups: dict[Any, list[int]] = {}
    for j in members:
        groups.setdefault(site_key(grads[j], bases[j], svd, oversample), []).append(j)
    return list(groups.values())


def refresh_due(count: jax.Array, offset: Any, update_proj_gap: Any) -> jax.Array:
    """Whether a group at ``offset`` refreshes at step ``count`` (always at step 0)."""
    return ((count + offset) % update_proj_gap == 0) | (count == 0)


def refresh_bases(
    grads: list[jax.Array],
    old: list[Basis],
    count: jax.Array,
    *,
    update_proj_gap: Any,
    stagger: bool = Refresh.stagger,
    refresh_by_shape: bool = Refresh.by_shape,
    keys: list[jax.Array] | None = None,
    **svd_options: Any,
) -> tuple[list[Basis], list[jax.Array]]:
    """The bases for this step: ``old``, or the gradients' top singular vectors where due.

    One ``lax.cond`` per leaf: it waits only for that leaf's gradient and decomposes its
    matrices (those of a stacked leaf one after another), so the step holds one matrix's SVD
    workspace at a time and the other gradients can be freed as they are used. With
    ``refresh_by_shape``, one cond per matrix shape: one compiled SVD for all the matrices of
    that shape (for the TPU compiler), which keeps them all alive until it runs. A cond is never
    vmapped (that would run every SVD).

    Args:
      grads: the selected leaves' gradients, canonical ``batch + (m, n)``.
      old: their current bases.
      count: the step count.
      update_proj_gap: ``T``.
      stagger: spread the leaves over the gap (:func:`fira_jax.projections.refresh_groups`).
      refresh_by_shape: one cond per matrix shape instead of per leaf.
      keys: for the methods that draw random numbers (the randomized SVD, the subspace
        iteration's probes, APOLLO's projection), per gradient one key per matrix (shape
        ``batch``: :func:`fira_jax.projections.matrix_keys`).
      **svd_options: ``signs``, ``svd``, ``oversample``, ``power_iters``, ``spread`` of
        :func:`fira_jax.projections.top_singular_bases`.

    Returns:
      One :class:`fira_jax.Basis` per gradient, and per gradient whether its refresh was due at
      this step (a traced bool).
    """

    def decompose(members: list[int]) -> list[Basis]:
        picked = None if keys is None else [keys[j] for j in members]
        return top_singular_bases(
            [grads[j] for j in members], [old[j] for j in members], keys=picked, first=count == 0, **svd_options
        )

    new, dues = list(old), [jnp.zeros((), bool)] * len(old)
    for offset, members in refresh_groups(len(grads), update_proj_gap, stagger):
        due = refresh_due(count, offset, update_proj_gap)
        for j in members:
            dues[j] = due
        groups = [[j] for j in members]
        if refresh_by_shape:
            groups = shape_groups(members, grads, old, svd_options.get("svd", Refresh.method),
                                  svd_options.get("oversample", Refresh.oversample))  # fmt: skip
        for group in groups:
            bases = jax.lax.cond(due, lambda g=group: decompose(g), lambda g=group: [old[j] for j in g])
            for j, b in zip(group, bases, strict=True):
                new[j] = b
    return new, dues
