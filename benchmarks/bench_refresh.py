"""The cost of a projection refresh: exact SVD vs the cheaper methods, and staggered refreshes.

Part 1 (``--part svd``): for 512x1376 (LLaMA 60M's MLP), 2048x5461 (1B) and 4096x11008 (7B),
at each shape's rank or at each of ``--ranks``, times the exact SVD, ``svd="randomized"``,
``svd="gram"`` and ``svd="subspace"`` (one warm-started iteration; jitted, median of
``--repeats``) and reports the captured energy ||P^T G||^2 / ||G||^2 of the bases on two kinds
of matrices:

* gradients from the example LM: a one-layer model of ``examples/lm/model.py`` with that
  hidden/intermediate size, two Adam steps on 1,024 tokens of the built-in corpus, then the
  gradient of its MLP up-projection (hidden x intermediate);
* Gaussian random matrices (a flat spectrum: the worst case for a range finder).

The subspace iteration starts from the previous refresh's basis: for the LM gradient, the exact
basis of the gradient one Adam step earlier; for the Gaussian matrix, that of another Gaussian
matrix (no information: the worst case). With ``--json PATH`` the table is also written as JSON
with its command, commit, versions and machine.

Part 2 (``--part stagger``): max / median step time of ``fira`` on the LLaMA-60M tree (8 layers),
with and without ``stagger=True``, over ``2 * gap`` steps after the first.

  python benchmarks/bench_refresh.py --part svd stagger
  python benchmarks/bench_refresh.py --part svd --shapes 4096x11008 --ranks 1024 64 --repeats 1 \
      --json results/refresh_7b.json
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fira_jax
from fira_jax.projections import gram_top_vectors as _gram_top_vectors
from fira_jax.projections import randomized_svd as _randomized_svd
from fira_jax.projections import subspace_iteration as _subspace_iteration

SHAPES = {"512x1376": (512, 1376, 128), "2048x5461": (2048, 5461, 256), "4096x11008": (4096, 11008, 512)}


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lm_gradient(hidden: int, inter: int, steps: int = 2) -> list[np.ndarray]:
    """Gradients of the MLP up-projection of a one-layer example LM at each of a few Adam steps."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    from flax import nnx
    from lm import data as data_lib
    from lm import model as model_lib
    from lm import prepare as prepare_lib

    cfg = model_lib.ModelConfig(hidden=hidden, intermediate=inter, heads=max(1, hidden // 128), layers=1)
    model = model_lib.LLaMA(cfg, rngs=nnx.Rngs(0))
    tokens = np.asarray(prepare_lib.load(None).train[:2_000_000])
    batches = data_lib.Batches(tokens, 8, 128, seed=0)  # 1,024 tokens: gradients of rank up to 1,024
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        grads = nnx.grad(model_lib.loss_fn)(model, batch)
        opt.update(model, grads)
        return grads

    # The up-projection (hidden x inter): its gradient sum_t x_t (delta_t * silu(gate_t))^T is not
    # limited by the 256-byte vocabulary, unlike the down-projection's (rank <= ~256 there).
    return [np.asarray(step(model, opt, jnp.asarray(batches(t)))["layers"]["mlp"]["up"]["kernel"][0])
            for t in range(steps)]  # fmt: skip


def energy(g: jax.Array, u: jax.Array) -> float:
    return float(jnp.sum((u.T @ g) ** 2) / jnp.sum(g**2))


def part_svd(args: argparse.Namespace) -> list[dict]:
    exact = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False)[0])
    print(f"{'shape':>11} {'rank':>5} {'exact s':>9} {'random s':>9} {'gram s':>8} {'subsp s':>8} {'speedup':>8} "
          f"{'matrix':>9} {'E exact':>8} {'E random':>9} {'E gram':>9} {'E subsp':>9}")  # fmt: skip
    rows = []
    for name in args.shapes:
        m, n, default_rank = SHAPES[name]
        gauss = jax.random.normal(jax.random.key(1), (m, n))
        mats = {"gaussian": (jax.random.normal(jax.random.key(2), (m, n)), gauss)}  # (previous, this one)
        if not args.no_lm:
            mats["LM grad"] = tuple(jnp.asarray(g) for g in lm_gradient(m, n))
        # The exact left singular vectors of each matrix, computed once for every rank.
        exact_u = {label: (exact(prev), exact(g)) for label, (prev, g) in mats.items()}
        for r in args.ranks or [default_rank]:
            key = jax.random.key(0)
            # both=False: the one-sided refresh's path (a fira / galore refresh of a left or right basis)
            rand = jax.jit(lambda g, key, r=r: _randomized_svd(g, r, "left", key, args.oversample, args.power_iters,
                                                               both=False)[0])  # fmt: skip
            gram = jax.jit(lambda g, r=r: _gram_top_vectors(g, r, "left")[0])
            sub = jax.jit(lambda g, prev, key, r=r: _subspace_iteration(g, prev, r, "left", key, args.oversample, 1,
                                                                        both=False)[0])  # fmt: skip
            start = exact_u["gaussian"][0][:, :r]  # timing does not depend on the start
            t_exact = timed(exact, gauss, repeats=args.repeats)
            t_rand = timed(rand, gauss, key, repeats=args.repeats)
            t_gram = timed(gram, gauss, repeats=args.repeats)
            t_sub = timed(sub, gauss, start, key, repeats=args.repeats)
            for label, (_, g) in mats.items():
                u_prev, u_g = exact_u[label]
                e = {"exact": energy(g, u_g[:, :r]), "randomized": energy(g, rand(g, key)),
                     "gram": energy(g, gram(g)), "subspace": energy(g, sub(g, u_prev[:, :r], key))}  # fmt: skip
                rows.append({"shape": name, "rank": r, "matrix": label,
                             "seconds": {"exact": t_exact, "randomized": t_rand, "gram": t_gram, "subspace": t_sub},
                             "energy": e})  # fmt: skip
                times = f"{t_exact:9.3f} {t_rand:9.3f} {t_gram:8.3f} {t_sub:8.3f} {t_exact / t_sub:7.1f}x"
                energies = " ".join(f"{e[k]:9.6f}" for k in ("exact", "randomized", "gram", "subspace"))
                print(f"{name:>11} {r:5d} {times} {label:>9} {energies}", flush=True)
    return rows


