"""The training configurations, and the command-line flags derived from them.

Pre-training (``train_lm.py``, ``compare.py``, ``similarity.py``) builds its flags from
:class:`TrainConfig`, fine-tuning (``finetune.py``) from :class:`FinetuneConfig`, both with
:func:`add_flags`, so names, types, defaults and help are declared once, here, a comment per
field. A command-line mistake is reported as a one-line usage error.
"""

import argparse
import dataclasses
import math
import pathlib
import typing
from typing import Any, NoReturn

from lm import model as model_lib
from lm import optim


class Parser(argparse.ArgumentParser):
    """argparse with a short error: the usage in one line that points to ``--help``, then
    ``prog: error: message``; exit status 2 (argparse prints the whole usage text first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.prog} [options] (see {self.prog} --help)\n{self.prog}: error: {message}\n")


def parser(script: str, doc: str | None) -> Parser:
    """The command line of the example ``script`` (its ``__file__``), described by its ``doc``."""
    return Parser(prog=pathlib.Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _field(default: Any, help: str, **flag: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **flag})


MESH_HELP = ("the device mesh: fsdp (every device shards batch and parameters), data (parameters replicated), or "
             "sizes such as data=2,fsdp=2,tensor=2 (lm/sharding.py)")  # fmt: skip


@dataclasses.dataclass
class TrainConfig:
    # optimizer
    optimizer: str = _field("fira", "optimizer", choices=optim.OPTIMIZERS)
    lr: float = _field(1e-2, "peak learning rate (paper: 0.01 for Fira/GaLore)")
    warmup: int | None = _field(None, "warmup steps (default 10%% of --steps)")
    rank: int | None = _field(None, "projection rank (default hidden/4: 128 for 60m, as in the paper)")
    scale: float = _field(0.25, "scale of Fira's and GaLore's low-rank update (alpha; paper 0.25)")
    apollo_scale: float | None = _field(
        None, "APOLLO's scale: the update is multiplied by sqrt(scale) (default: the authors' 1 for apollo, 128 for "
        "apollo-mini)"
    )  # fmt: skip
    svd: str = _field("exact", "how Fira and GaLore refresh their bases (see fira_jax.scale_by_fira)",
                      choices=("exact", "randomized", "subspace", "gram"))  # fmt: skip
    update_proj_gap: int = _field(200, "steps between refreshes of the projection")
    moments: str = _field(
        "keep",
        "what Adam's moments become at a refresh (fira_jax.Refresh): kept as the authors' "
        "code, reset, or re-projected onto the new basis",
        choices=("keep", "reset", "reproject"),
    )
    gamma: float = _field(1.01, "Fira's norm-growth limit; inf disables it")
    weight_decay: float = _field(0.0, "decoupled weight decay, on the kernels only")
    ablation: str = _field("none", "Fira ablations (paper Table 5)", choices=optim.ABLATIONS)
    grad_clip: float | None = _field(
        None, "clip the gradient's global norm to this (the 7B recipe: 1.0); 0: no clipping (to drop a recipe's)"
    )
    # model and data
    preset: str = _field("tiny", "model size", choices=sorted(model_lib.PRESETS))
    dtype: str = _field("float32", "compute dtype", choices=("float32", "bfloat16"))
    param_dtype: str = _field(
        "float32", "dtype the parameters, and so the gradients and optimizer state, are stored in",
        choices=("float32", "bfloat16"),
    )  # fmt: skip
    data: str | None = _field(
        None, "a folder from prepare_data.py, or a text file / folder / .jsonl / .json.gz (default: built-in corpus)"
    )
    tokenizer: str | None = _field(
        None, "bytes (default), a tokenizer.json (or its folder), or a SentencePiece .model; a prepared --data "
        "folder brings its own"
    )  # fmt: skip
    # run
    steps: int = _field(1000, "training steps")
    batch_size: int = _field(16, "sequences per step (global, over all devices and accumulation steps)")
    grad_accum: int = _field(1, "split each step's batch into this many sequential micro-batches")
    per_layer_updates: bool = _field(
        False, "apply each layer's update as soon as its gradient exists (less memory; no --grad-accum above 1, "
        "no --grad-clip)"
    )  # fmt: skip
    remat: str = _field(
        "none", "what the backward pass recomputes instead of keeping: nothing, each block from its input, or all "
        "but its matrix products (per-layer updates recompute each block anyway)", choices=model_lib.REMAT,
    )  # fmt: skip
    seq_len: int = _field(128, "tokens per sequence")
    seed: int = _field(0, "seed of the initialization and of the data order")
    out: str = _field("runs/lm", "output folder (metrics.jsonl, loss.png, checkpoints)")
    export: str | None = _field(
        None, "save the trained model here as a Hugging Face LLaMA checkpoint (for finetune.py --checkpoint)"
    )
    eval_every: int = _field(100, "validate every this many steps")
    eval_batches: int = _field(20, "validation batches per evaluation")
    log_every: int = _field(10, "log the running training loss every this many steps")
    checkpoint_every: int = _field(0, "save an orbax checkpoint every this many steps; 0: never")
    resume: bool = _field(False, "continue from the latest checkpoint in --out")
    mesh: str = _field("fsdp", MESH_HELP)
    progress: bool = _field(True, "show a progress bar")
    tensorboard: bool = _field(True, "also write the logged scalars for TensorBoard to --out/tensorboard (where "
                               "tensorboardX is installed)")  # fmt: skip
    profile: str | None = _field(
        None, "START:STOP: capture a jax.profiler trace of steps START to STOP - 1 into --out/profile (open it "
        "with XProf or TensorBoard's profiler)", metavar="START:STOP"
    )  # fmt: skip
    # several processes (multi-host); auto-detected under SLURM / Open MPI
    coordinator_address: str | None = _field(None, "HOST:PORT of process 0, for jax.distributed.initialize")
    num_processes: int | None = _field(None, "number of processes (with --coordinator-address)")
    process_id: int | None = _field(None, "this process's index (with --coordinator-address)")

    def resolved_rank(self) -> int:
        return self.rank if self.rank is not None else model_lib.PRESETS[self.preset].hidden // 4

    def resolved_warmup(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def count_or_fraction(text: str) -> int | float:
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


FINETUNE_METHODS = ("full-adamw", "lora", "galore", "fira", "lora-fira")


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning (``finetune.py``); the defaults are the authors' fine-tuning settings."""

    # model and data
    checkpoint: str = _field(None, "Hugging Face LLaMA folder (config.json, *.safetensors)", required=True)
    tokenizer: str = _field("bytes", "bytes, a tokenizer.json (or its folder), or a SentencePiece .model")
    data: str | None = _field(None, "training records: a JSON list or JSON lines of instruction/input/output")
    eval: tuple[str, ...] = _field(
        (), 'task files to score: JSON records {"instruction", "answer"}, the instruction ending with '
        '"Answer format: a/b/c" or the record holding a "choices" list (an example above)', nargs="*",
    )  # fmt: skip
    eval_mode: str = _field("loglik", "score each option by log-likelihood, or generate greedily and match",
                            choices=("loglik", "generate"))  # fmt: skip
    template: str = _field("alpaca", "prompt template: alpaca (the authors') or plain (its sections without the "
                           "preamble)", choices=("alpaca", "plain"))  # fmt: skip
    train_on_inputs: bool = _field(True, "loss on the prompt too (the authors' default)")
    cutoff: int = _field(256, "tokens per example at most")
    remat: str = _field("none", "what the backward pass recomputes instead of keeping: nothing, each block from its "
                        "input, or all but its matrix products", choices=model_lib.REMAT)  # fmt: skip
    val_size: int | float = _field(
        120, "records held out for the validation loss: a count (the authors' 120), or a fraction of --data "
        "below 1 (e.g. 0.05)", type=count_or_fraction,
    )  # fmt: skip
    # method and optimizer
    method: str = _field("fira", "what is trained, and how", choices=FINETUNE_METHODS)
    epochs: float = _field(3.0, "passes over the training records")
    batch_size: int = _field(16, "examples per step")
    lr: float = _field(1e-4, "peak learning rate")
    warmup: int | None = _field(None, "warmup steps (default: the authors' 100, or 10%% of a shorter run); must be "
                                "shorter than the run")  # fmt: skip
    max_steps: int | None = _field(None, "stop after this many steps")
    rank: int = _field(16, "GaLore/Fira rank (authors' lora-fira: 16)")
    update_proj_gap: int = _field(200, "steps between refreshes of the projection")
    scale: float = _field(1.0, "GaLore/Fira scale (alpha; authors' lora-fira: 1.0)")
    lora_rank: int = _field(32, "LoRA rank (the authors': 32)")
    lora_alpha: float = _field(64.0, "LoRA alpha: the adapters are scaled by alpha / rank")
    lora_dropout: float = _field(0.05, "dropout on the LoRA adapters' input")
    # run
    eval_every: int = _field(50, "validate every this many steps")
    log_every: int = _field(10, "log the running training loss every this many steps (the host waits on the "
                                "device only then)")  # fmt: skip
    checkpoint_every: int = _field(0, "save an orbax checkpoint every this many steps; 0: never")
    resume: bool = _field(False, "continue from the latest checkpoint in --out")
    seed: int = _field(0, "seed of the data order and of LoRA's initialization")
    out: str = _field("runs/finetune", "output folder (metrics.jsonl, loss.png, summary.json)")
    export: str | None = _field(None, "save the fine-tuned model here (Hugging Face format; LoRA merged)")
    mesh: str = _field("fsdp", MESH_HELP)
    progress: bool = _field(True, "show a progress bar")


