"""AdamW vs GaLore vs Fira on the same tokens, seed and budget, each at its best learning rate.

Every optimizer trains once per learning rate of the same grid; the best final validation loss
of each is reported (a run whose result.json holds the same configuration is reused, not
rerun). Optionally (``--ablations``) Fira's Table-5 ablations run at Fira's best
learning rate. Writes results/compare.md and results/compare.png.

  python examples/compare.py                       # tiny preset, built-in corpus
  python examples/compare.py --preset 20m --steps 2000 --data c4/

With ``--rank-sweep``, Fira and GaLore run at each of ``--ranks`` (default hidden/32 ... hidden/2)
and ``--seeds`` against full-rank AdamW (see lm/sweep.py); writes results/rank_sweep.md,
results/rank_sweep.png and results/rank_sweep.json. ``--workers N`` runs N trainings at once.

  python examples/compare.py --rank-sweep --workers 2

With ``--family-sweep``, APOLLO (at ``--ranks``, default the rank sweep's), APOLLO-Mini (rank 1) and Fira with
``svd="subspace"`` run at the seeds of results/rank_sweep.json and are compared with its Fira,
GaLore and AdamW rows; writes results/family_sweep.md and results/family_sweep.json.

  python examples/compare.py --family-sweep --ranks 4
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import data as data_lib
from lm import files, optim, provenance, sweep
from lm import model as model_lib
from lm.runs import run_or_reuse
from lm.train import plot

COMPARE_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
SWEEP_LRS = [1e-2, 3e-2]  # Fira's and GaLore's best at rank 32 in results/compare.md
SWEEP_ADAMW_LRS = [1e-3, 3e-3]  # AdamW's best and its neighbour there
SHARED = ["preset", "steps", "batch_size", "seq_len", "rank", "update_proj_gap", "data", "seed", "eval_every"]


def parser() -> argparse.ArgumentParser:
    """The command line: the training flags :data:`SHARED` with train_lm.py, and the sweeps'."""
    p = config_lib.parser(__file__, __doc__)
    config_lib.add_flags(p, SHARED)
    lrs_help = f"learning-rate grid (default {COMPARE_LRS}; with --rank-sweep, Fira's and GaLore's: {SWEEP_LRS})"
    p.add_argument("--lrs", type=float, nargs="+", default=None, help=lrs_help)
    p.add_argument("--optimizers", nargs="+", default=["fira", "galore", "adamw"], choices=optim.OPTIMIZERS)
    p.add_argument("--ablations", action="store_true", help="also run Fira's ablations at its best lr")
    p.add_argument("--rank-sweep", action="store_true", help="Fira vs GaLore over --ranks and --seeds, vs AdamW")
    p.add_argument(
        "--family-sweep",
        action="store_true",
        help="APOLLO, APOLLO-Mini and Fira's subspace refresh vs results/rank_sweep.json's rows",
    )
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default hidden/32, /16, /8, /4, /2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="with --rank-sweep")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=SWEEP_ADAMW_LRS, help="AdamW's grid (--rank-sweep)")
    p.add_argument("--workers", type=int, default=1, help="trainings run at once, in separate processes")
    p.add_argument("--out", default="results")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    base = config_lib.from_args(args, progress=False)
    try:
        config_lib.check(base)
        if args.ranks is not None and min(args.ranks) < 1:
            raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
        if args.workers < 1 or len(set(args.seeds)) != len(args.seeds):
            raise ValueError("--workers must be >= 1 and --seeds distinct")
        out = files.check_folder(args.out, "--out")
        if args.family_sweep:
            page = family_sweep(args, base, out, argv)
        elif args.rank_sweep:
            page = rank_sweep(args, base, out, argv)
        else:
            page = learning_rate_grid(args, base, out, provenance.record(argv, __file__))
    except (ValueError, files.OutputError, data_lib.DataError) as e:
        p.error(str(e))
    print(page)


def family_sweep(args: argparse.Namespace, base: config_lib.TrainConfig, out: pathlib.Path, argv: list | None) -> str:
    """APOLLO, APOLLO-Mini and Fira's subspace refresh against results/rank_sweep.json's rows."""
    reference_file = out / "rank_sweep.json"
    if not reference_file.exists():
        raise ValueError(f"--family-sweep compares with {reference_file}: run --rank-sweep first")
    reference = json.loads(reference_file.read_text())
    lrs = args.lrs or SWEEP_LRS
    t0 = time.perf_counter()
    found = sweep.run_family(base, out, reference, lrs, args.workers, args.ranks)
    origin = provenance.record(argv, __file__)  # after the runs: the commit they ran at
    numbers = sweep.family_numbers(found, reference, base, lrs, origin, time.perf_counter() - t0)
    page = sweep.render_family(numbers)
    files.write_text(out / "family_sweep.md", page)
    files.write_text(out / "family_sweep.json", json.dumps(numbers, indent=1))
    return page


