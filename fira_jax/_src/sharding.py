"""Sharding the low-rank state, and the SVD, when parameters are sharded over a mesh.

The optimizer state has other shapes than the parameters (a basis r × n, moments m × r, one
norm per matrix), so it cannot simply inherit a parameter's sharding: the rank rarely divides a
mesh axis. The rules here:

* an axis of the state that is an axis of the parameter (m, n, or a stacking axis) keeps the
  parameter's mesh axes, if its size is divisible by them;
* the rank axis is never sharded; the mesh axes that sharded the parameter along the projected
  dimension move to the moments' other (m or n) axis when that divides, so the moments are not
  fully replicated;
* the SVD gathers each matrix (it needs an unsharded matrix) but keeps stacking axes sharded, so
  the stacked matrices' SVDs run where they live.

Parameters wrapped in Flax NNX Variables are handled as their values: the state of a low-rank
leaf is a plain array, not a Variable that would carry the parameter's sharding metadata.
"""

import math
import sys
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _is_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def flatten(tree: Any) -> tuple[list[Any], Any]:
    """Flattens ``tree`` down to arrays or NNX Variables (kept whole, as one slot)."""
    return jax.tree.flatten(tree, is_leaf=_is_variable)


def value(slot: Any) -> Any:
    """The array in a slot returned by :func:`flatten`."""
    return slot.get_value() if _is_variable(slot) else slot


def pure(tree: Any) -> Any:
    """``tree`` with every NNX Variable replaced by its array (what ``update`` receives)."""
    return jax.tree.map(value, tree, is_leaf=_is_variable)


