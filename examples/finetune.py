"""Fine-tune a Hugging Face LLaMA checkpoint on instruction data with full AdamW, LoRA, GaLore, Fira
or LoRA + Fira (the authors' setup: Fira on the LoRA factors), and evaluate multiple-choice tasks.

  python examples/finetune.py --checkpoint ~/llama --tokenizer ~/llama/tokenizer.json \\
      --data commonsense_170k.json --method fira --eval boolq.json piqa.json

Data: a JSON list (or JSON lines) of {"instruction", "input", "output"} records (Alpaca /
LLM-Adapters) in the Alpaca template (--template plain drops its preamble sentence); the first
--val-size records are held out for the validation loss.

Evaluation files (--eval, LLM-Adapters' task JSON): records {"instruction", "answer"} whose
instruction ends with "Answer format: a/b/c" (or that carry a "choices" list); the answer is one
of the options. For example:
  [{"instruction": "Is the sky green? Answer format: true/false", "answer": "false"},
   {"instruction": "2 + 2 = ? Answer format: 3/4/5", "answer": "4"},
   {"instruction": "Pick the colour.", "choices": ["red", "seven"], "answer": "red"}]
Accuracy is by answer log-likelihood (--eval-mode loglik) or by greedy generation and matching
(generate).

Writes metrics.jsonl, loss.png and summary.json under --out; --export DIR saves the fine-tuned
model (LoRA merged) as a Hugging Face checkpoint. A
checkpoint of your own pre-training: ``train_lm.py --export DIR``. A demonstration that runs on a
CPU with nothing to download: ``finetune_demo.py``.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import data as data_lib
from lm import hf, instruct, lora, optim
from lm import step as step_lib
from lm import tokenizer as tokenizer_lib
from lm.train import plot, state_mib

import fira_jax

METHODS = ("full-adamw", "lora", "galore", "fira", "lora-fira")


def make_optimizer(method: str, model: nnx.Module, schedule: optax.Schedule, args: argparse.Namespace) -> tuple:
    """(what is trained, optimizer) for ``method``; LoRA methods put adapters on the model first."""
    if method in ("lora", "lora-fira"):
        lora.apply(model, args.lora_rank, args.lora_alpha, args.lora_dropout, seed=args.seed)
        wrt = nnx.LoRAParam
        if method == "lora":
            return wrt, optax.adamw(schedule, weight_decay=0.0)
        # The authors' ft_fira.sh: FiraAdamW on the LoRA factors, rank 16, gap 200, alpha 1.0.
        return wrt, fira_jax.fira(schedule, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
    if method == "full-adamw":
        return nnx.Param, optax.adamw(schedule, weight_decay=0.0)
    tx = optim.make_optimizer(method, schedule, rank=args.rank, scale=args.scale, update_proj_gap=args.update_proj_gap)
    return nnx.Param, tx


def _count_or_fraction(text: str) -> int | float:
    """``--val-size``: an integer count (>= 0) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a fraction") from None
    if value.is_integer() and value >= 0:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: a count >= 0 or a fraction between 0 and 1 is expected")


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults are the authors' fine-tuning settings)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face LLaMA folder (config.json, *.safetensors)")
    p.add_argument("--tokenizer", default="bytes", help="bytes, a tokenizer.json (or its folder), or a .model")
    p.add_argument("--data", help="training records: a JSON list or JSON lines of instruction/input/output")
    p.add_argument(
        "--eval",
        nargs="*",
        default=[],
        help='task files to score: JSON records {"instruction", "answer"}, the instruction ending with '
        '"Answer format: a/b/c" or the record holding a "choices" list (an example above)',
    )
    p.add_argument("--eval-mode", choices=("loglik", "generate"), default="loglik")
    p.add_argument("--method", choices=METHODS, default="fira")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warmup steps (default: the authors' 100, or 10%% of a shorter run); must be shorter than the run",
    )
    p.add_argument("--cutoff", type=int, default=256, help="tokens per example at most")
    p.add_argument(
        "--val-size",
        type=_count_or_fraction,
        default=120,
        help="records held out for the validation loss: a count (default 120, the authors'), or a fraction "
        "of --data below 1 (e.g. 0.05)",
    )
    p.add_argument(
        "--template",
        choices=sorted(instruct.TEMPLATES),
        default="alpaca",
        help="prompt template: alpaca (the authors') or plain (its sections without the preamble)",
    )
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=True,
                   help="loss on the prompt too (the authors' default)")  # fmt: skip
    p.add_argument("--rank", type=int, default=16, help="GaLore/Fira rank (authors' lora-fira: 16)")
    p.add_argument("--update-proj-gap", type=int, default=200)
    p.add_argument("--scale", type=float, default=1.0, help="GaLore/Fira scale (alpha; authors' lora-fira: 1.0)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--export", default=None, help="save the fine-tuned model here (Hugging Face format)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    for name in ("batch_size", "cutoff", "rank", "lora_rank", "update_proj_gap", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.epochs > 0 or not args.lr > 0:
        p.error("--epochs and --lr must be > 0")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        tok = tokenizer_lib.load(args.tokenizer)
        model = hf.load(args.checkpoint)
        if tok.vocab_size > model.cfg.vocab_size:
            raise data_lib.DataError(
                f"--tokenizer has {tok.vocab_size} tokens; the checkpoint only {model.cfg.vocab_size}"
            )
        records = instruct.load_records(args.data) if args.data else []
        tasks = {pathlib.Path(f).stem: instruct.load_task(f) for f in args.eval}
    except (data_lib.DataError, tokenizer_lib.TokenizerError, hf.CheckpointError) as e:
        p.error(str(e))
    encoded = [instruct.encode(r, tok, args.cutoff, args.train_on_inputs, args.template) for r in records]
    n_val = args.val_size if isinstance(args.val_size, int) else max(1, round(args.val_size * len(records)))
    val, train = encoded[:n_val], encoded[n_val:]
    if records and not train:
        p.error(f"--data {args.data} has {len(records)} records, all held out by --val-size {args.val_size}")
    steps_per_epoch = max(1, len(train) // args.batch_size)
    steps = min(args.max_steps or 10**9, int(args.epochs * steps_per_epoch)) if train else 0
    warmup = args.warmup if args.warmup is not None else min(100, steps // 10)
    if steps and warmup >= steps:
        p.error(f"--warmup {warmup} is not shorter than the run ({steps} steps): pass a smaller --warmup")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, args.lr, max(warmup, 1)),
         optax.linear_schedule(args.lr, 0.0, max(steps - warmup, 1))], [max(warmup, 1)],
    )  # fmt: skip
    wrt, tx = make_optimizer(args.method, model, schedule, args)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    opt_mib = state_mib(optimizer.opt_state)
    print(f"{args.method}: {trainable:,} trainable parameters, optimizer state {opt_mib:.2f} MiB, "
          f"{len(train)} training / {len(val)} validation examples, {steps} steps")  # fmt: skip
    pad = tok.separator or 0

    train_step = step_lib.make_train_step(instruct.masked_loss, wrt)

    @nnx.jit
    def eval_loss(model: nnx.Module, ids: jax.Array, weights: jax.Array) -> jax.Array:
        return instruct.masked_loss(model, ids, weights)

    def padded(chunk: list) -> tuple[jax.Array, jax.Array]:
        chunk = [(np.pad(i, (0, args.cutoff - len(i)), constant_values=pad), np.pad(m, (0, args.cutoff - len(m))))
                 for i, m in chunk]  # fmt: skip
        ids, weights = instruct.batch(chunk, pad)
        return jnp.asarray(ids), jnp.asarray(weights)

    def validate() -> float:
        """Validation loss, in evaluation mode (no dropout); the caller returns to training mode."""
        model.eval()
        losses = [
            float(eval_loss(model, *padded(val[i : i + args.batch_size]))) for i in range(0, len(val), args.batch_size)
        ]
        return float(np.mean(losses)) if losses else float("nan")

    records_out, rng, t0 = [], np.random.default_rng(args.seed), time.perf_counter()
    order = np.array([], int)
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else print
    with open(out / "metrics.jsonl", "w") as metrics:
        for step in range(steps):
            if len(order) < args.batch_size:
                order = np.concatenate([order, rng.permutation(len(train))])
            idx, order = order[: args.batch_size], order[args.batch_size :]
            loss = float(step_lib.run_step(train_step, model, optimizer, *padded([train[i] for i in idx])))
            record = {"step": step + 1, "train_loss": loss}
            if (step + 1) % args.eval_every == 0 or step + 1 == steps:
                record["val_loss"] = validate()
                model.train()
                say(f"step {step + 1}: train {loss:.4f}  val {record['val_loss']:.4f} nats/token")
            records_out.append(record)
            metrics.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    summary = {"method": args.method, "trainable_params": trainable, "optimizer_state_mib": opt_mib, "steps": steps,
               "wall_s": time.perf_counter() - t0, "final_val_loss": validate() if val else None}  # fmt: skip
    for name, task in tasks.items():
        summary[f"accuracy/{name}"] = instruct.accuracy(model, tok, task, args.eval_mode, args.template)
        print(f"{name}: accuracy {summary[f'accuracy/{name}']:.4f} ({len(task)} examples, {args.eval_mode})")
    if records_out:
        plot({args.method: records_out}, out / "loss.png", f"fine-tuning: {args.method}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.export:
        if args.method in ("lora", "lora-fira"):
            lora.merge(model)
        hf.save(model, args.export)
        print(f"exported the fine-tuned model (Hugging Face format) to {args.export}")
    if summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"]):
        print(f"final validation loss {summary['final_val_loss']:.4f} nats/token")
    return summary


if __name__ == "__main__":
    main()