def rank_sweep(args: argparse.Namespace, base: config_lib.TrainConfig, out: pathlib.Path, argv: list | None) -> str:
    """Fira and GaLore at each rank and seed against full-rank AdamW."""
    hidden = model_lib.PRESETS[base.preset].hidden
    ranks = sorted(args.ranks or [max(1, hidden // d) for d in (32, 16, 8, 4, 2)])
    lrs = args.lrs or SWEEP_LRS
    t0 = time.perf_counter()
    cells = sweep.run_sweep(base, out, ranks, lrs, args.adamw_lrs, args.seeds, args.workers)
    origin = provenance.record(argv, __file__)  # after the runs: the commit they ran at
    numbers = sweep.numbers(cells, base, ranks, lrs, args.adamw_lrs, args.seeds, hidden, origin,
                            time.perf_counter() - t0)  # fmt: skip
    page = sweep.render(numbers)
    files.write_text(out / "rank_sweep.md", page)
    files.write_text(out / "rank_sweep.json", json.dumps(numbers, indent=1))
    sweep.plot(numbers, out / "rank_sweep.png", f"{base.preset}, {base.steps} steps: loss vs rank")
    return page


def learning_rate_grid(args: argparse.Namespace, base: config_lib.TrainConfig, out: pathlib.Path, origin: dict) -> str:
    """Each optimizer at each learning rate of the grid (and Fira's ablations at its best)."""
    lrs = args.lrs or COMPARE_LRS
    runs: list[dict] = []
    setup = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "seed": args.seed, "rank": base.resolved_rank(), "update_proj_gap": args.update_proj_gap,
             "lrs": lrs, "optimizers": args.optimizers}  # fmt: skip

    def run(**changes: object) -> None:
        cfg = dataclasses.replace(base, **changes)
        tag = f"{cfg.optimizer}" + (f"-{cfg.ablation}" if cfg.ablation != "none" else "") + f"-lr{cfg.lr:g}"
        cfg = dataclasses.replace(cfg, out=str(out / "runs" / tag))
        result = run_or_reuse(cfg, log=lambda msg: print(msg, flush=True))
        runs.append(result | {"tag": tag, "ablation": cfg.ablation})

    for name in args.optimizers:
        for lr in lrs:
            run(optimizer=name, lr=lr)
    best = best_runs(runs)
    if args.ablations and "fira" in best:
        for ablation in optim.ABLATIONS[1:]:
            run(optimizer="fira", lr=best["fira"]["lr"], ablation=ablation)
    saved = {
        "provenance": origin,
        "setup": setup,
        "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs],
    }
    files.write_text(out / "compare.json", json.dumps(saved, indent=1))
    page = render(saved)
    files.write_text(out / "compare.md", page)
    plot({f"{n} (lr {r['lr']:g})": r["records"] for n, r in best.items()}, out / "compare.png", f"{args.preset}")
    return page


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Each optimizer's run with the lowest final validation loss (ablations aside), in run order."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["ablation"] == "none" and (
            r["optimizer"] not in best or r["final_val_loss"] < best[r["optimizer"]]["final_val_loss"]
        ):
            best[r["optimizer"]] = r
    return best


def render(saved: dict) -> str:
    """results/compare.md from the contents of results/compare.json (tested to agree)."""
    setup, runs, prov = saved["setup"], saved["runs"], saved["provenance"]
    best = best_runs(runs)
    lines = [
        f"# {setup['preset']}: AdamW vs GaLore vs Fira",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}.",
        "",
        f"Built-in corpus unless --data; {setup['steps']} steps x {setup['batch_size']} x {setup['seq_len']} tokens, "
        f"seed {setup['seed']}, rank {setup['rank']}, update_proj_gap {setup['update_proj_gap']}, scale 0.25; "
        f"warmup 10% then cosine to 10% of lr; lr grid {setup['lrs']} for every optimizer.",
        "",
        "| optimizer | best lr | val loss | val ppl | optimizer state (MiB) | median step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in best.items():
        lines.append(
            f"| {name} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
            f"{r['optimizer_state_mib']:.2f} | {1e3 * r['median_step_s']:.0f} |"
        )
    lines += ["", "All runs (final validation loss):", ""]
    lines.append("| optimizer | " + " | ".join(f"lr {x:g}" for x in setup["lrs"]) + " |")
    lines.append("|---|" + "---|" * len(setup["lrs"]))
    for name in setup["optimizers"]:
        losses = {r["lr"]: r["final_val_loss"] for r in runs if r["optimizer"] == name and r["ablation"] == "none"}
        lines.append(f"| {name} | " + " | ".join(f"{losses.get(x, float('nan')):.4f}" for x in setup["lrs"]) + " |")
    ablations = [r for r in runs if r["ablation"] != "none"]
    if ablations:
        lines += ["", f"Fira ablations at lr {best['fira']['lr']:g} (paper Table 5):", ""]
        lines += ["| variant | val loss | val ppl |", "|---|---|---|"]
        lines.append(f"| fira | {best['fira']['final_val_loss']:.4f} | {best['fira']['final_val_ppl']:.2f} |")
        for r in ablations:
            lines.append(f"| {r['ablation']} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
