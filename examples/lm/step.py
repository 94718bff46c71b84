"""The train step: the one jitted function that pre-training and fine-tuning run, and that
``memory_report.py`` compiles to measure the peak.

:func:`make_train_step` returns a pure function of ``(graphdef, state, *batch)``, where
``graphdef, state = nnx.split((model, optimizer))``: the whole state (parameters, optimizer state,
RNG counters, anything else the model holds) goes in and comes back, and it is donated, so the
compiled step updates it in place. :func:`run_step` is the eager-side glue: split, step, update.

With ``grad_accum == 1`` the step is a plain ``value_and_grad`` and update: no accumulator, so no
full-size gradient has to outlive its use, and XLA may apply each leaf's update as soon as its
gradient exists. With ``grad_accum > 1`` each batch array carries a leading axis of micro-batches;
a ``lax.scan`` sums their gradients into one accumulator (one more gradient-sized buffer, in float32
for bf16 parameters).

:func:`make_layerwise_train_step` is the same step with per-layer updates (GaLore's §5.5): the
model runs as a chain of :class:`Stage` s (embedding, the scanned blocks, head and loss), the
backward pass goes through them one at a time with ``jax.vjp`` (through a scanned stage's layers
one at a time, in a reverse scan), and each stage's update is applied, by its own
``nnx.Optimizer`` (a :class:`LayerwiseOptimizer`; a scanned stage's one layer's slice at a time),
as soon as its gradient exists. Then no step needs more than one layer's gradients at once,
whatever the compiler's schedule. It cannot
clip by the global gradient norm or accumulate gradients (both need every gradient before any
update); Fira's limiter, which bounds each matrix's residual by its own past, needs neither.
"""

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# The values of a state's Variables: nnx.as_pure from flax 0.12.2 (nnx.pure before, deprecated since).
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def make_train_step(loss_fn: Any, wrt: Any = nnx.Param, grad_accum: int = 1) -> Any:
    """The jitted train step ``(graphdef, state, *batch) -> (state, loss)``.

    Args:
      loss_fn: ``loss_fn(model, *batch) -> scalar``.
      wrt: the NNX filter of the trainable variables (as ``nnx.Optimizer``'s ``wrt``).
      grad_accum: micro-batches per step; above 1 every batch array has a leading axis of that size.

    Returns:
      A ``jax.jit`` function (``graphdef`` static, ``state`` donated) that can also be
      ``.lower``-ed on abstract values.
    """
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")

    def step(graphdef: nnx.GraphDef, state: nnx.State, *batch: jax.Array,
             layout: Layout | None = None) -> tuple[nnx.State, jax.Array]:  # fmt: skip
        model, optimizer = nnx.merge(graphdef, state)
        if grad_accum == 1:
            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, *batch)
        else:
            model_def, params, rest = nnx.split(model, wrt, ...)
            if jax.tree.leaves(nnx.state(model, nnx.RngState)):
                raise ValueError("grad_accum > 1 needs a model without RNG state (dropout): it is not carried")

            def micro_step(carry: tuple, micro: tuple) -> tuple[tuple, None]:
                loss_sum, grad_sum = carry
                loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(model_def, p, rest), *micro))(params)
                return (loss_sum + loss, jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)), None

            # The sum is kept in float32 whatever the parameters' dtype: bf16 would round each micro-batch's
            # gradient into a growing sum (2^-8 relative spacing); the mean is cast back for the optimizer.
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, accumulation_dtype(p.dtype)), params)
            (loss_sum, grad_sum), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), batch)
            loss = loss_sum / grad_accum
            grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grad_sum, params)
        optimizer.update(model, grads)
        return keep_layout(nnx.state((model, optimizer)), layout), loss

    return _jit(step)


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype gradients are summed in over micro-batches: float32 for narrower floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4 else dtype


class Layout(NamedTuple):
    """Where each leaf of a state lives (static: hashable), for a step to return it there."""

    treedef: Any
    shardings: tuple[jax.sharding.NamedSharding, ...]


