"""Fira's update on 1 device vs parameters sharded FSDP-style over 8 simulated CPU devices.

The 8 devices are simulated (``--xla_force_host_platform_device_count=8``) on this machine's
cores, so this measures the overhead of the sharded program, not a speedup; on real
accelerators each device holds 1/8 of the state and does 1/8 of the products.

  python benchmarks/bench_sharded.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import statistics
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fira_jax


def median_ms(update, grads, state, params, repeats=15):
    jax.block_until_ready(update(grads, state, params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(update(grads, state, params))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    h, i, r = 512, 1376, 128
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    key = jax.random.key(0)
    params, grads = {}, {}
    for name, s in shapes.items():
        key, a, b = jax.random.split(key, 3)
        params[name] = 0.02 * jax.random.normal(a, s)
        grads[name] = jax.random.normal(b, s)
    tx = fira_jax.fira(1e-2, rank=r, update_proj_gap=200)
    n = jax.device_count()
    print(f"JAX {jax.__version__}: {n} {jax.devices()[0].platform} devices; one LLaMA-60M layer, rank {r}")
    update = jax.jit(tx.update)
    state = tx.init(params)
    _, state1 = update(grads, state, params)
    one = median_ms(update, grads, state1, params)
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = {k: NamedSharding(mesh, P("fsdp")) for k in shapes}
    ps, gs = jax.device_put(params, shard), jax.device_put(grads, shard)
    state = tx.init(ps)
    _, state8 = update(gs, state, ps)
    many = median_ms(update, gs, state8, ps)
    print(f"{'devices':>8} {'update ms':>10}")
    print(f"{1:>8} {one:10.2f}")
    print(f"{n:>8} {many:10.2f}   ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
