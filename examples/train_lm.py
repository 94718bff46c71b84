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
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import data as data_lib
from lm.train import TrainConfig, maybe_initialize_distributed, plot, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_flags(p)
    cfg = config_lib.from_args(p.parse_args(argv))
    try:
        config_lib.check(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg, p


def main(argv: list[str] | None = None) -> dict:
    cfg, parser = parse_args(argv)
    maybe_initialize_distributed()
    if cfg.batch_size % jax.device_count():
        parser.error(f"--batch-size {cfg.batch_size} must be divisible by the {jax.device_count()} devices")
    try:
        result = train(cfg)
    except data_lib.DataError as e:  # the user's data: a one-line usage error, not a traceback
        parser.error(str(e))
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
