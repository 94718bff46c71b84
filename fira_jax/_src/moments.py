r"""What the subspace optimizer's moments become when a basis is refreshed.

The moments live in the coordinates of the basis that was current when they were accumulated. At
a refresh the basis changes, and :class:`fira_jax.Refresh`'s ``moments`` says what happens to them:

* ``"keep"`` (the reference's, GaLore's and Fira's and APOLLO's code): the numbers stay as they
  are and are read in the new coordinates;
* ``"reset"``: the moments of the refreshed matrices restart from zero;
* ``"reproject"``: they are carried into the new coordinates. With ``C`` the change of
  coordinates from the old basis to the new one (``C = P_{old} P_{new}^T`` on the right side,
  ``P_{new}^T P_{old}`` on the left),

  .. math::
    \mu \leftarrow \mu C, \qquad \nu \leftarrow \nu \, (C \odot C) \quad (\text{right side})

  (``C \mu`` and ``(C \odot C) \nu`` on the left; both sides for ``proj_type="full"``). The first
  moment is a linear function of the gradients, so it is carried exactly as far as it lies in the
  new subspace; the second moment is carried as the variance of independent coordinates would
  be, which keeps it non-negative. When the new basis is the old one with some vectors' signs
  flipped (an SVD's signs are implementation-defined: LAPACK, cuSOLVER and the TPU differ), ``C``
  is a diagonal of signs and the run is unchanged: re-projection makes a run independent of the
  backend's sign convention, as :class:`fira_jax.Refresh`'s default ``canonical_signs`` does.

The moments are found in the inner optimizer's state as the subtrees shaped like the parameters
under a field named ``mu`` (first moment) or ``nu`` (second moment), as in
:func:`fira_jax.scale_by_adam` and :func:`optax.scale_by_adam`; ``"reset"`` applies to every
low-rank leaf of the state.
"""

from collections.abc import Callable
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from fira_jax._src.basis import Basis

MomentPolicy = Literal["keep", "reset", "reproject"]
MOMENT_POLICIES: tuple[str, ...] = get_args(MomentPolicy)
FIRST, SECOND = "mu", "nu"  # the field names under which the moments are found


def transition(old: Basis, new: Basis) -> tuple[jax.Array | None, jax.Array | None]:
    """``(C_left, C_right)``: the change of coordinates from ``old`` to ``new`` on each side (float32,
    ``batch + (r, r)``; None for a side the basis does not use).

    A low-rank coefficient ``X`` (``P_left X`` or ``X P_right`` in the full space) is ``C_left X``
    or ``X C_right`` in the new basis, as far as it lies in the new subspace.
    """
    left = right = None
    if old.left is not None:
        a, b = old.left.astype(jnp.float32), new.left.astype(jnp.float32)
        left = jnp.einsum("...mr,...ms->...rs", b, a)  # P_new^T P_old
    if old.right is not None:
        a, b = old.right.astype(jnp.float32), new.right.astype(jnp.float32)
        right = jnp.einsum("...rn,...sn->...rs", a, b)  # P_old P_new^T
    return left, right


def carried(x: jax.Array, old: Basis, new: Basis, second: bool) -> jax.Array:
    """One moment ``x`` (low-rank shape) in ``new``'s coordinates: linear (``second=False``) or by
    the squared change of coordinates (the second moment)."""
    left, right = transition(old, new)
    if second:
        left = None if left is None else left * left
        right = None if right is None else right * right
    out = x.astype(jnp.float32)
    if left is not None:
        out = jnp.einsum("...rs,...sn->...rn", left, out)
    if right is not None:
        out = jnp.einsum("...mr,...rs->...ms", out, right)
    return out.astype(x.dtype)


def _params_like(treedef: Any) -> Callable[[Any], bool]:
    """Whether a node of a state is a tree shaped like the parameters (``treedef``)."""

    def params_like(x: Any) -> bool:
        if treedef.num_nodes == 1:  # the parameters are one array
            return isinstance(x, jax.Array)
        try:
            treedef.flatten_up_to(x)
        except (ValueError, TypeError):
            return False
        return True

    return params_like


def _moment_trees(state: Any, treedef: Any) -> tuple[list[tuple[Any, Any, list[Any] | None]], Any]:
    """Each node of ``state`` down to the subtrees shaped like the parameters: ``(key path, node,
    its leaves in the parameters' order or None for another node)``, and the structure above them."""
    params_like = _params_like(treedef)
    found, outer = jax.tree_util.tree_flatten_with_path(state, is_leaf=params_like)
    out = []
    for path, node in found:
        leaves = None
        if params_like(node):
            leaves = [node] if treedef.num_nodes == 1 else list(treedef.flatten_up_to(node))
        out.append((path, node, leaves))
    return out, outer


def _field(path: tuple[Any, ...]) -> str | None:
    """The last named field on ``path`` (``mu`` in ``state.mu``), or None."""
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    return names[-1] if names else None


def check(state: Any, treedef: Any, low_shapes: dict[int, tuple[int, ...]], policy: str) -> None:
    """Refuses ``policy="reproject"`` on an inner state whose low-rank leaves are not under ``mu`` or
    ``nu`` (it would not know how to carry them), naming the field and the leaf index."""
    if policy != "reproject":
        return
    found, _ = _moment_trees(state, treedef)
    for path, _, leaves in found:
        if leaves is None:
            continue
        for i, shape in low_shapes.items():
            if tuple(getattr(leaves[i], "shape", ())) == shape and _field(path) not in (FIRST, SECOND):
                raise ValueError(
                    f"Refresh(moments='reproject') carries first moments (a field `mu`) and second moments (`nu`); "
                    f"the inner optimizer's state holds a low-rank leaf at {jax.tree_util.keystr(path)}, which is "
                    "neither. Use moments='keep' or 'reset', or an inner optimizer whose moments are named mu / nu."
                )


def carry(state: Any, treedef: Any, changes: dict[int, tuple[Basis, Basis, jax.Array]], policy: str) -> Any:
    """The inner optimizer's ``state`` with the moments of the refreshed leaves handled by ``policy``.

    Args:
      state: the inner optimizer's state.
      treedef: the structure of the tree it was built for (the parameters').
      changes: leaf index -> ``(old basis, new basis, due)``, ``due`` whether it was refreshed
        at this step (a traced bool).
      policy: ``"keep"``, ``"reset"`` or ``"reproject"``.

    Returns:
      The state, with the same structure, shapes and dtypes.
    """
    if policy == "keep" or not changes:
        return state
    found, outer = _moment_trees(state, treedef)
    nodes = []
    for path, node, leaves in found:
        if leaves is None:
            nodes.append(node)
            continue
        name = _field(path)
        for i, (old, new, due) in changes.items():
            x = leaves[i]
            if not isinstance(x, jax.Array) or tuple(x.shape) != new.layout.low_shape:
                continue
            if policy == "reset":
                target = jnp.zeros_like(x)
            elif name in (FIRST, SECOND):
                target = carried(x, old, new, second=name == SECOND)
            else:
                continue
            leaves[i] = jnp.where(due, target, x)
        nodes.append(leaves[0] if treedef.num_nodes == 1 else treedef.unflatten(leaves))
    return jax.tree_util.tree_unflatten(outer, nodes)
