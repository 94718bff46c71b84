"""The train step: the one jitted function that pre-training and fine-tuning run, and that
``memory_report.py`` compiles to measure the peak.

:func:`make_train_step` returns a pure function of ``(graphdef, state, *batch)``, where
``graphdef, state = nnx.split((model, optimizer))``: the whole state (parameters, optimizer state,
RNG counters, anything else the model holds) goes in and comes back, and it is donated, so the
compiled step updates it in place. :func:`run_step` is the eager-side glue: split, step, update.

With ``grad_accum == 1`` the step is a plain ``value_and_grad`` and update: no accumulator, so no
full-size gradient has to outlive its use, and XLA may apply each leaf's update as soon as its
gradient exists. With ``grad_accum > 1`` each batch array carries a leading axis of micro-batches;
a ``lax.scan`` sums their gradients into one accumulator (one more gradient-sized buffer).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


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

    def step(graphdef: nnx.GraphDef, state: nnx.State, *batch: jax.Array) -> tuple[nnx.State, jax.Array]:
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
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, grad_sum), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), batch)
            loss = loss_sum / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(step, static_argnums=0, donate_argnums=1)


def run_step(step: Any, model: nnx.Module, optimizer: nnx.Optimizer, *batch: jax.Array) -> jax.Array:
    """Runs ``step`` (from :func:`make_train_step`) on ``model`` and ``optimizer`` in place; returns the loss."""
    graphdef, state = nnx.split((model, optimizer))
    state, loss = step(graphdef, state, *batch)
    nnx.update((model, optimizer), state)
    return loss
