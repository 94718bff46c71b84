"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set there).

Checks, for FSDP (1-D) and FSDP x tensor (2-D) meshes, automatic and explicit sharding, jax.jit
and nnx.Optimizer, ranks that do and do not divide the mesh axes: the updates equal the
single-device ones, and the state is sharded sensibly (no m x n buffer, moments not replicated).
Prints one line per case and exits non-zero on the first failure.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fira_jax

assert jax.device_count() == 8, jax.devices()
SHAPES = {"w": (64, 48), "v": (48, 64), "stack": (4, 16, 24), "b": (48,)}
STEPS = 4  # refreshes at t = 0 and 2


def specs(layout):
    if layout == "fsdp":
        return {"w": P("fsdp"), "v": P(None, "fsdp"), "stack": P(None, "fsdp"), "b": P()}
    return {"w": P("fsdp", "tensor"), "v": P("tensor", "fsdp"), "stack": P("fsdp", None, "tensor"), "b": P()}


def problem():
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(u)
    return outs, state


def rel_err(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y)) for x, y in pairs)


def check_state(state, layout):
    """No m x n array, and each selected leaf's moments carry a mesh axis."""
    adam = state[0].inner
    for k in ("w", "v", "stack"):
        mu = adam.mu[k]
        assert mu.shape != SHAPES[k], (k, mu.shape)
        assert any(a is not None for a in mu.sharding.spec), (k, mu.sharding.spec, "moments fully replicated")
    for leaf in jax.tree.leaves(state):
        assert leaf.size < 48 * 64 or leaf.ndim == 1, leaf.shape


def main():
    params, grads = problem()
    failures = 0
    for kind in ("fira", "galore"):
        for rank in (6, 8) if kind == "fira" else (6,):  # 6 divides no mesh axis, 8 every one; GaLore shares the code
            factory = fira_jax.fira if kind == "fira" else fira_jax.galore
            tx = factory(1e-2, rank=rank, update_proj_gap=2, weight_decay=0.1, axes=fira_jax.MatrixAxes())
            reference, _ = run(tx, params, grads)
            for layout, shape in (("fsdp", (8,)), ("2d", (4, 2))):
                names = ("fsdp",) if layout == "fsdp" else ("fsdp", "tensor")
                for mode in ("auto", "explicit"):
                    axis_type = jax.sharding.AxisType.Explicit if mode == "explicit" else jax.sharding.AxisType.Auto
                    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
                    shard = {k: NamedSharding(mesh, s) for k, s in specs(layout).items()}
                    with jax.set_mesh(mesh):
                        outs, state = run(tx, jax.device_put(params, shard), [jax.device_put(g, shard) for g in grads])
                        err = max(rel_err(o, r) for o, r in zip(outs, reference, strict=True))
                        try:
                            assert err <= 1e-5, f"relative error {err:.2e}"
                            check_state(state, layout)
                            status = "ok"
                        except AssertionError as e:
                            status, failures = f"FAILED: {e}", failures + 1
                    print(f"{kind} rank {rank} {layout} {mode}: max rel err {err:.1e} {status}", flush=True)
    failures += check_nnx(params, grads)
    failures += check_no_mesh_context()
    failures += check_spread()
    return failures


def decaying_stack(rng, shape):
    """A stack of matrices with singular values 0.8^k: distinct at the rank cutoff, as gradients' are."""
    b, m, n = shape
    u = np.linalg.qr(rng.standard_normal((b, m, n)))[0]
    v = np.linalg.qr(rng.standard_normal((b, n, n)))[0]
    return jnp.asarray(np.einsum("bmk,k,bnk->bmn", u, 0.8 ** np.arange(n), v), jnp.float32)


def check_spread():
    """The distributed refresh: a 16-matrix stack sharded over its rows (FSDP) on 8 devices. With the
    mesh set (Refresh(spread=True), the default), each device's compiled program runs the
    decomposition loop 16 / 8 = 2 times (16 without spreading) and the update equals one device's."""
    rng = np.random.default_rng(2)
    params, grads = decaying_stack(rng, (16, 64, 48)), decaying_stack(rng, (16, 64, 48))
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P(None, "fsdp"))
    failures = 0
    for method in ("exact", "gram", "subspace"):
        for spread in (True, False):
            refresh = fira_jax.Refresh(update_proj_gap=2, method=method, spread=spread)
            tx = fira_jax.scale_by_fira(8, refresh=refresh, axes=fira_jax.MatrixAxes())
            one = jax.jit(tx.update)({"s": grads}, tx.init({"s": params}), {"s": params})
            p, g = {"s": jax.device_put(params, shard)}, {"s": jax.device_put(grads, shard)}
            with jax.set_mesh(mesh):
                update = jax.jit(tx.update)
                text = update.lower(g, tx.init(p), p).compile().as_text()
                out = update(g, tx.init(p), p)
            loops = sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text))
            per_device = 2 if spread else 16  # the loop over the stack's matrices
            err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(one), strict=True))
            ok = per_device in loops and not any(n in loops for n in (4, 8, 16) if n != per_device) and err <= 1e-5
            failures += 0 if ok else 1
            print(f"spread={spread} {method}: decomposition loops per device {loops}, max rel err vs one device "
                  f"{err:.1e} {'ok' if ok else 'FAILED'}", flush=True)  # fmt: skip
    return failures + check_spread_mixed_shapes(rng, mesh)


