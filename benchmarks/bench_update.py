"""Times the optimizer update alone, side by side in one process.

For the attention and MLP shapes of LLaMA 60M / 130M / 350M (q, k, v, o: h x h; gate, up: h x i;
down: i x h; the paper's ranks 128 / 256 / 256), it times a jitted ``update`` (blocked until
ready; median of ``--repeats``), separately for a step that refreshes the projection (SVD) and
one that does not, for:

  fira_jax.fira, fira_jax.galore, fira_jax.apollo, fira_jax.apollo_mini, optax.contrib.galore,
  optax.adamw, and the authors' torch FiraAdamW and APOLLOAdamW when torch, fira and apollo-torch
  are installed.

It prints times, ratios to optax.contrib.galore, to optax.adamw and to torch FiraAdamW, the
optimizer state in MiB, the temporary bytes XLA reports for the compiled update
(``memory_analysis``), the seconds the update took to compile, and the bytes per weight the
compiled update moves outside its refresh (``hlo_bytes.plain_step_bytes``; the JAX rows).

  python benchmarks/bench_update.py                       # 60m, one layer's matrices
  python benchmarks/bench_update.py --preset 130m 350m --layers 1
  python benchmarks/bench_update.py --preset 60m --layers 8 --json results/bench_update_60m_cpu.json
  python benchmarks/bench_update.py --preset 1b --compile-rounds 5 --only fira_jax.fira optax.contrib.galore
"""

import argparse
import importlib
import importlib.util
import json
import pathlib
import statistics
import sys
import time
import types
from collections.abc import Callable

import jax
import numpy as np
import optax
from hlo_bytes import plain_step_bytes
from optax import contrib

import fira_jax

PRESETS = {"60m": (512, 1376, 128), "130m": (768, 2048, 256), "350m": (1024, 2736, 256), "1b": (2048, 5461, 512)}
LR, GAP = 1e-2, 200


def shapes(preset: str, layers: int) -> dict[str, tuple[int, int]]:
    h, i, _ = PRESETS[preset]
    per_layer = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    return {f"layer{n}/{k}": s for n in range(layers) for k, s in per_layer.items()}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_compile(update: Callable, state0: object, params: dict, grads: dict) -> tuple[jax.stages.Compiled, float]:
    """``update`` (a ``jax.jit``) lowered, then compiled: the executable and the compile's seconds."""
    lowered = update.lower(grads, state0, params)
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def bench_jax(tx: optax.GradientTransformation, params: dict, grads: dict) -> dict:
    """Compiles the update; returns the two steps to time and the memory figures."""
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    compiled, compile_s = timed_compile(update, state0, params, grads)  # the first compilation (calls reuse it)
    analysis = compiled.memory_analysis()
    moved = plain_step_bytes(compiled.as_text())
    _, state1 = update(grads, state0, params)  # count 1: not a refresh step (gap 200)
    return {
        "compile_s": compile_s,
        "step": lambda: update(grads, state1, params),
        "refresh": lambda: update(grads, state0, params),
        "state_mib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state1)) / 2**20,
        "temp_mib": analysis.temp_size_in_bytes / 2**20 if analysis else float("nan"),
        "plain_bytes": float("nan") if moved.loops else moved.plain,
    }


def load_torch_reference(package: str, module: str) -> tuple[types.ModuleType, type] | None:
    """torch and the authors' ``package.module.AdamW``, loaded without the package's ``__init__``
    (again and again: the stand-in package this puts in ``sys.modules`` has no spec to find)."""
    if importlib.util.find_spec("torch") is None:
        return None
    if package in sys.modules:
        import torch

        return torch, importlib.import_module(f"{package}.{module}").AdamW
    if importlib.util.find_spec(package) is None:
        return None
    import torch

    try:
        importlib.import_module("transformers.utils.versions")
    except ImportError:  # the reference imports transformers only for a version check
        stub = types.ModuleType("transformers.utils.versions")
        stub.require_version = lambda *a, **k: None
        sys.modules.setdefault("transformers", types.ModuleType("transformers"))
        sys.modules.setdefault("transformers.utils", types.ModuleType("transformers.utils"))
        sys.modules["transformers.utils.versions"] = stub
    spec = importlib.util.find_spec(package)
    pkg = types.ModuleType(package)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault(package, pkg)
    return torch, importlib.import_module(f"{package}.{module}").AdamW


