"""Train a LLaMA-style LM with Fira, GaLore or AdamW on a built-in corpus (or your data).

With no arguments: the ``tiny`` preset, Fira, on the Python standard library's sources read as
bytes, in a few minutes on a laptop CPU. The same command runs unchanged on GPU/TPU and on
several devices (``--mesh``: by default every device shards the batch and the parameters;
``--mesh data=2,fsdp=2,tensor=2`` adds data and tensor parallelism).

  python examples/train_lm.py                                   # tiny, Fira, built-in corpus
  python examples/train_lm.py --optimizer adamw --lr 1e-3
  python examples/train_lm.py --data prepared/ --preset 20m      # a folder from prepare_data.py
  python examples/train_lm.py --recipe paper-60m --data c4-t5/   # the authors' 60M recipe

Writes <out>/metrics.jsonl (one JSON object per logged step), <out>/loss.png and
<out>/summary.json (the final figures, the configuration and where the run came from); with
--export DIR, also a Hugging Face checkpoint in DIR.
"""

import argparse
import json
import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import checkpoints, files, loop
from lm import config as config_lib
from lm import data as data_lib
from lm import sharding as sharding_lib
from lm import tokenizer as tokenizer_lib
from lm.train import TrainConfig, maybe_initialize_distributed, plot, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.ArgumentParser]:
    p = config_lib.parser(__file__, __doc__)
    config_lib.add_flags(p)
    args = config_lib.parse(p, argv)
    cfg = config_lib.from_args(args)
    try:
        config_lib.check(cfg)
        prepared = cfg.data is not None and (pathlib.Path(cfg.data).expanduser() / "meta.json").exists()
        if args.recipe is not None and cfg.tokenizer is None and not prepared:
            raise ValueError(
                f"--recipe {args.recipe} trains with T5's tokenizer: pass --tokenizer path/to/spiece.model "
                "(or --data a folder prepare_data.py made with it)"
            )
    except ValueError as e:
        p.error(str(e))
    return cfg, p


def main(argv: list[str] | None = None) -> dict:
    cfg, parser = parse_args(argv)
    maybe_initialize_distributed(cfg)
    try:
        sizes = sharding_lib.parse_mesh(cfg.mesh, jax.device_count())
    except sharding_lib.MeshError as e:
        parser.error(str(e))
    rows = sharding_lib.batch_rows(sizes)
    if cfg.batch_size // cfg.grad_accum % rows:
        parser.error(
            f"--batch-size {cfg.batch_size} / --grad-accum {cfg.grad_accum} must be divisible by the mesh's "
            f"data x fsdp = {rows} devices"
        )
    try:
        result = train(cfg)
    except loop.StoppedError as e:
        sys.exit(loop.stopped(e.done, cfg.out, cfg.checkpoint_every))
    except KeyboardInterrupt:  # before the loop (data, compilation), or a second Ctrl-C
        sys.exit(loop.stopped(None, cfg.out, cfg.checkpoint_every))
    except checkpoints.FinishedError as e:
        return checkpoints.finished(e, cfg.out)
    except (data_lib.DataError, tokenizer_lib.TokenizerError, files.OutputError, checkpoints.CheckpointError,
            sharding_lib.MeshError, config_lib.TooLargeError) as e:  # fmt: skip
        parser.error(str(e))  # a one-line usage error, not a traceback
    if jax.process_index() != 0:
        return result
    out = pathlib.Path(cfg.out)
    plot({cfg.optimizer: result["records"]}, out / "loss.png", f"{cfg.optimizer} on {cfg.preset}")
    summary = {k: v for k, v in result.items() if k != "records"}
    files.write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(
        f"\nfinal validation loss {result['final_val_loss']:.4f} nats/token, perplexity {result['final_val_ppl']:.2f}, "
        f"{result['final_val_bpb']:.3f} bits/byte ({result['tokenizer']})\n"
        f"throughput {result['tokens_per_s']:,.0f} tokens/s (median step)"
        + (f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else "")
        + (f", peak device memory {result['peak_bytes_in_use'] / 2**30:.2f} GiB" if result["peak_bytes_in_use"] else "")
        + "\n"
        f"optimizer state {result['optimizer_state_mib']:.2f} MiB ({cfg.optimizer}) vs "
        f"{result['adamw_state_mib']:.2f} MiB (AdamW, same model)\n"
        f"wall time {result['wall_s']:.0f} s, median step {1e3 * result['median_step_s']:.0f} ms\n"
        f"metrics: {out / 'metrics.jsonl'}, plot: {out / 'loss.png'}, summary: {out / 'summary.json'}"
        + (f"\nexported (Hugging Face format) to {cfg.export}" if cfg.export else "")
    )
    return result


if __name__ == "__main__":
    main()
