"""A 5,000-step Fira run on a small noisy regression: stays finite, limiter norm positive and bounded.

Not a timed test: it prints, every 500 steps, the loss, the limiter's recorded residual norms
(min / max over the matrices) and whether every update and state leaf is finite, then a verdict.

Run: python benchmarks/long_run.py [--steps 5000]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_jax


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    key = jax.random.key(args.seed)
    kx, ky, k1, k2, k3 = jax.random.split(key, 5)
    x = jax.random.normal(kx, (512, 48))
    y = jnp.tanh(x @ jax.random.normal(ky, (48, 24)))
    params = {
        "mlp": {"w1": 0.2 * jax.random.normal(k1, (48, 96)), "w2": 0.2 * jax.random.normal(k2, (96, 24))},
        "stack": 0.2 * jax.random.normal(k3, (3, 24, 24)),
        "bias": jnp.zeros(24),
    }

    def loss_fn(p: dict, idx: jax.Array) -> jax.Array:
        h = jnp.tanh(x[idx] @ p["mlp"]["w1"]) @ p["mlp"]["w2"]
        for i in range(3):
            h = h + jnp.tanh(h @ p["stack"][i])
        return jnp.mean((h + p["bias"] - y[idx]) ** 2)

    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 250, args.steps, end_value=1e-3)
    tx = fira_jax.fira(sched, rank=8, update_proj_gap=200, weight_decay=0.01)
    state = tx.init(params)

    @jax.jit
    def step(params: dict, state: tuple, t: jax.Array) -> tuple:
        idx = jax.random.randint(jax.random.fold_in(key, t), (64,), 0, 512)  # noisy minibatches
        loss, grads = jax.value_and_grad(loss_fn)(params, idx)
        updates, state = tx.update(grads, state, params)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves((updates, state))]))
        return optax.apply_updates(params, updates), state, loss, finite

    all_finite, lo, hi = True, np.inf, 0.0
    print(f"{'step':>6} {'loss':>10} {'limiter min':>12} {'limiter max':>12} finite")
    for t in range(args.steps):
        params, state, loss, finite = step(params, state, jnp.asarray(t))
        norms = np.concatenate([np.ravel(n) for n in jax.tree.leaves(state[0].norms)])
        all_finite &= bool(finite)
        if t > 0:
            lo, hi = min(lo, norms.min()), max(hi, norms.max())
        if (t + 1) % 500 == 0:
            print(f"{t + 1:6d} {float(loss):10.4e} {norms.min():12.4e} {norms.max():12.4e} {bool(finite)}")
    ok = all_finite and lo > 0 and np.isfinite(hi)
    print(f"all finite: {all_finite}; limiter norm over steps 1..{args.steps - 1}: min {lo:.3e}, max {hi:.3e}")
    print("OK" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
