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
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import checkpoints, files, hf, instruct, loop, lora, optim, runlog
from lm import config as config_lib
from lm import data as data_lib
from lm import sharding as sharding_lib
from lm import step as step_lib
from lm import tokenizer as tokenizer_lib
from lm.train import plot, state_mib

import fira_jax

METHODS = config_lib.FINETUNE_METHODS


def make_optimizer(method: str, model: nnx.Module, schedule: optax.Schedule, args: config_lib.FinetuneConfig) -> tuple:
    """(what is trained, optimizer) for ``method``; LoRA methods put adapters on the model first."""
    if method in ("lora", "lora-fira"):
        lora.apply(model, args.lora_rank, args.lora_alpha, args.lora_dropout, seed=args.seed)
        wrt = nnx.LoRAParam
        if method == "lora":
            return wrt, optax.adamw(schedule, weight_decay=0.0)
        # The authors' ft_fira.sh: FiraAdamW on the LoRA factors, rank 16, gap 200, alpha 1.0. The
        # factors are stacked like the blocks, (layers, in, r) and (layers, r, out): each layer's
        # matrix is declared, as for the kernels.
        return wrt, fira_jax.fira(schedule, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale,
                                  axes=optim.TARGET_AXES)  # fmt: skip
    if method == "full-adamw":
        return nnx.Param, optax.adamw(schedule, weight_decay=0.0)
    tx = optim.make_optimizer(method, schedule, rank=args.rank, scale=args.scale, update_proj_gap=args.update_proj_gap)
    return nnx.Param, tx


# Settings a resumed run may change: where it writes, what it evaluates, how often it reports.
RESUMABLE_CHANGES = ("out", "export", "eval", "eval_mode", "eval_every", "log_every", "checkpoint_every", "resume",
                     "progress", "checkpoint", "tokenizer", "data", "remat", "mesh")  # fmt: skip


def resume_record(args: config_lib.FinetuneConfig, n_records: int, vocabulary: int) -> dict:
    """What a checkpoint records of its run, and a resumed run must repeat: every setting but
    :data:`RESUMABLE_CHANGES`, with the data's size and the tokenizer's vocabulary in place of their paths."""
    record = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUMABLE_CHANGES}
    return record | {"records": n_records, "vocabulary": vocabulary}


def parser() -> argparse.ArgumentParser:
    """The command line, derived from :class:`lm.config.FinetuneConfig` (its defaults are the authors')."""
    p = config_lib.parser(__file__, __doc__)
    config_lib.add_flags(p, config=config_lib.FinetuneConfig)
    return p


class UsageError(Exception):
    """A setting that cannot work with this data (reported as a one-line usage error)."""


# What a mistake in the flags, the files or the places to write raises: one usage line each.
ERRORS = (UsageError, data_lib.DataError, tokenizer_lib.TokenizerError, hf.CheckpointError, files.OutputError,
          checkpoints.CheckpointError, sharding_lib.MeshError)  # fmt: skip


def check_args(args: config_lib.FinetuneConfig) -> None:
    """The flags alone, before anything is read."""
    for name in ("batch_size", "cutoff", "rank", "lora_rank", "update_proj_gap", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.epochs > 0 or not args.lr > 0:
        raise UsageError("--epochs and --lr must be > 0")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    # The output places first: a typo or a read-only folder costs a line, not a run.
    files.check_folder(args.out, "--out", create=False)
    if args.resume:
        checkpoints.check_resumable(pathlib.Path(args.out).expanduser())
    if args.export:
        files.check_folder(args.export, "--export", create=False)


def load_model(args: config_lib.FinetuneConfig) -> tuple[Any, jax.sharding.Mesh, nnx.Module]:
    """The tokenizer, the mesh, and the checkpoint loaded shard by shard into it."""
    tok = tokenizer_lib.load(args.tokenizer)
    mesh = sharding_lib.make_mesh(sharding_lib.parse_mesh(args.mesh, jax.device_count()), jax.devices())
    rows = sharding_lib.batch_rows(mesh.shape)
    if args.batch_size % rows:
        raise sharding_lib.MeshError(f"--batch-size {args.batch_size} must be divisible by the mesh's data x fsdp "
                                     f"= {rows} devices")  # fmt: skip
    model = hf.load(args.checkpoint, mesh=mesh, remat=args.remat)
    if tok.vocab_size > model.cfg.vocab_size:
        raise data_lib.DataError(f"--tokenizer has {tok.vocab_size} tokens; the checkpoint only {model.cfg.vocab_size}")
    return tok, mesh, model


def load_data(args: config_lib.FinetuneConfig, tok: Any) -> tuple[list, list, list, dict]:
    """(records, encoded training examples, validation examples, evaluation tasks)."""
    records = instruct.load_records(args.data) if args.data else []
    tasks = {pathlib.Path(f).stem: instruct.load_task(f) for f in args.eval}
    encoded = [instruct.encode(r, tok, args.cutoff, args.train_on_inputs, args.template) for r in records]
    n_val = args.val_size if isinstance(args.val_size, int) else max(1, round(args.val_size * len(records)))
    val, train = encoded[:n_val], encoded[n_val:]
    if records and not train:
        raise UsageError(f"--data {args.data} has {len(records)} records, all held out by --val-size {args.val_size}")
    return records, train, val, tasks


def make_schedule(args: config_lib.FinetuneConfig, n_train: int) -> tuple[int, optax.Schedule]:
    """(steps, learning rate): linear warm-up to ``--lr``, then linear decay to 0."""
    steps_per_epoch = max(1, n_train // args.batch_size)
    steps = min(args.max_steps or 10**9, int(args.epochs * steps_per_epoch)) if n_train else 0
    warmup = args.warmup if args.warmup is not None else min(100, steps // 10)
    if steps and warmup >= steps:
        raise UsageError(f"--warmup {warmup} is not shorter than the run ({steps} steps): pass a smaller --warmup")
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, args.lr, max(warmup, 1)),
         optax.linear_schedule(args.lr, 0.0, max(steps - warmup, 1))], [max(warmup, 1)],
    )  # fmt: skip
    return steps, schedule


