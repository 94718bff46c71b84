"""Train a LLaMA-style LM with Fira, GaLore or AdamW on a built-in corpus (or your data).

With no arguments: the ``tiny`` preset, Fira, on the Python standard library's sources read as
bytes, in a few minutes on a laptop CPU. The same command runs unchanged on GPU/TPU and on
several devices (data parallel; ``--mesh fsdp`` also shards the parameters).

  python examples/train_lm.py                                   # tiny, Fira, built-in corpus
  python examples/train_lm.py --optimizer adamw --lr 1e-3
  python examples/train_lm.py --preset 60m --data c4/ --steps 10000 --batch-size 512 --seq-len 256

Writes <out>/metrics.jsonl (one JSON object per logged step) and <out>/loss.png.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import model as model_lib
from lm import optim
from lm.train import TrainConfig, maybe_initialize_distributed, plot, train


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=optim.OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (paper: 0.01 for Fira/GaLore)")
    g.add_argument("--rank", type=int, default=None, help="projection rank (default hidden/4)")
    g.add_argument("--scale", type=float, default=d.scale)
    g.add_argument("--update-proj-gap", type=int, default=d.update_proj_gap)
    g.add_argument("--gamma", type=float, default=d.gamma, help="Fira's limiter; inf disables it")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--ablation", choices=optim.ABLATIONS, default=d.ablation, help="Fira ablations (paper Table 5)")
    g.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps)")
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(model_lib.PRESETS), default=d.preset)
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="compute dtype")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--data", default=None, help="text file, folder, or .jsonl/.json.gz with a 'text' field")
    g.add_argument("--out", default=d.out)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="0: never (orbax)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--mesh", choices=("data", "fsdp"), default=d.mesh)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    maybe_initialize_distributed()
    result = train(cfg)
    out = pathlib.Path(cfg.out)
    plot({cfg.optimizer: result["records"]}, out / "loss.png", f"{cfg.optimizer} on {cfg.preset}")
    summary = {k: v for k, v in result.items() if k != "records"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nfinal validation loss {result['final_val_loss']:.4f}, perplexity {result['final_val_ppl']:.2f}\n"
        f"optimizer state {result['optimizer_state_mib']:.2f} MiB ({cfg.optimizer}) vs "
        f"{result['adamw_state_mib']:.2f} MiB (AdamW, same model)\n"
        f"wall time {result['wall_s']:.0f} s, median step {1e3 * result['median_step_s']:.0f} ms\n"
        f"metrics: {out / 'metrics.jsonl'}, plot: {out / 'loss.png'}"
    )
    return result


if __name__ == "__main__":
    main()
