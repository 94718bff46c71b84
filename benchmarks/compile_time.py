"""Where the train step's compile time goes: the optimizer update of ``--blocks`` transformer blocks.

For each optimizer, jit ``update`` + ``apply_updates`` over the parameters of ``--blocks`` blocks
of ``--preset`` (abstract values: nothing is allocated), as ``examples/lm/optim.py`` builds it at
the authors' rank (GaLore and Fira: ``--svd``, ``--refresh-by-shape``), and time its compilation
for ``--platform`` (the CPU, or one TPU chip without a TPU, as ``memory_report.py --platform``).
A model that holds its blocks in a Python list hands the optimizer one leaf per block, and its
per-layer step compiles one such update per block; the difference between 1 and N blocks shows
what an update of N blocks shares.

  python benchmarks/compile_time.py --platform tpu-v5e --preset 1b --blocks 1 4 --svd gram --refresh-by-shape \
    --json results/compile_time_1b.json

``--step`` times instead the whole train step that training runs (``memory_report.py``'s, on the
model with ``--blocks`` layers; SGD's row is the floor), ordinary and with per-layer updates (rows
"NAME per-layer"), and records each step's compiled peak beside its seconds. The model is scanned,
so neither should grow with the layers:

  python benchmarks/compile_time.py --step --platform tpu-v5p --preset 7b --blocks 2 32 --svd gram \
    --refresh-by-shape --optimizer sgd adamw galore fira --json results/compile_time_7b_step.json

``--stacked`` adds, beside each row, the same update with the N blocks held as a scanned model
holds them (row "NAME stacked"): each parameter one (N, ...) leaf, the kernels' matrices declared
(``examples/lm/optim.py``). Its compile time should not grow with N: the N matrices of a leaf are
updated as one batch and refreshed one after another.
"""

import argparse
import json
import pathlib
import re
import sys
import time
from typing import Any

ROWS = ("adamw", "galore", "fira", "apollo", "apollo-mini")
DEFAULT_ROWS = ("adamw", "galore", "fira")  # APOLLO's rows on request (--optimizer)


def block_params(preset: str, blocks: int, dtype: Any, stacked: bool = False) -> dict:
    """Abstract parameters of ``blocks`` blocks of ``preset``, under the model's paths: one leaf per
    block (``layers/i/...``), or with ``stacked`` one leaf per parameter whose leading axis is the
    block (``layers/...``, as a scanned model holds them)."""
    import jax
    from flax import nnx
    from lm import model as model_lib

    cfg = model_lib.PRESETS[preset]
    one = nnx.eval_shape(lambda: model_lib.Block(cfg, dtype, nnx.Rngs(0), dtype))
    state = nnx.to_pure_dict(nnx.state(one, nnx.Param))
    if stacked:
        return {"layers": jax.tree.map(lambda x: jax.ShapeDtypeStruct((blocks, *x.shape), x.dtype), state)}
    return {"layers": dict.fromkeys(range(blocks), state)}


def compile_seconds(preset: str, name: str, blocks: int, platform: str, svd: str, by_shape: bool,
                    stacked: bool = False) -> dict:  # fmt: skip
    """Seconds to compile one optimizer's update of ``blocks`` blocks (the compilation cache off),
    and the number of StableHLO operations the update lowers to (every function body once)."""
    import jax
    import jax.numpy as jnp
    import memory_report
    import optax

    jax.config.update("jax_enable_compilation_cache", False)
    params = block_params(preset, blocks, jnp.bfloat16, stacked)
    hidden = memory_report.model_lib.PRESETS[preset].hidden
    tx = memory_report.optimizer(name, preset, hidden, svd, by_shape)
    params, state = memory_report.on_chip((params, jax.eval_shape(tx.init, params)), platform)

    def step(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params)
    ops = sum(1 for line in lowered.as_text().splitlines() if re.match(r"\s*(%\S+ = )?\"?stablehlo\.", line))
    start = time.perf_counter()
    lowered.compile()
    return {"seconds": time.perf_counter() - start, "stablehlo_ops": ops}