def layout_of(state: Any) -> Layout | None:
    """The :class:`Layout` of a state whose every leaf is an array with a ``NamedSharding``, else None.

    Each spec is written without its trailing Nones (``P(None, None)`` and ``P()`` place an array
    alike, and the step returns the latter): equal layouts, one compilation.
    """
    leaves, treedef = jax.tree.flatten(state)
    shardings = tuple(getattr(x, "sharding", None) for x in leaves)
    if not leaves or not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings):
        return None
    return Layout(treedef, tuple(_canonical(s) for s in shardings))


def _canonical(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    spec = jax.sharding.PartitionSpec(*spec)
    return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def keep_layout(state: Any, layout: Layout | None) -> Any:
    """``state`` (inside the step) constrained to ``layout``: the step's output state is sharded as
    its input was. Else the compiler chooses the output's shardings (on a mesh with automatic
    axes it may shard a norm's scale that the rules replicate), the donated buffers cannot be
    reused, and the next step, handed the new shardings, compiles again."""
    if layout is None:
        return state
    return jax.lax.with_sharding_constraint(state, jax.tree.unflatten(layout.treedef, layout.shardings))


def _jit(step: Callable) -> Any:
    return jax.jit(step, static_argnums=0, static_argnames="layout", donate_argnums=1)


def run_step(step: Any, model: nnx.Module, optimizer: nnx.Optimizer, *batch: jax.Array) -> jax.Array:
    """Runs ``step`` (from :func:`make_train_step`) on ``model`` and ``optimizer`` in place; returns the
    loss. A state on a mesh comes back in its own shardings (:func:`keep_layout`), so the step
    compiles once."""
    graphdef, state = nnx.split((model, optimizer))
    state, loss = step(graphdef, state, *batch, layout=layout_of(state))
    nnx.update((model, optimizer), state)
    return loss


class Stage(NamedTuple):
    """One stage of a model split for per-layer updates.

    Attributes:
      modules: the NNX modules this stage owns, in a dict keyed by their paths in the model (e.g.
        ``{"layers": blocks}``), so the optimizer's path rules see the same paths as for the
        whole model.
      apply: ``apply(modules, x, *batch)``: the stage's output from the previous stage's ``x``
        (None for the first stage); the last stage returns the scalar loss.
      layers: None, or the number of layers of a scanned stage: every variable of ``modules``
        then holds that many layers along its leading axis, and ``apply`` runs one layer (it gets
        ``modules`` holding that layer's slice), the layers one after another.
    """

    modules: dict
    apply: Callable[..., Any]
    layers: int | None = None


class LayerwiseOptimizer(nnx.Pytree):
    """One ``nnx.Optimizer`` per stage of ``stages(model)``, for :func:`make_layerwise_train_step`.

    Every stage's optimizer takes one step per train step, so an optimizer whose update is per
    leaf (AdamW, GaLore, Fira) gives the same parameters as one ``nnx.Optimizer`` for the whole
    model, except where it numbers the leaves (``stagger``); random draws are keyed by each matrix's
    path and index in its stack, so APOLLO and the randomized refreshes match too.
    """

    def __init__(
        self, model: nnx.Module, tx: optax.GradientTransformation, stages: Callable[[Any], list[Stage]],
        wrt: Any = nnx.Param,
    ) -> None:  # fmt: skip
        parts = stages(model)
        _check_partition(model, parts, wrt)
        # A stage alone may rightly select no leaf (the embedding's); what fira_jax says about the
        # selection is said once, for the whole model, as the ordinary step's optimizer would.
        library = logging.getLogger("fira_jax")
        level = library.level
        library.setLevel(logging.ERROR)
        try:
            self.parts = nnx.List([nnx.Optimizer(part.modules, tx, wrt=wrt) for part in parts])
        finally:
            library.setLevel(level)
        jax.eval_shape(tx.init, nnx.state(model, wrt))  # shapes only: nothing is allocated


def _check_partition(model: nnx.Module, parts: list[Stage], wrt: Any) -> None:
    """Every trainable variable of ``model`` in exactly one stage, else a ValueError naming one."""
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        for path, leaf in nnx.to_flat_state(nnx.state(part.modules, wrt)):
            if id(leaf) in owner:
                raise ValueError(f"stage {k} and stage {owner[id(leaf)]} both own {'/'.join(map(str, path))}")
            owner[id(leaf)] = k
    for path, leaf in nnx.to_flat_state(nnx.state(model, wrt)):
        if id(leaf) not in owner:
            raise ValueError(f"no stage owns {'/'.join(map(str, path))}: it would never be trained")


def make_layerwise_train_step(stages: Callable[[Any], list[Stage]], wrt: Any = nnx.Param) -> Any:
    """The jitted train step with per-layer updates: ``(graphdef, state, *batch) -> (state, loss)``.

    ``graphdef, state = nnx.split((model, optimizer))`` with ``optimizer`` a
    :class:`LayerwiseOptimizer` built with the same ``stages``. The forward pass runs the stages
    in order (``jax.vjp`` of each keeps what its backward needs, as ordinary backpropagation
    does); the backward pass runs them in reverse, and applies each stage's update as soon as
    its gradient is computed. Two ``optimization_barrier`` s fix that order for the compiler: the
    update reads the stage's parameters only once its gradient exists, and the previous stage's
    backward waits for the update.

    A scanned stage (``Stage.layers``) runs forward as a ``jax.lax.scan`` that keeps only each
    layer's input, and backward as a reverse scan: each iteration recomputes its layer's
    ``jax.vjp`` at the saved input, and applies that layer's slice of the update (the stage
    optimizer's state sliced along the layer axis; the state that is not per layer, such as the
    step count, is read by every layer and advanced once). So no step holds more than one layer's
    gradients, and the backward pass costs one more forward of the layers (as ``remat="block"``).

    Args:
      stages: a function from the model to its :class:`Stage` s (e.g. ``lm.model.stages``).
      wrt: the NNX filter of the trainable variables.

    Returns:
      A ``jax.jit`` function (``graphdef`` static, ``state`` donated), like :func:`make_train_step`'s.
    """

    def step(graphdef: nnx.GraphDef, state: nnx.State, *batch: jax.Array,
             layout: Layout | None = None) -> tuple[nnx.State, jax.Array]:  # fmt: skip
        model, optimizer = nnx.merge(graphdef, state)
        parts = stages(model)
        if len(parts) != len(optimizer.parts):
            raise ValueError(f"the model has {len(parts)} stages, its LayerwiseOptimizer {len(optimizer.parts)}")
        x, backward = None, []
        for k, part in enumerate(parts):
            module_def, params, rest = nnx.split(part.modules, wrt, ...)

            def run(p: Any, x: Any, rest: Any, module_def: Any = module_def, part: Stage = part, k: int = k) -> Any:
                modules = nnx.merge(module_def, p, rest, copy=True)
                y = part.apply(modules, x, *batch)
                _check_unchanged(rest, nnx.state(modules, nnx.Not(wrt)), k)
                return y

            if part.layers is not None:
                if x is None:
                    raise ValueError(f"stage {k} is scanned, but scanned stages need an input: not the first stage")
                # Forward, one layer after another; each layer's input is kept for its backward.
                x, inputs = jax.lax.scan(lambda x, layer, run=run: (run(layer[0], x, layer[1]), x), x, (params, rest))
                backward.append((run, inputs, rest))
            elif x is None:
                x, vjp = jax.vjp(lambda p, run=run, rest=rest: run(p, None, rest), params)
                backward.append(vjp)
            else:
                x, vjp = jax.vjp(lambda p, x, run=run, rest=rest: run(p, x, rest), params, x)
                backward.append(vjp)
        loss = x
        cotangent = jnp.ones_like(loss)
        for part, opt, saved in reversed(list(zip(parts, optimizer.parts, backward, strict=True))):
            if part.layers is not None:
                cotangent = _scanned_backward(part, opt, *saved, cotangent, wrt)
                continue
            grads, *rest_ct = saved(cotangent)
            # The update reads the parameters only once this stage's gradient exists: else the
            # compiler may keep each weight's copy prepared for the forward pass until its update.
            grads, params = jax.lax.optimization_barrier((grads, nnx.state(part.modules, wrt)))
            nnx.update(part.modules, params)
            opt.update(part.modules, grads)
            # The previous stage's backward waits for this stage's update: else the compiler may
            # postpone the updates, keeping every stage's gradients alive after all.
            done = (nnx.state(part.modules, wrt), nnx.state(opt))
            cotangent, _ = jax.lax.optimization_barrier((rest_ct[0] if rest_ct else None, done))
        return keep_layout(nnx.state((model, optimizer)), layout), loss

    return _jit(step)


def layer_axes(tx: optax.GradientTransformation, params: Any, opt_state: Any, layers: int) -> list[bool]:
    """Which leaves of ``opt_state`` (``tx``'s state for the stacked ``params``) are per layer.

    A leaf shaped ``(layers, *s)`` where ``tx``'s state for one layer's slice of ``params`` has
    ``s`` is per layer (sliced for that layer's update); one shaped alike in both is shared (the
    step count), read by every layer. Raises a ValueError naming a leaf that is neither.
    """
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    single, single_def = jax.tree.flatten(jax.eval_shape(tx.init, one))
    stacked, stacked_def = jax.tree_util.tree_flatten_with_path(opt_state)
    if single_def != stacked_def:
        raise ValueError(f"the optimizer's state for one layer is not structured as for the stack of {layers}")
    out = []
    for (path, a), b in zip(stacked, single, strict=True):
        if tuple(a.shape) == (layers, *b.shape):
            out.append(True)
        elif tuple(a.shape) == tuple(b.shape):
            out.append(False)
        else:
            raise ValueError(
                f"optimizer state {jax.tree_util.keystr(path)} has shape {tuple(a.shape)}: neither per layer "
                f"({layers}, *{tuple(b.shape)}) nor shared {tuple(b.shape)}"
            )
    return out


def _scanned_backward(
    part: Stage, opt: nnx.Optimizer, run: Callable, inputs: jax.Array, rest: nnx.State, cotangent: jax.Array,
    wrt: Any,
) -> jax.Array:  # fmt: skip
    """The backward pass of a scanned stage, last layer first, each layer updated as soon as its
    gradient exists; returns the cotangent of the stage's input."""
    params = _as_pure(nnx.state(part.modules, wrt))
    opt_state = _as_pure(opt.opt_state)
    per_layer = layer_axes(opt.tx, params, opt_state, part.layers)
    leaves, treedef = jax.tree.flatten(opt_state)
    shared = [None if p else a for a, p in zip(leaves, per_layer, strict=True)]
    stacks = [a if p else None for a, p in zip(leaves, per_layer, strict=True)]

    def layer_state(stacks: list, i: jax.Array) -> Any:
        return treedef.unflatten([s[i] if p else a for s, a, p in zip(stacks, shared, per_layer, strict=True)])

    def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        ct, params, stacks, _ = carry
        i, x, rest_i = xs
        p = jax.tree.map(lambda a: a[i], params)
        _, vjp = jax.vjp(lambda p, x: run(p, x, rest_i), p, x)
        grads, ct = vjp(ct)
        updates, new_state = opt.tx.update(grads, layer_state(stacks, i), p)
        params = jax.tree.map(lambda a, v: a.at[i].set(v), params, optax.apply_updates(p, updates))
        new = treedef.flatten_up_to(new_state)
        stacks = [s.at[i].set(v) if p else None for s, v, p in zip(stacks, new, per_layer, strict=True)]
        return (ct, params, stacks, [None if p else v for v, p in zip(new, per_layer, strict=True)]), None

    steps = jnp.arange(part.layers)
    carry = (cotangent, params, stacks, shared)
    (cotangent, params, stacks, new_shared), _ = jax.lax.scan(body, carry, (steps, inputs, rest), reverse=True)
    nnx.update(part.modules, params)
    state = [s if p else a for s, a, p in zip(stacks, new_shared, per_layer, strict=True)]
    nnx.update(opt.opt_state, nnx.state(treedef.unflatten(state)))
    opt.step[...] += 1
    return cotangent


def _check_unchanged(before: nnx.State, after: nnx.State, k: int) -> None:
    """Per-layer updates do not carry a stage's non-trainable state out of its ``jax.vjp``: refuse a change."""
    old = dict(nnx.to_flat_state(before))
    for path, var in nnx.to_flat_state(after):
        if path not in old or var.get_value() is not old[path].get_value():
            raise ValueError(
                f"stage {k} changes {'/'.join(map(str, path))} (not trainable: RNG or statistics), which per-layer "
                "updates cannot carry; use make_train_step"
            )