def bench_torch(torch_mod: types.ModuleType, cls: type, params: dict, grads: dict, rank: int, group: dict) -> dict:
    def make(gap: int) -> object:
        tensors = [torch_mod.nn.Parameter(torch_mod.tensor(np.asarray(p))) for p in params.values()]
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = torch_mod.tensor(np.asarray(g))
        return cls(
            [{"params": tensors, "rank": rank, "update_proj_gap": gap, **group}], lr=LR, no_deprecation_warning=True
        )

    opt, opt_refresh = make(10**9), make(1)
    opt.step()  # the first step refreshes; later ones do not
    state = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in [s["exp_avg"], s["exp_avg_sq"], s["projector"].ortho_matrix]
    )
    return {"step": opt.step, "refresh": opt_refresh.step, "state_mib": state / 2**20, "temp_mib": float("nan"),
            "compile_s": float("nan")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["60m"], choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=1, help="layers of matrices in the tree")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best median is kept)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--only", nargs="+", default=None, help="subset of optimizers to run")
    p.add_argument("--compile-rounds", type=int, default=1, metavar="K",
                   help="compile each JAX update K times, interleaved; the compile column is the median")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the figures and their provenance to FILE")
    args = p.parse_args()
    if args.compile_rounds < 1:
        p.error(f"--compile-rounds must be at least 1, got {args.compile_rounds}")
    saved = {}
    references = {} if args.no_torch else {
        "torch FiraAdamW": (load_torch_reference("fira", "fira_adamw"), {"alpha": 0.25, "proj_type": "std"}),
        "torch APOLLOAdamW": (load_torch_reference("apollo_torch", "apollo"),
                              {"scale": 1.0, "proj_type": "std", "scale_type": "channel", "proj": "random"}),
    }  # fmt: skip
    print(
        f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); "
        f"optax {optax.__version__}"
    )
    for preset in args.preset:
        rank = PRESETS[preset][2]
        key = jax.random.key(0)
        params, grads = {}, {}
        for name, s in shapes(preset, args.layers).items():
            key, k1, k2 = jax.random.split(key, 3)
            params[name] = 0.02 * jax.random.normal(k1, s)
            grads[name] = jax.random.normal(k2, s)
        # Factories: a new transformation traces and compiles anew (jax.jit caches per function).
        factories = {
            "fira_jax.fira": lambda r=rank: fira_jax.fira(LR, rank=r, update_proj_gap=GAP),
            "fira_jax.galore": lambda r=rank: fira_jax.galore(LR, rank=r, update_proj_gap=GAP),
            "fira_jax.apollo": lambda r=rank: fira_jax.apollo(LR, rank=r, update_proj_gap=GAP),
            "fira_jax.apollo_mini": lambda: fira_jax.apollo_mini(LR, update_proj_gap=GAP),
            "optax.contrib.galore": lambda r=rank: contrib.galore(LR, rank=r, update_proj_gap=GAP),
            "optax.adamw": lambda: optax.adamw(LR),
        }
        optimizers = {name: make() for name, make in factories.items()}
        runners = {}
        for name, tx in optimizers.items():
            if args.only and name not in args.only:
                continue
            runners[name] = bench_jax(tx, params, grads)
        for name, (loaded, group) in references.items():
            if loaded is not None and (not args.only or name in args.only):
                runners[name] = bench_torch(*loaded, params, grads, rank, group)
        # Interleaved rounds: every optimizer is timed in every round, the best round counts.
        results = {name: {"step_s": np.inf, "refresh_s": np.inf,
                          **{k: r.get(k, float("nan")) for k in ("state_mib", "temp_mib", "compile_s", "plain_bytes")}}
                   for name, r in runners.items()}  # fmt: skip
        # Compile seconds vary by tens of percent between compilations of the same update: with
        # --compile-rounds, every JAX update compiles again in each round, and the median counts.
        compiles = {name: [r["compile_s"]] for name, r in runners.items() if name in optimizers}
        for _ in range(args.compile_rounds - 1):
            for name in compiles:
                tx = factories[name]()  # a new transformation: jax.jit compiles it anew
                compiles[name].append(timed_compile(jax.jit(tx.update), tx.init(params), params, grads)[1])
        for name, seconds in compiles.items():
            results[name].update(compile_s=statistics.median(seconds), compile_min_s=min(seconds),
                                 compile_max_s=max(seconds))  # fmt: skip
        for _ in range(args.rounds):
            for name, r in runners.items():
                results[name]["step_s"] = min(results[name]["step_s"], median_time(r["step"], args.repeats))
                refresh = median_time(r["refresh"], 1)
                results[name]["refresh_s"] = min(results[name]["refresh_s"], refresh)
        n = sum(np.prod(s) for s in shapes(preset, args.layers).values())
        print(f"\n{preset}: {args.layers} layer(s) of q,k,v,o,gate,up,down ({n / 1e6:.1f}M weights), rank {rank}")
        base = results.get("optax.contrib.galore", {}).get("step_s")
        adamw = results.get("optax.adamw", {}).get("step_s")
        ref = results.get("torch FiraAdamW", {}).get("step_s")
        header = f"{'optimizer':<22}{'step ms':>9}{'refresh ms':>11}{'/ optax galore':>15}{'/ optax adamw':>14}"
        print(header + f"{'/ torch Fira':>13}{'state MiB':>10}{'temp MiB':>10}{'compile s':>10}{'B/weight':>9}")
        for name, r in results.items():
            ratios = "".join(f"{r['step_s'] / x:.2f}x".rjust(w) if x else "-".rjust(w)
                             for x, w in ((base, 15), (adamw, 14), (ref, 13)))  # fmt: skip
            print(
                f"{name:<22}{1e3 * r['step_s']:9.2f}{1e3 * r['refresh_s']:11.1f}{ratios}"
                f"{r['state_mib']:10.2f}{r['temp_mib']:10.2f}{r['compile_s']:10.2f}{r['plain_bytes'] / n:9.1f}"
            )
        saved[preset] = {"layers": args.layers, "rank": rank, "weights": int(n),
                         "rows": {k: {f: float(v) for f, v in r.items()} for k, r in results.items()}}  # fmt: skip
    if args.json:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
        from lm import provenance

        record = {"provenance": provenance.record(sys.argv[1:], __file__), "repeats": args.repeats,
                  "rounds": args.rounds, "presets": saved}  # fmt: skip
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