def step_record(preset: str, name: str, layers: int, platform: str, svd: str, by_shape: bool,
                per_layer: bool) -> dict:  # fmt: skip
    """Seconds to compile the whole train step of ``preset`` with ``layers`` layers (bfloat16, 1 x
    256 tokens, the compilation cache off), and the compiled step's peak bytes."""
    import jax
    import jax.numpy as jnp
    import memory_report

    jax.config.update("jax_enable_compilation_cache", False)
    rec = memory_report.report(preset, name, jnp.bfloat16, 1, 256, platform=platform, svd=svd, by_shape=by_shape,
                               per_layer=per_layer, layers=layers)  # fmt: skip
    return {"seconds": rec["compile_seconds"], "peak_bytes": rec["peak_bytes"]}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import memory_report
    from lm import model as model_lib

    from fira_jax.projections import SVD_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", choices=sorted(model_lib.PRESETS))
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="blocks per compiled update")
    p.add_argument("--optimizer", nargs="+", choices=("sgd", *ROWS), default=list(DEFAULT_ROWS),
                   help="rows (sgd: with --step only)")  # fmt: skip
    p.add_argument("--platform", choices=memory_report.PLATFORMS, default="cpu")
    p.add_argument("--svd", choices=SVD_METHODS, default="exact")
    p.add_argument("--refresh-by-shape", action="store_true")
    p.add_argument(
        "--stacked",
        action="store_true",
        help="also time each update on the blocks stacked as a scanned model holds them",
    )
    p.add_argument("--step", action="store_true",
                   help="time the whole train step (ordinary and per-layer) of the model with N layers")  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the seconds and their provenance to FILE")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.blocks):
        p.error(f"--blocks must be >= 1, got {args.blocks}")
    if args.step and args.stacked:
        p.error("--step times the scanned model's step: --stacked does not apply")
    if "sgd" in args.optimizer and not args.step:
        p.error("--optimizer sgd: with --step only (SGD has no update worth timing alone)")
    if args.step:
        return _steps(args, argv)
    out = {}
    for name in args.optimizer:
        for stacked in (False, True) if args.stacked else (False,):
            out[name + " stacked" * stacked] = {
                b: compile_seconds(args.preset, name, b, args.platform, args.svd, args.refresh_by_shape, stacked)
                for b in args.blocks
            }
    print(f"{args.preset}, bfloat16, {args.platform} compiler: seconds to compile the update of N blocks"
          + (" (stacked: one (N, ...) leaf per parameter)" if args.stacked else ""))  # fmt: skip
    print("| optimizer | " + " | ".join(f"{b} block{'s' if b > 1 else ''}" for b in args.blocks) + " |")
    print("|---|" + "---|" * len(args.blocks))
    for name, row in out.items():
        cells = [f"{r['seconds']:.1f} s, {r['stablehlo_ops']} ops" for r in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    _save(args, argv, stacked=args.stacked, seconds=out)
    return out


def _steps(args: argparse.Namespace, argv: list[str] | None) -> dict:
    out = {}
    for per_layer in (False, True):
        for name in args.optimizer:
            out[name + " per-layer" * per_layer] = {
                b: step_record(args.preset, name, b, args.platform, args.svd, args.refresh_by_shape, per_layer)
                for b in args.blocks
            }
    print(f"{args.preset}, bfloat16, 1 x 256 tokens, {args.platform} compiler: seconds to compile the whole train "
          "step of the model with N layers (peak GiB)")  # fmt: skip
    print("| step | " + " | ".join(f"{b} layer{'s' if b > 1 else ''}" for b in args.blocks) + " |")
    print("|---|" + "---|" * len(args.blocks))
    for name, row in out.items():
        cells = [f"{r['seconds']:.1f} ({(r['peak_bytes'] or float('nan')) / 2**30:.2f})" for r in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    _save(args, argv, step=True, tokens=[1, 256], steps=out)
    return out


def _save(args: argparse.Namespace, argv: list[str] | None, **figures: Any) -> None:
    """With ``--json FILE``: the figures, the run's settings and their provenance."""
    if args.json:
        from lm import provenance

        record = {"provenance": provenance.record(argv, __file__), "preset": args.preset, "platform": args.platform,
                  "svd": args.svd, "refresh_by_shape": args.refresh_by_shape, **figures}  # fmt: skip
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
