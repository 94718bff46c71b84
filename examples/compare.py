"""AdamW vs GaLore vs Fira on the same tokens, seed and budget, each at its best learning rate.

Every optimizer trains once per learning rate of the same grid; the best final validation loss
of each is reported (a run whose result.json holds the same configuration is reused, not
rerun). Optionally (``--ablations``) Fira's Table-5 ablations run at Fira's best
learning rate. Writes results/compare.md and results/compare.png.

  python examples/compare.py                       # tiny preset, built-in corpus
  python examples/compare.py --preset 20m --steps 2000 --data c4/
"""

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import data as data_lib
from lm import optim
from lm.train import plot, train

SHARED = ["preset", "steps", "batch_size", "seq_len", "rank", "update_proj_gap", "data", "seed", "eval_every"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_flags(p, SHARED)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--optimizers", nargs="+", default=list(optim.OPTIMIZERS), choices=optim.OPTIMIZERS)
    p.add_argument("--ablations", action="store_true", help="also run Fira's ablations at its best lr")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    base = config_lib.from_args(args, progress=False)
    try:
        config_lib.check(base)
    except ValueError as e:
        p.error(str(e))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []

    def run(**changes: object) -> dict:
        cfg = dataclasses.replace(base, **changes)
        tag = f"{cfg.optimizer}" + (f"-{cfg.ablation}" if cfg.ablation != "none" else "") + f"-lr{cfg.lr:g}"
        cfg = dataclasses.replace(cfg, out=str(out / "runs" / tag))
        saved = pathlib.Path(cfg.out) / "result.json"
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
        if saved.exists() and json.loads(saved.read_text())["config"] == config:
            print(f"== {tag}: reusing {saved}", flush=True)  # same config: the run is deterministic
            result = json.loads(saved.read_text())["result"]
        else:
            print(f"== {tag}", flush=True)
            try:
                result = train(cfg, log=lambda msg: print("   ", msg, flush=True))
            except data_lib.DataError as e:
                p.error(str(e))
            result["tag"], result["ablation"] = tag, cfg.ablation
            saved.write_text(json.dumps({"config": config, "result": result}))
        runs.append(result)
        (out / "compare.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "records"} for r in runs]))
        return result

    best: dict[str, dict] = {}
    for name in args.optimizers:
        for lr in args.lrs:
            r = run(optimizer=name, lr=lr)
            if name not in best or r["final_val_loss"] < best[name]["final_val_loss"]:
                best[name] = r
    ablations = []
    if args.ablations and "fira" in best:
        for ablation in optim.ABLATIONS[1:]:
            ablations.append(run(optimizer="fira", lr=best["fira"]["lr"], ablation=ablation))

    rank = base.resolved_rank()
    lines = [
        f"# {args.preset}: AdamW vs GaLore vs Fira",
        "",
        f"Built-in corpus unless --data; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
        f"seed {args.seed}, rank {rank}, update_proj_gap {args.update_proj_gap}, scale 0.25; "
        f"warmup 10% then cosine to 10% of lr; lr grid {args.lrs} for every optimizer.",
        "",
        "| optimizer | best lr | val loss | val ppl | optimizer state (MiB) | median step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in best.items():
        lines.append(
            f"| {name} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
            f"{r['optimizer_state_mib']:.2f} | {1e3 * r['median_step_s']:.0f} |"
        )
    lines += [
        "",
        "All runs (final validation loss):",
        "",
        "| optimizer | " + " | ".join(f"lr {x:g}" for x in args.lrs) + " |",
    ]
    lines.append("|---|" + "---|" * len(args.lrs))
    for name in args.optimizers:
        losses = {r["lr"]: r["final_val_loss"] for r in runs if r["optimizer"] == name and r["ablation"] == "none"}
        lines.append(f"| {name} | " + " | ".join(f"{losses.get(x, float('nan')):.4f}" for x in args.lrs) + " |")
    if ablations:
        lines += ["", f"Fira ablations at lr {best['fira']['lr']:g} (paper Table 5):", ""]
        lines += ["| variant | val loss | val ppl |", "|---|---|---|"]
        lines.append(f"| fira | {best['fira']['final_val_loss']:.4f} | {best['fira']['final_val_ppl']:.2f} |")
        for r in ablations:
            lines.append(f"| {r['ablation']} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    plot({f"{n} (lr {r['lr']:g})": r["records"] for n, r in best.items()}, out / "compare.png", f"{args.preset}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
