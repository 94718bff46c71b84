"""Where the example's arrays live: a mesh with named axes, and one table from logical axis names to them.

The mesh has three axes, as MaxText's: ``data`` (pure data parallelism: parameters replicated),
``fsdp`` (the batch and the parameters' ``embed`` axis sharded: ZeRO-3 style) and ``tensor``
(the heads, MLP and vocabulary axes sharded: Megatron-style tensor parallelism). ``--mesh
data=2,fsdp=2,tensor=2`` gives their sizes (they multiply to the device count; an axis left out
has size 1); ``--mesh fsdp`` (the default) and ``--mesh data`` put every device on that axis.

Each parameter's axes have logical names (:func:`lm.model.logical_axes`: ``vocab``, ``embed``,
``heads``, ``mlp``, ``layers``, ``norm``, ``lora``), and :data:`RULES` maps each name to a mesh
axis or to None (not sharded). The optimizer's state follows the parameters' shardings (the
library's transforms keep each leaf's sharding; a projection's factors are sharded like the
matrix side they span).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
# Logical axis name -> mesh axis (MaxText's logical_axis_rules, reduced to this model's names).
# The layer axis is never sharded: each step of the scan over the blocks reads one layer whole.
RULES = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "layers": None, "norm": None,
         "lora": None}  # fmt: skip
BATCH = ("data", "fsdp")  # the batch's rows are split over both; ``tensor`` devices see the same rows


class MeshError(ValueError):
    """A ``--mesh`` that cannot hold this run: its one-line message names the flag, axis or parameter."""


def parse_mesh(spec: str, devices: int) -> dict[str, int]:
    """``"fsdp"``, ``"data"`` or ``"data=2,fsdp=4,tensor=1"`` as the three axes' sizes for ``devices``.

    Raises:
      MeshError: an unknown axis, a size below 1, or sizes whose product is not ``devices``.
    """
    if spec in AXES:
        return {axis: devices if axis == spec else 1 for axis in AXES}
    sizes = dict.fromkeys(AXES, 1)
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(f"--mesh {spec!r}: expected data, fsdp, or AXIS=SIZE,... with AXIS among {AXES} and "
                             "SIZE >= 1")  # fmt: skip
        sizes[name.strip()] = int(value)
    if math.prod(sizes.values()) != devices:
        raise MeshError(f"--mesh {spec!r}: the axes' sizes multiply to {math.prod(sizes.values())}, not to the "
                         f"{devices} devices")  # fmt: skip
    return sizes


def batch_rows(sizes: Any) -> int:
    """How many ways a batch's rows are split: the product of the :data:`BATCH` axes' sizes
    (``sizes`` from :func:`parse_mesh`, or a mesh's ``shape``)."""
    return math.prod(sizes[axis] for axis in BATCH)


def make_mesh(sizes: dict[str, int], devices: list) -> jax.sharding.Mesh:
    """The mesh of ``devices`` with the axes ``sizes`` (automatic sharding propagation)."""
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)  # fmt: skip


def param_spec(name: str, logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """The PartitionSpec of a parameter ``name`` of ``shape`` whose axes are ``logical``, by :data:`RULES`.

    Raises:
      MeshError: an axis's size is not divisible by the size of the mesh axis it maps to (named).
    """
    spec = []
    for axis, (logical_name, size) in enumerate(zip(logical, shape, strict=True)):
        mesh_axis = RULES[logical_name] if logical_name is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            raise MeshError(
                f"parameter {name}: axis {axis} ({logical_name}, size {size}) does not divide over the mesh's "
                f"{mesh_axis} axis of {mesh.shape[mesh_axis]} devices; choose another --mesh"
            )
        spec.append(mesh_axis if mesh_axis is not None and mesh.shape[mesh_axis] > 1 else None)
    return P(*spec)


def param_shardings(params: object, mesh: jax.sharding.Mesh) -> object:
    """A NamedSharding for each leaf of an ``nnx.State`` of the model's parameters, by their logical axes."""
    from lm import model as model_lib

    def sharding(path: tuple, x: jax.Array) -> NamedSharding:
        names = model_lib.path_names(path)
        logical = model_lib.logical_axes(names, x.ndim)
        return NamedSharding(mesh, param_spec("/".join(names), logical, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding, params)


def batch_sharding(mesh: jax.sharding.Mesh, leading: int = 0) -> NamedSharding:
    """Rows over ``data`` x ``fsdp``, after ``leading`` unsharded axes (the accumulation steps)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH))


def init_program(make: Callable[[], Any], mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, Any]:
    """The graph of the module ``make()`` builds, and the ``jax.jit`` program that makes its state
    straight into its parameters' shardings (:func:`param_shardings`); ``make`` is traced
    abstractly for the shardings, and must make only ``nnx.Param`` s. ``benchmarks/init_memory.py``
    compiles the program without running it."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, jax.jit(lambda: nnx.split(make())[1], out_shardings=param_shardings(state, mesh))


def init_sharded(make: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
    """The module ``make()`` builds, initialized by :func:`init_program`, so that no device ever
    holds more than its shards and the random numbers of the shards it makes (the compiler
    partitions the random number generator, ``jax_threefry_partitionable``)."""
    graphdef, program = init_program(make, mesh)
    return nnx.merge(graphdef, program())


def replicate_rest(mesh: jax.sharding.Mesh, *modules: nnx.Module) -> None:
    """Replicates on ``mesh``, in place, every array of ``modules`` not yet on it (an optimizer's
    step counts, the dropout's RNG keys: made uncommitted, on one device); the parameters, already
    in their shardings, stay as they are.

    The train step returns those arrays on the mesh: handed in as they were made, the first step
    would be compiled for them and the second compiled again.
    """
    replicated = NamedSharding(mesh, P())

    def place(x: Any) -> Any:
        on_mesh = isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh or not isinstance(x, jax.Array) else jax.device_put(x, replicated)

    for module in modules:
        nnx.update(module, jax.tree.map(place, nnx.state(module)))