# The authors' pre-training recipes (Fira's pre_training_c4/scripts/llama_*.sh): C4 with T5's
# tokenizer (vocabulary 32,000; the user supplies spiece.model), sequences of 256, global batch
# 512, warmup 10% then cosine to 10%, weight decay 0, bf16, projection on the attention and MLP
# kernels (plain Adam elsewhere). Flags given on the command line override a recipe's values.
_PAPER = {"optimizer": "fira", "seq_len": 256, "batch_size": 512, "weight_decay": 0.0, "dtype": "bfloat16"}
RECIPES = {
    "paper-60m": _PAPER | {"preset": "60m", "steps": 10_000, "lr": 0.01, "rank": 128, "update_proj_gap": 200,
                           "scale": 0.25},
    "paper-130m": _PAPER | {"preset": "130m", "steps": 20_000, "lr": 0.01, "rank": 256, "update_proj_gap": 200,
                            "scale": 0.25},
    "paper-350m": _PAPER | {"preset": "350m", "steps": 60_000, "lr": 0.01, "rank": 256, "update_proj_gap": 200,
                            "scale": 0.25},
    "paper-1b": _PAPER | {"preset": "1b", "steps": 100_000, "lr": 0.01, "rank": 512, "update_proj_gap": 200,
                          "scale": 0.0625},
    "paper-7b": _PAPER | {"preset": "7b", "steps": 10_000, "lr": 0.005, "rank": 64, "update_proj_gap": 500,
                          "scale": 0.0625, "grad_clip": 1.0},
}  # fmt: skip
# The paper's Table 3 (validation perplexity on C4), for README and logs.
PAPER_PPL = {
    "paper-60m": {"fira": 31.06, "galore": 34.88, "adamw": 34.06},
    "paper-130m": {"fira": 22.73, "galore": 25.36, "adamw": 25.08},
    "paper-350m": {"fira": 16.85, "galore": 18.95, "adamw": 18.80},
    "paper-1b": {"fira": 14.31, "galore": 15.64, "adamw": 15.56},
}


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` with a ``--recipe``'s values as defaults (explicit flags still win)."""
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="the authors' pre-training hyperparameters (flags given override them)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.recipe is not None:
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    return args


def add_flags(parser: argparse.ArgumentParser, names: list[str] | None = None, config: type | None = None,
              **defaults: Any) -> None:  # fmt: skip
    """Adds ``--<name>`` flags for ``names`` (default: every field) of ``config`` (default
    :class:`TrainConfig`), with ``defaults`` overriding the config's."""
    config = config or TrainConfig
    fields = {f.name: f for f in dataclasses.fields(config)}
    group = parser.add_argument_group(f"configuration (lm/config.py: {config.__name__})")
    for name in names or list(fields):
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name, f.default)
        meta = dict(f.metadata)
        if f.type is bool:  # --name / --no-name
            meta["help"] += f" (default: {'on' if default else 'off'})"
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, **meta)
            continue
        typ = next(t for t in typing.get_args(f.type) if t is not type(None)) if typing.get_args(f.type) else f.type
        meta.setdefault("type", typ)  # a field may name its own parser (e.g. a count or a fraction)
        if default is not None and "default" not in meta["help"]:
            meta["help"] += f" (default: {default})".replace("%", "%%")
        group.add_argument(flag, dest=name, default=default, **meta)


def from_args(args: argparse.Namespace, config: type | None = None, **changes: Any) -> Any:
    """The ``config`` (default :class:`TrainConfig`) with every field the parser declared taken from ``args``."""
    config = config or TrainConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**(given | changes))


def check(cfg: TrainConfig) -> None:
    """Raises ValueError with a one-line message for a configuration that cannot run."""
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every", "update_proj_gap"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.rank is not None and cfg.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {cfg.rank}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.gamma < 1:
        raise ValueError(f"--gamma must be >= 1, got {cfg.gamma}")
    if cfg.apollo_scale is not None and not cfg.apollo_scale >= 0:
        raise ValueError(f"--apollo-scale must be >= 0, got {cfg.apollo_scale}")
    if cfg.weight_decay < 0 or cfg.checkpoint_every < 0 or (cfg.warmup is not None and cfg.warmup < 0):
        raise ValueError("--weight-decay, --checkpoint-every and --warmup must be >= 0")
    if cfg.warmup is not None and cfg.warmup >= cfg.steps:
        raise ValueError(f"--warmup {cfg.warmup} is not shorter than the run (--steps {cfg.steps}): pass a smaller one")
    if cfg.data is not None and not pathlib.Path(cfg.data).expanduser().exists():
        raise ValueError(f"--data {cfg.data}: no such file or folder")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--grad-accum {cfg.grad_accum} must be >= 1 and divide --batch-size {cfg.batch_size}")
    if cfg.moments == "reproject" and cfg.optimizer.startswith("apollo"):
        raise ValueError("--moments reproject needs orthonormal bases: APOLLO's random projection is not one")
    if cfg.grad_clip is not None and not cfg.grad_clip >= 0:
        raise ValueError(f"--grad-clip must be > 0 (or 0: no clipping), got {cfg.grad_clip}")
    if cfg.per_layer_updates and (cfg.grad_accum > 1 or cfg.grad_clip or cfg.ablation == "grad-clip"):
        raise ValueError(
            "--per-layer-updates applies each layer's update before the next layer's gradient exists: it cannot "
            "accumulate gradients (--grad-accum) or clip their global norm (--grad-clip, --ablation grad-clip; "
            "--grad-clip 0 drops a recipe's clip)"
        )
    _check_rank(cfg)
    profile_window(cfg)
    multi = (cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    if any(x is not None for x in multi) and not all(x is not None for x in multi):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together")
    if cfg.num_processes is not None and not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"--process-id {cfg.process_id} must be in [0, --num-processes {cfg.num_processes})")


def projected_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """The matrices (per layer) the example projects: the attention and MLP kernels, by name."""
    m = model_lib.PRESETS[preset]
    h, kv = m.hidden, m.num_kv_heads * m.head_dim
    return {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, m.intermediate), "down": (m.intermediate, h)}


def _check_rank(cfg: TrainConfig) -> None:
    """A rank at or above a projected matrix's smaller side leaves it full-rank (a state as large as
    AdamW's for it): on the command line that is a mistake."""
    if cfg.optimizer in ("adamw", "apollo-mini"):  # no rank, or rank 1
        return
    rank, shapes = cfg.resolved_rank(), projected_shapes(cfg.preset)
    met = {name: shape for name, shape in shapes.items() if min(shape) <= rank}
    if met:
        said = ", ".join(f"{name} {a} x {b}" for name, (a, b) in met.items())
        smallest = min(min(shape) for shape in shapes.values())
        raise ValueError(
            f"--rank {rank} is not below the smaller side of the {cfg.preset} preset's {said}: those would train "
            f"full-rank; pass a rank below {smallest}"
        )


class TooLargeError(ValueError):
    """A step that cannot fit in the devices' memory, found before anything is allocated."""


def check_fits(cfg: TrainConfig, vocab: int, rows_per_device: int, available: int | None, where: str) -> None:
    """Refuses, in one line with the estimate, a step whose activations alone exceed ``available``
    bytes per device: a lower bound, one float32 copy of the attention scores of one layer
    (rows x heads x seq_len²) and of the logits (rows x seq_len x vocabulary); what fits stays allowed."""
    if available is None:
        return
    m = model_lib.PRESETS[cfg.preset]
    rows = rows_per_device
    scores, logits = rows * m.heads * cfg.seq_len**2 * 4, rows * cfg.seq_len * vocab * 4
    if scores + logits > available:
        raise TooLargeError(
            f"--seq-len {cfg.seq_len}: one step needs at least {(scores + logits) / 2**30:,.1f} GiB per device "
            f"(attention scores {rows} x {m.heads} heads x {cfg.seq_len}² and logits {rows} x {cfg.seq_len} x "
            f"{vocab}, float32), more than the {available / 2**30:,.1f} GiB {where}: pass a shorter --seq-len or a "
            "smaller --batch-size"
        )


def profile_window(cfg: TrainConfig) -> tuple[int, int] | None:
    """``--profile START:STOP`` as the steps to trace, ``START <= step < STOP``; ValueError names a bad one."""
    if cfg.profile is None:
        return None
    try:
        start, stop = (int(x) for x in cfg.profile.split(":"))
    except ValueError:
        raise ValueError(f"--profile must be START:STOP (two step numbers), got {cfg.profile!r}") from None
    if not 0 <= start < stop <= cfg.steps:
        raise ValueError(f"--profile {cfg.profile}: need 0 <= START < STOP <= --steps {cfg.steps}")
    return start, stop
