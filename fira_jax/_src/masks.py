"""Selecting which leaves get low-rank treatment.

A *mask* follows :func:`optax.masked`: a pytree of bools with the structure of
the parameters, or a callable from the parameters to one. ``True`` selects a
leaf for projection; unselected leaves get the subspace optimizer as they are
(plain Adam in :func:`fira_jax.fira`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Mask = Any  # a pytree of bools, or a callable from params to one, or None


def is_float(x: Any) -> bool:
    """Whether a leaf is trained at all: floating point (integer and boolean leaves get a zero update)."""
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def path_str(path: tuple[Any, ...]) -> str:
    """Joins a JAX key path with '/': ``{'attn': {'kernel': x}}`` -> ``attn/kernel``.

    Args:
      path: a key path as given by ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The keys' names (dict keys, attribute names, sequence indices) joined
      with '/'.
    """
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    return "/".join(names)


def mask_by_path(*patterns: str) -> Callable[[Any], Any]:
    """Selects the leaves whose '/'-joined key path contains any of ``patterns``.

    This mirrors the reference implementation's ``target_modules_list``
    (``["attn", "mlp"]`` in the Fira and GaLore pre-training scripts), where a
    linear layer is projected when its module name contains a target.

    Args:
      *patterns: substrings to look for in each leaf's path, for example
        ``"attn", "mlp"``. At least one is required.

    Returns:
      A callable from a params pytree to a pytree of bools with its structure,
      usable as the ``mask`` of :func:`fira_jax.fira`,
      :func:`fira_jax.galore` and :func:`fira_jax.scale_by_fira`. Leaves
      with fewer than two dimensions (biases, norm scales) are never selected.

    Example:
      >>> import jax.numpy as jnp
      >>> import fira_jax
      >>> params = {"attn": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
      ...           "embed": jnp.zeros((10, 4))}
      >>> fira_jax.mask_by_path("attn", "mlp")(params)
      {'attn': {'bias': False, 'kernel': True}, 'embed': False}
    """
    if not patterns:
        raise ValueError("mask_by_path needs at least one pattern, got none.")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"mask_by_path patterns must be non-empty strings, got {pattern!r}.")

    def mask_fn(params: Any) -> Any:
        def select(path: tuple[Any, ...], leaf: Any) -> bool:
            name = path_str(path)
            return getattr(leaf, "ndim", 0) >= 2 and any(p in name for p in patterns)

        return jax.tree_util.tree_map_with_path(select, params)

    return mask_fn


def resolve_per_leaf(tree: Any, spec: Any, default: Callable[[Any], Any], what: str) -> list[Any]:
    """Broadcasts a per-leaf spec (value, pytree or callable) to ``tree``'s leaves.

    Args:
      tree: the params (or updates) pytree.
      spec: ``None`` (use ``default`` on every leaf), a callable from ``tree``
        to a pytree, or a pytree with ``tree``'s structure as a prefix.
      default: maps a leaf to its value when ``spec`` is ``None``.
      what: the argument's name, for error messages.

    Returns:
      One value per leaf of ``tree``, in flattening order.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if spec is None:
        return [default(leaf) for leaf in leaves]
    if callable(spec):
        spec = spec(tree)
    try:
        return treedef.flatten_up_to(spec)
    except (ValueError, TypeError) as err:
        hint = ""
        if isinstance(spec, bool | np.bool_) or getattr(spec, "shape", None) == ():
            hint = (
                f" A single {spec!r} where a pytree was expected is what optax.inject_hyperparams makes of a "
                f"callable `{what}`: it calls every callable argument as a schedule of the step. Name it static: "
                f'optax.inject_hyperparams(fira_jax.fira, static_args=("rank", "{what}"))(...).'
            )
        raise ValueError(
            f"`{what}` must be a pytree with the structure of the parameters "
            f"(or a callable returning one); it does not match: {str(err).rstrip('.')}.{hint}"
        ) from None