def render(record: dict) -> str:
    """results/refresh_7b.md from its JSON (``--json``): seconds per refresh and captured energy."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    from lm import provenance

    prov = record["provenance"]
    methods = ("exact", "randomized", "gram", "subspace")
    lines = [
        "# The refresh's cost: exact SVD vs randomized, Gram and subspace iteration",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}.",
        "",
        f"One jitted refresh of one matrix (float32, left basis), median of the timed calls; oversampling "
        f"{record['oversample']}, power iterations: randomized {record['power_iters']['randomized']}, subspace "
        f"{record['power_iters']['subspace']} (warm-started from the previous basis). Energy: ||P^T G||² / ||G||² "
        "of the basis; the subspace iteration starts from the exact basis of the LM gradient one Adam step "
        "earlier, or of another Gaussian matrix (no information).",
        "",
        "| shape | rank | matrix | "
        + " | ".join(f"{m} s" for m in methods)
        + " | exact / subspace | "
        + " | ".join(f"energy {m}" for m in methods)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(methods) + 1),
    ]
    for row in record["rows"]:
        t, e = row["seconds"], row["energy"]
        seconds = " | ".join(f"{t[m]:.3f}" for m in methods)
        energies = " | ".join(f"{e[m]:.6f}" for m in methods)
        speedup = t["exact"] / t["subspace"]
        lines.append(f"| {row['shape']} | {row['rank']} | {row['matrix']} | {seconds} | {speedup:.1f}× | {energies} |")
    return "\n".join(lines) + "\n"


def part_stagger(args: argparse.Namespace) -> None:
    h, i, r = 512, 1376, 128
    per_layer = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    key = jax.random.key(0)
    params = {}
    for layer in range(8):
        for k, s in per_layer.items():
            key, sub = jax.random.split(key)
            params[f"{layer}/{k}"] = 0.02 * jax.random.normal(sub, s)
    grads = jax.tree.map(lambda p: p * 3.0 + 1e-3, params)
    print(f"LLaMA-60M tree: {len(params)} matrices, rank {r}, update_proj_gap {args.gap}")
    print(f"{'stagger':>8} {'median ms':>10} {'max ms':>9} {'max/median':>11}")
    for stagger in (False, True):
        tx = fira_jax.fira(1e-2, rank=r, update_proj_gap=args.gap, stagger=stagger)
        update = jax.jit(tx.update)
        state = tx.init(params)
        _, state = jax.block_until_ready(update(grads, state, params))  # t = 0: compile + every SVD
        times = []
        for _ in range(2 * args.gap):
            t0 = time.perf_counter()
            _, state = jax.block_until_ready(update(grads, state, params))
            times.append(time.perf_counter() - t0)
        med, mx = statistics.median(times), max(times)
        print(f"{stagger!s:>8} {1e3 * med:10.1f} {1e3 * mx:9.1f} {mx / med:10.1f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["svd", "stagger"], choices=["svd", "stagger"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="ranks to time (default: each shape's own)")
    p.add_argument("--json", default=None, help="also write the svd part's table here, with provenance")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--gap", type=int, default=20)
    p.add_argument("--no-lm", action="store_true", help="skip the LM gradients (Gaussian only)")
    args = p.parse_args()
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    if "svd" in args.part:
        rows = part_svd(args)
        if args.json:
            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
            from lm import provenance

            record = {"provenance": provenance.record(sys.argv[1:], __file__), "oversample": args.oversample,
                      "power_iters": {"randomized": args.power_iters, "subspace": 1}, "rows": rows}  # fmt: skip
            pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
            pathlib.Path(args.json).with_suffix(".md").write_text(render(record))
    if "stagger" in args.part:
        part_stagger(args)


if __name__ == "__main__":
    main()