def check_spread_mixed_shapes(rng, mesh):
    """Refreshed by shape with the Gram method, a (16, 64, 48) and a (16, 48, 64) stack share one
    site (basis vectors of length 48); spread, each shape is stacked and spread on its own: 2
    matrices per device for each, and the update equals one device's."""

    def pair():
        return {"s": decaying_stack(rng, (16, 64, 48)), "t": jnp.swapaxes(decaying_stack(rng, (16, 64, 48)), 1, 2)}

    params, grads = pair(), pair()
    refresh = fira_jax.Refresh(update_proj_gap=2, method="gram", by_shape=True)
    tx = fira_jax.scale_by_fira(8, refresh=refresh, axes=fira_jax.MatrixAxes())
    one = jax.jit(tx.update)(grads, tx.init(params), params)
    shard = NamedSharding(mesh, P(None, "fsdp"))
    p, g = jax.device_put(params, shard), jax.device_put(grads, shard)
    with jax.set_mesh(mesh):
        update = jax.jit(tx.update)
        text = update.lower(g, tx.init(p), p).compile().as_text()
        out = update(g, tx.init(p), p)
    loops = sorted(int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text))
    err = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(one), strict=True))
    ok = loops.count(2) == 2 and not any(n in loops for n in (4, 8, 16, 32)) and err <= 1e-5
    print(f"spread, two shapes in one site (gram, by shape): decomposition loops per device {loops}, max rel "
          f"err vs one device {err:.1e} {'ok' if ok else 'FAILED'}", flush=True)  # fmt: skip
    return 0 if ok else 1


def check_no_mesh_context():
    """No `jax.set_mesh`: the default `jax.make_mesh` (Explicit axes in JAX 0.10) and Auto axes.

    init + 6 jitted updates crossing 2 refreshes after the first (gap 2), equal to single-device.
    """
    rng = np.random.default_rng(1)
    shapes = {"w": (64, 48), "v": (48, 64), "b": (48,)}
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(6)]
    failures = 0
    for kind, factory in (("fira", fira_jax.fira), ("galore", fira_jax.galore)):
        tx = factory(1e-2, rank=6, update_proj_gap=2, weight_decay=0.1)
        reference, _ = run(tx, params, grads)
        for mode in ("default", "explicit", "auto"):
            if mode == "default":  # Explicit from JAX 0.9
                mesh = jax.make_mesh((8,), ("fsdp",))
            else:
                axis_type = jax.sharding.AxisType.Explicit if mode == "explicit" else jax.sharding.AxisType.Auto
                mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
            shard = {"w": NamedSharding(mesh, P("fsdp")), "v": NamedSharding(mesh, P(None, "fsdp")),
                     "b": NamedSharding(mesh, P())}  # fmt: skip
            try:
                outs, _ = run(tx, jax.device_put(params, shard), [jax.device_put(g, shard) for g in grads])
                err = max(rel_err(o, r) for o, r in zip(outs, reference, strict=True))
                ok = err <= 1e-5
                status = "ok" if ok else f"FAILED: relative error {err:.2e}"
            except Exception as e:  # report the failure as a line, like the other cases
                ok, err, status = False, float("nan"), f"FAILED: {type(e).__name__}: {e}"
            failures += 0 if ok else 1
            axis_types = tuple(str(t) for t in mesh.axis_types)
            print(f"{kind} no mesh context, make_mesh {mode} {axis_types}: max rel err {err:.1e} {status}", flush=True)
    return failures


def check_nnx(params, grads):
    """nnx.Optimizer over a model whose kernels are sharded on an explicit 2-D mesh."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    class Model(nnx.Module):
        def __init__(self):
            # Zeros: without weight decay the updates do not depend on the weights, and the
            # update read off the weights (after - before) is then exact at the first step.
            self.attn = nnx.Param(jnp.zeros_like(params["w"]), sharding=("fsdp", "tensor"))
            self.mlp = nnx.Param(jnp.zeros_like(params["v"]), sharding=("tensor", "fsdp"))

    tx = fira_jax.fira(1e-2, rank=6, update_proj_gap=2, mask=fira_jax.mask_by_path("attn", "mlp"))
    plain = {"attn": params["w"], "mlp": params["v"]}
    reference, _ = run(tx, plain, [{"attn": g["w"], "mlp": g["v"]} for g in grads])
    with jax.set_mesh(mesh):
        model = Model()
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, g):
            return opt.update(model, g)

        errs = []
        for g, ref in zip(grads, reference, strict=True):
            state = nnx.state(model, nnx.Param)
            gs = jax.tree.map(lambda x, y: jax.device_put(y, x.sharding), nnx.to_pure_dict(state),
                              {"attn": g["w"], "mlp": g["v"]})  # fmt: skip
            nnx.replace_by_pure_dict(state, gs)
            before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            step(model, opt, state)  # the update is read off the parameters (what opt.update returns varies)
            after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            errs.append(rel_err(jax.tree.map(lambda a, b: a - b, after, before), ref))
    err = max(errs)
    ok = err <= 1e-5
    print(f"nnx.Optimizer explicit 2d: max rel err {err:.1e} {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