def make_training(args: config_lib.FinetuneConfig, model: nnx.Module, schedule: optax.Schedule,
                  mesh: jax.sharding.Mesh) -> tuple[Any, nnx.Optimizer]:  # fmt: skip
    """(what is trained, its optimizer on the mesh)."""
    wrt, tx = make_optimizer(args.method, model, schedule, args)
    params = nnx.state(model, nnx.Param)  # LoRA's adapters (LoRAParams) too, made on one device: to the mesh
    nnx.update(model, jax.device_put(params, sharding_lib.param_shardings(params, mesh)))
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    sharding_lib.replicate_rest(mesh, model, optimizer)  # dropout keys and step counts: the step compiles once
    return wrt, optimizer


def open_checkpoints(args: config_lib.FinetuneConfig, out: pathlib.Path, model: nnx.Module,
                     optimizer: nnx.Optimizer, run_config: dict, steps: int) -> tuple[Any, int, float]:  # fmt: skip
    """(checkpoint manager, first step, seconds already spent): resumed from the latest checkpoint
    with ``--resume``, after checking room for the checkpoints kept and the export."""
    ckpt_bytes = checkpoints.kept_bytes(model, optimizer) if args.checkpoint_every else 0
    files.check_folder(out, "--out", need_bytes=ckpt_bytes)
    if args.export:
        export_bytes = int(state_mib(nnx.state(model, nnx.Param)) * 2**20)
        files.check_folder(args.export, "--export", need_bytes=export_bytes, create=False)
    manager = checkpoints.manager(out, args.checkpoint_every, args.resume)
    start, wall_before = (
        checkpoints.restore(manager, model, optimizer, run_config, print, steps) if args.resume else (0, 0.0)
    )
    return manager, start, wall_before


def batcher(args: config_lib.FinetuneConfig, mesh: jax.sharding.Mesh, pad: int) -> Any:
    """``padded(chunk)``: examples as a batch on the mesh; a short one (the validation's last) gets
    rows of weight 0 up to a multiple of the mesh's rows (the masked loss is the same)."""
    rows, rows_sharding = sharding_lib.batch_rows(mesh.shape), sharding_lib.batch_sharding(mesh)

    def padded(chunk: list) -> tuple[jax.Array, jax.Array]:
        chunk = [(np.pad(i, (0, args.cutoff - len(i)), constant_values=pad), np.pad(m, (0, args.cutoff - len(m))))
                 for i, m in chunk]  # fmt: skip
        chunk += [(np.full(args.cutoff, pad), np.zeros(args.cutoff))] * (-len(chunk) % rows)
        return jax.device_put(instruct.batch(chunk, pad), rows_sharding)

    return padded


