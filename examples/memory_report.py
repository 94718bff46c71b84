"""Memory of AdamW, GaLore and Fira for the LLaMA presets, computed without allocating anything.

For each preset and optimizer: the parameters, gradients and optimizer state in bytes (from
``jax.eval_shape`` of the model and of ``tx.init``), and the peak memory of the compiled train
step (``memory_analysis`` of the jitted step lowered on ``jax.ShapeDtypeStruct`` s, with the
parameters and the state donated), for one batch of ``--batch-size`` x ``--seq-len`` tokens.
Nothing is allocated, so a laptop reports 7B. Ranks are the authors' (60m 128, 130m 256, 350m 256,
1b 512, 7b 64). ``--dtype bfloat16`` stores parameters, gradients and state in bf16, as the
papers' memory estimates assume.

  python examples/memory_report.py --preset 60m 130m 350m 1b 7b
  python examples/memory_report.py --preset 7b --dtype bfloat16 --json

``--finetune`` reports instead, per fine-tuning method of ``finetune.py`` at its defaults (LoRA
rank 32 on q, k, v, up, down; GaLore / Fira rank 16; LoRA + Fira: Fira rank 16 on the LoRA
factors), the trainable parameters, the optimizer state and all weights (frozen ones and adapters
included), from ``eval_shape`` alone.

  python examples/memory_report.py --finetune --preset 7b --vocab-size 32000
"""

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import model as model_lib
from lm import optim

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 64, "tiny": 32, "20m": 64, "micro": 8}
SCALES = {"1b": 0.0625, "7b": 0.0625}
VOCAB = 32_000  # T5's tokenizer, as in the papers
# GaLore's Table 2 (Fira's Table 3 reports the same): weights + optimizer state, BF16, in GB.
PAPER_GB = {
    "60m": {"adamw": 0.36, "galore": 0.24, "fira": 0.24},
    "130m": {"adamw": 0.76, "galore": 0.52, "fira": 0.52},
    "350m": {"adamw": 2.06, "galore": 1.22, "fira": 1.22},
    "1b": {"adamw": 7.80, "galore": 4.38, "fira": 4.38},
}


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def report(preset: str, name: str, dtype: Any, batch_size: int, seq_len: int, vocab: int = VOCAB) -> dict:
    """Bytes of parameters, gradients, state, and the compiled step's peak, for one optimizer."""
    mcfg = dataclasses.replace(model_lib.PRESETS[preset], vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: model_lib.LLaMA(mcfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nnx.to_pure_dict(params))
    tx = optim.make_optimizer(name, 1e-3, rank=RANKS.get(preset, mcfg.hidden // 4), scale=SCALES.get(preset, 0.25))
    state = jax.eval_shape(tx.init, params)

    def step(p: Any, s: Any, batch: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: model_lib.loss_fn(_merge(graphdef, p, rest, abstract), batch))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"params_bytes": nbytes(params), "grads_bytes": nbytes(params), "state_bytes": nbytes(state),
            "peak_bytes": peak}  # fmt: skip


def finetune_report(preset: str, method: str, dtype: Any, vocab: int = VOCAB) -> dict:
    """Trainable parameters and optimizer-state bytes of one fine-tuning method (finetune.py's defaults)."""
    import finetune

    mcfg = dataclasses.replace(model_lib.PRESETS[preset], vocab_size=vocab)
    defaults = finetune.parser().parse_args(["--checkpoint", "unused"])
    made = []

    def build() -> model_lib.LLaMA:
        model = model_lib.LLaMA(mcfg, dtype=dtype, rngs=nnx.Rngs(0))
        made.append(finetune.make_optimizer(method, model, 1e-4, defaults))
        return model

    abstract = nnx.eval_shape(build)
    wrt, tx = made[0]
    pure = nnx.to_pure_dict(nnx.state(abstract, wrt))
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), pure)
    state = jax.eval_shape(tx.init, trainable)
    count = sum(x.size for x in jax.tree.leaves(trainable))
    weights = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) * jnp.dtype(dtype).itemsize
    return {"trainable_params": count, "trainable_bytes": nbytes(trainable), "state_bytes": nbytes(state),
            "weights_bytes": weights}  # fmt: skip


def _merge(graphdef: Any, pure: Any, rest: Any, abstract: Any) -> Any:
    """The model with the parameters ``pure`` (a pure dict) in place of the abstract ones."""
    params = nnx.state(abstract, nnx.Param)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", nargs="+", default=["60m", "130m", "350m", "1b", "7b"], choices=sorted(model_lib.PRESETS)
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of parameters, grads, state")
    p.add_argument("--batch-size", type=int, default=1, help="sequences in the step whose peak is measured")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=VOCAB, help="default T5's 32,000, as in the papers")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning methods of finetune.py instead")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.vocab_size < 1:
        p.error("--batch-size, --seq-len and --vocab-size must be >= 1")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if args.finetune:
        return _finetune_main(args, dtype)
    out = {}
    for preset in args.preset:
        out[preset] = {
            n: report(preset, n, dtype, args.batch_size, args.seq_len, args.vocab_size) for n in optim.OPTIMIZERS
        }
    if args.json:
        print(json.dumps(out))
        return out
    gib = 2**30
    for preset, rows in out.items():
        print(
            f"\n{preset} ({args.dtype}, rank {RANKS.get(preset)}, peak for {args.batch_size} x {args.seq_len} tokens)"
        )
        print("| optimizer | params GiB | grads GiB | state GiB | params + state GiB | paper GB (bf16) | peak GiB |")
        print("|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            paper = PAPER_GB.get(preset, {}).get(name, "")
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / gib:.2f}"
            cells = [r["params_bytes"], r["grads_bytes"], r["state_bytes"], r["params_bytes"] + r["state_bytes"]]
            print(f"| {name} | " + " | ".join(f"{c / gib:.3f}" for c in cells) + f" | {paper} | {peak} |")
    return out


def _finetune_main(args: argparse.Namespace, dtype: Any) -> dict:
    import finetune

    out = {preset: {m: finetune_report(preset, m, dtype, args.vocab_size) for m in finetune.METHODS}
           for preset in args.preset}  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return out
    gib = 2**30
    for preset, rows in out.items():
        print(f"\n{preset} fine-tuning ({args.dtype}, vocabulary {args.vocab_size:,}; finetune.py's defaults)")
        print("| method | trainable params | optimizer state GiB | all weights GiB | weights + state GiB |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            cells = [r["state_bytes"], r["weights_bytes"], r["weights_bytes"] + r["state_bytes"]]
            print(f"| {name} | {r['trainable_params']:,} | " + " | ".join(f"{c / gib:.3f}" for c in cells) + " |")
    return out


if __name__ == "__main__":
    main()
