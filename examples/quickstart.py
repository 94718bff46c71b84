"""Quick start: Fira vs AdamW on a small least-squares problem, in a few seconds on a CPU.

Run: python examples/quickstart.py
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import fira_jax


def make_problem(key: jax.Array) -> tuple[dict, Callable]:
    """A two-layer linear regression: the gradient depends on the weights."""
    kx, kw, k1, k2 = jax.random.split(key, 4)
    x = jax.random.normal(kx, (256, 64))
    y = x @ jax.random.normal(kw, (64, 32)) / 8.0
    params = {
        "mlp": {"w1": 0.1 * jax.random.normal(k1, (64, 128)), "w2": 0.1 * jax.random.normal(k2, (128, 32))},
        "bias": jnp.zeros(32),
    }

    def loss_fn(p: dict) -> jax.Array:
        pred = x @ p["mlp"]["w1"] @ p["mlp"]["w2"] + p["bias"]
        return jnp.mean((pred - y) ** 2)

    return params, loss_fn


def train(tx: optax.GradientTransformation, steps: int = 300) -> tuple[float, int]:
    params, loss_fn = make_problem(jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def step(params: dict, state: optax.OptState) -> tuple[dict, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, _loss = step(params, state)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return float(loss_fn(params)), state_bytes


if __name__ == "__main__":
    optimizers = {
        "adamw": optax.adamw(1e-2, eps=1e-6),
        "galore": fira_jax.galore(1e-2, rank=8, update_proj_gap=50, mask=fira_jax.mask_by_path("mlp")),
        "fira": fira_jax.fira(1e-2, rank=8, update_proj_gap=50, mask=fira_jax.mask_by_path("mlp")),
    }
    print(f"{'optimizer':>9} {'final loss':>11} {'state bytes':>12}")
    for name, tx in optimizers.items():
        loss, nbytes = train(tx)
        print(f"{name:>9} {loss:11.3e} {nbytes:12,d}")