def data_order(seed: int, n_train: int, steps: int, batch_size: int) -> np.ndarray:
    """The seed's permutations of the training examples, one after another (a resumed run replays
    it to its checkpoint's step); batch ``t`` is ``order[t * batch_size : (t + 1) * batch_size]``."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(n_train) for _ in range(-(-steps * batch_size // n_train))] if steps else []
    return np.concatenate(order) if order else np.array([], int)


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = config_lib.from_args(p.parse_args(argv), config_lib.FinetuneConfig)
    try:
        return finetune(args)
    except loop.StoppedError as e:
        sys.exit(loop.stopped(e.done, args.out, args.checkpoint_every))
    except KeyboardInterrupt:  # before the loop (loading, compilation), or a second Ctrl-C
        sys.exit(loop.stopped(None, args.out, args.checkpoint_every))
    except checkpoints.FinishedError as e:
        return checkpoints.finished(e, args.out)
    except ERRORS as e:
        p.error(str(e))


def finetune(args: config_lib.FinetuneConfig) -> dict:
    """Config -> model -> data -> optimizer -> step -> loop -> evaluation; returns the summary."""
    check_args(args)
    tok, mesh, model = load_model(args)
    records, train, val, tasks = load_data(args, tok)
    steps, schedule = make_schedule(args, len(train))
    wrt, optimizer = make_training(args, model, schedule, mesh)
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    opt_mib = state_mib(optimizer.opt_state)
    print(f"{args.method}: {trainable:,} trainable parameters, optimizer state {opt_mib:.2f} MiB, "
          f"{len(train)} training / {len(val)} validation examples, {steps} steps")  # fmt: skip
    out = pathlib.Path(args.out).expanduser()
    run_config = resume_record(args, len(records), tok.vocab_size)
    manager, start, wall_before = open_checkpoints(args, out, model, optimizer, run_config, steps)
    train_step = step_lib.make_train_step(instruct.masked_loss, wrt)
    padded, order, n = (
        batcher(args, mesh, tok.separator or 0),
        data_order(args.seed, len(train), steps, args.batch_size),
        args.batch_size,
    )

    @nnx.jit
    def eval_loss(model: nnx.Module, ids: jax.Array, weights: jax.Array) -> jax.Array:
        return instruct.masked_loss(model, ids, weights)

    def validate() -> float:
        """Validation loss, in evaluation mode (no dropout); every batch dispatched before the host waits."""
        model.eval()
        losses = [eval_loss(model, *padded(val[i : i + n])) for i in range(0, len(val), n)]
        return float(np.mean([float(x) for x in jax.device_get(losses)])) if losses else float("nan")

    def validation() -> dict[str, float]:
        val_loss = validate()
        model.train()
        return {"val_loss": val_loss}

    def checkpoint(step: int, wall: float, force: bool) -> None:  # force: after a Ctrl-C
        checkpoints.save(manager, step, 1 if force else args.checkpoint_every, model, optimizer, run_config, wall)

    try:
        with runlog.RunLog(out, steps, start, progress=args.progress) as run:
            result = loop.run(
                run, lambda b: step_lib.run_step(train_step, model, optimizer, *b),
                lambda step: padded([train[i] for i in order[step * n : (step + 1) * n]]), start, steps,
                log_every=args.log_every, eval_every=args.eval_every, evaluate=validation, checkpoint=checkpoint,
                wall_before=wall_before,
            )  # fmt: skip
            records_out = run.earlier + result.records  # a resumed run's records continue its first part's
    except loop.StoppedError:
        checkpoints.close(manager)  # the Ctrl-C's checkpoint, written
        raise
    checkpoints.close(manager)
    model.eval()
    summary = {"method": args.method, "trainable_params": trainable, "optimizer_state_mib": opt_mib, "steps": steps,
               "wall_s": result.wall_s, "final_val_loss": validate() if val else None}  # fmt: skip
    return finish(args, model, tok, tasks, out, summary, records_out)


def finish(args: config_lib.FinetuneConfig, model: nnx.Module, tok: Any, tasks: dict, out: pathlib.Path,
           summary: dict, records: list) -> dict:  # fmt: skip
    """Evaluation on the tasks, the plot and summary.json, the export (LoRA merged)."""
    for name, task in tasks.items():
        summary[f"accuracy/{name}"] = instruct.accuracy(model, tok, task, args.eval_mode, args.template)
        print(f"{name}: accuracy {summary[f'accuracy/{name}']:.4f} ({len(task)} examples, {args.eval_mode})")
    if records:
        plot({args.method: records}, out / "loss.png", f"fine-tuning: {args.method}")
    files.write_text(out / "summary.json", json.dumps(summary, indent=1))
    if args.export:
        if args.method in ("lora", "lora-fira"):
            lora.merge(model)
        hf.save_or_keep(model, args.export, "--export", out / "export")  # if that failed meanwhile: to --out
        print(f"exported the fine-tuned model (Hugging Face format) to {args.export}")
    if summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"]):
        print(f"final validation loss {summary['final_val_loss']:.4f} nats/token")
    return summary


if __name__ == "__main__":
    main()