def _mesh_size(mesh: Any, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def _merge(a: Any, b: Any) -> Any:
    names = [n for x in (a, b) if x is not None for n in ((x,) if isinstance(x, str) else x)]
    return None if not names else (names[0] if len(names) == 1 else tuple(names))


def _group_spec(spec: tuple[Any, ...], axes: tuple[int, ...]) -> Any:
    """Mesh axes of a flattened group of array axes: kept only if just the leading one is sharded."""
    if all(spec[a] is None for a in axes[1:]):
        return spec[axes[0]]
    return None


def canonical_spec(param_spec: Any, layout: Any) -> tuple[tuple[Any, ...], Any, Any]:
    """(batch specs, rows spec, cols spec) of a leaf's canonical ``batch + (m, n)`` form."""
    spec = tuple(param_spec) + (None,) * (len(layout.shape) - len(tuple(param_spec)))
    nb = len(layout.batch)
    rows = layout.perm[nb : nb + layout.n_rows]
    cols = layout.perm[nb + layout.n_rows :]
    return tuple(spec[a] for a in layout.perm[:nb]), _group_spec(spec, rows), _group_spec(spec, cols)


def state_spec(param_spec: Any, layout: Any, kind: str, mesh: Any) -> P:
    """PartitionSpec of a piece of state of one leaf.

    ``kind`` is ``"moments"`` (the low-rank shape), ``"left"`` / ``"right"`` (the bases) or
    ``"norms"`` (one value per matrix).
    """
    return spec_from_canonical(*canonical_spec(param_spec, layout), layout, kind, mesh)


def spec_from_canonical(batch: tuple[Any, ...], rows: Any, cols: Any, layout: Any, kind: str, mesh: Any) -> P:
    """:func:`state_spec` from the specs of the canonical ``batch + (m, n)`` axes."""
    r = layout.rank
    lead = list(zip(layout.batch, batch, strict=True))
    if kind == "norms":
        dims = lead
    elif kind == "left":
        dims = [*lead, (layout.m, rows), (r, None)]
    elif kind == "right":
        dims = [*lead, (r, None), (layout.n, cols)]
    elif layout.side == "right":  # moments batch + (m, r): n's mesh axes move to m if they fit
        merged = _merge(rows, cols)
        dims = [*lead, (layout.m, merged if layout.m % _mesh_size(mesh, merged) == 0 else rows), (r, None)]
    elif layout.side == "left":  # moments batch + (r, n)
        merged = _merge(cols, rows)
        dims = [*lead, (r, None), (layout.n, merged if layout.n % _mesh_size(mesh, merged) == 0 else cols)]
    else:  # two-sided: batch + (r, r)
        dims = [*lead, (r, None), (r, None)]
    return P(*(axes if axes is not None and size % _mesh_size(mesh, axes) == 0 else None for size, axes in dims))


def _canonical_explicit(g: jax.Array) -> tuple[tuple[Any, ...], Any] | None:
    spec = explicit_spec(g)
    if spec is None:
        return None
    spec = tuple(spec) + (None,) * (g.ndim - len(tuple(spec)))
    return spec, jax.typeof(g).sharding.mesh


def out_sharding(g: jax.Array, layout: Any, kind: str, trailing: int = 0) -> NamedSharding | None:
    """Under explicit sharding, the sharding of a result computed from canonical ``g``.

    ``kind`` as in :func:`state_spec`, or ``"dense"`` (g's own spec), ``"rows"`` (batch +
    (m, ·) with the last axis unsharded) or ``"cols"`` (batch + (·, n)); ``trailing`` unsharded
    axes are appended. The result is a ``NamedSharding`` on ``g``'s own mesh, so no mesh context
    is needed. None when ``g`` is not sharded over explicit axes.
    """
    found = _canonical_explicit(g)
    if found is None:
        return None
    spec, mesh = found
    batch, rows, cols = spec[:-2], spec[-2], spec[-1]
    if kind == "dense":
        out = P(*spec)
    elif kind == "rows":
        out = P(*batch, rows, None)
    elif kind == "cols":
        out = P(*batch, None, cols)
    else:
        out = spec_from_canonical(batch, rows, cols, layout, kind, mesh)
    return NamedSharding(mesh, P(*out, *(None,) * trailing))


def match(x: jax.Array, target: NamedSharding | None) -> jax.Array:
    """Reshards ``x`` to ``target`` (explicit sharding only; a no-op when ``target`` is None)."""
    return x if target is None else jax.sharding.reshard(x, target)


def place(x: jax.Array, param: Any, layout: Any, kind: str) -> jax.Array:
    """Puts a freshly built piece of state on the mesh of a sharded parameter (else as it is).

    Concrete parameters with a ``NamedSharding`` give a ``device_put``; traced ones (init under
    ``jit``) are resharded when their sharding is explicit, and left to XLA otherwise.
    """
    p = value(param)
    if isinstance(p, jax.core.Tracer):
        spec = explicit_spec(p)
        if spec is None:
            return x
        mesh = jax.typeof(p).sharding.mesh
        return jax.sharding.reshard(x, NamedSharding(mesh, state_spec(spec, layout, kind, mesh)))
    sharding = getattr(p, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return x
    return jax.device_put(x, NamedSharding(sharding.mesh, state_spec(sharding.spec, layout, kind, sharding.mesh)))


def explicit_spec(x: jax.Array) -> P | None:
    """The PartitionSpec of ``x`` when it is sharded over explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return sharding.spec


def gather_matrix(x: jax.Array) -> jax.Array:
    """Under explicit sharding, unshards the last two axes (for the SVD); stacking axes stay sharded."""
    spec = explicit_spec(x)
    if spec is None:
        return x
    spec = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    return jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, P(*spec[:-2], None, None)))


def spread_mesh() -> Any:
    """The mesh set with ``jax.set_mesh`` when it has more than one device and automatic axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1:
        return None
    if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return None
    return mesh


def spread_map(fn: Any, items: Any, shared: jax.Array, mesh: Any) -> Any:
    """``fn(item, shared)`` for each item along the leading axes of ``items``, spread over ``mesh``.

    The items are padded (with copies of the first ones) to a multiple of the mesh's size and
    sharded along their leading axis over every mesh axis, so each device maps ``fn`` over its
    share only, each item whole (the compiler moves the items there, an all-to-all from however
    they were sharded); the results come back stacked, in order. ``shared`` is replicated.
    """
    n = jax.tree.leaves(items)[0].shape[0]
    total = -(-n // mesh.size) * mesh.size
    if total != n:
        idx = jax.numpy.arange(total) % n
        items = jax.tree.map(lambda a: a[idx], items)
    spec = P(tuple(mesh.axis_names))

    def local(xs: Any, shared: jax.Array) -> Any:
        return jax.lax.map(lambda x: fn(x, shared), xs)

    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec)(items, shared)
    return jax.tree.map(lambda a: a[:n], out)
