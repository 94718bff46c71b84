"""The one training configuration, and the command-line flags derived from it.

Every script (``train_lm.py``, ``compare.py``, ``similarity.py``) builds its flags from
:class:`TrainConfig` with :func:`add_flags`, so names, types, defaults and help are declared once,
here. A command-line mistake is reported by :func:`check` as a one-line usage error.
"""

import argparse
import dataclasses
import math
import pathlib
import typing
from typing import Any

from lm import model as model_lib
from lm import optim


def _field(default: Any, help: str, **flag: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **flag})


@dataclasses.dataclass
class TrainConfig:
    # optimizer
    optimizer: str = _field("fira", "optimizer", choices=optim.OPTIMIZERS)
    lr: float = _field(1e-2, "peak learning rate (paper: 0.01 for Fira/GaLore)")
    warmup: int | None = _field(None, "warmup steps (default 10%% of --steps)")
    rank: int | None = _field(None, "projection rank (default hidden/4: 128 for 60m, as in the paper)")
    scale: float = _field(0.25, "scale of the low-rank update (alpha; paper 0.25)")
    update_proj_gap: int = _field(200, "steps between refreshes of the projection")
    gamma: float = _field(1.01, "Fira's norm-growth limit; inf disables it")
    weight_decay: float = _field(0.0, "decoupled weight decay, on the kernels only")
    ablation: str = _field("none", "Fira ablations (paper Table 5)", choices=optim.ABLATIONS)
    # model and data
    preset: str = _field("tiny", "model size", choices=sorted(model_lib.PRESETS))
    dtype: str = _field("float32", "compute dtype", choices=("float32", "bfloat16"))
    data: str | None = _field(None, "text file, folder, or .jsonl/.json.gz with a 'text' field (default: built-in)")
    # run
    steps: int = _field(1000, "training steps")
    batch_size: int = _field(16, "sequences per step (global, over all devices)")
    seq_len: int = _field(128, "tokens per sequence")
    seed: int = _field(0, "seed of the initialization and of the data order")
    out: str = _field("runs/lm", "output folder (metrics.jsonl, loss.png, checkpoints)")
    eval_every: int = _field(100, "validate every this many steps")
    eval_batches: int = _field(20, "validation batches per evaluation")
    log_every: int = _field(10, "log the running training loss every this many steps")
    checkpoint_every: int = _field(0, "save an orbax checkpoint every this many steps; 0: never")
    resume: bool = _field(False, "continue from the latest checkpoint in --out")
    mesh: str = _field("data", "data: replicate params; fsdp: also shard them over devices", choices=("data", "fsdp"))
    progress: bool = _field(True, "show a progress bar")

    def resolved_rank(self) -> int:
        return self.rank if self.rank is not None else model_lib.PRESETS[self.preset].hidden // 4

    def resolved_warmup(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def add_flags(parser: argparse.ArgumentParser, names: list[str] | None = None, **defaults: Any) -> None:
    """Adds ``--<name>`` flags for ``names`` (default: every field), with ``defaults`` overriding the config's."""
    group = parser.add_argument_group("training configuration (lm/config.py)")
    for name in names or list(FIELDS):
        f = FIELDS[name]
        flag = "--" + name.replace("_", "-")
        default = defaults.get(name, f.default)
        meta = dict(f.metadata)
        if f.type is bool:
            if default:
                group.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=meta["help"])
            else:
                group.add_argument(flag, dest=name, action="store_true", help=meta["help"])
            continue
        typ = next(t for t in typing.get_args(f.type) if t is not type(None)) if typing.get_args(f.type) else f.type
        group.add_argument(flag, dest=name, type=typ, default=default, **meta)


def from_args(args: argparse.Namespace, **changes: Any) -> TrainConfig:
    """The config with every field the parser declared taken from ``args``."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return TrainConfig(**(given | changes))


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
    if cfg.weight_decay < 0 or cfg.checkpoint_every < 0 or (cfg.warmup is not None and cfg.warmup < 0):
        raise ValueError("--weight-decay, --checkpoint-every and --warmup must be >= 0")
    if cfg.data is not None and not pathlib.Path(cfg.data).expanduser().exists():
        raise ValueError(f"--data {cfg.data}: no such file or folder")
