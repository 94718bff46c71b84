"""What Adam's moments should become at a refresh: keep (the authors' code), reset, or re-project.

Trains the example LM (``examples/train_lm.py``'s tiny preset on the built-in corpus, steps of
16 x 128 bytes; by default 1,000 steps with a refresh every 200) with Fira and GaLore under each
``fira_jax.Refresh(moments=...)`` policy, over seeds (same seed: same initialization and data
order, so differences are paired), and writes ``results/moment_policy.json`` and ``.md`` with the
command, the commit and the machine. Finished runs are reused (examples/lm/runs.py).

    python benchmarks/moment_policy.py --optimizers fira --rank 4 --lr 0.03 --steps 500 --update-proj-gap 100
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from lm import files, provenance  # noqa: E402
from lm.config import TrainConfig  # noqa: E402
from lm.runs import run_all  # noqa: E402

POLICIES = ("keep", "reset", "reproject")
OPTIMIZERS = ("fira", "galore")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.03, help="every run's peak learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--runs", default="runs/moment_policy", help="where the runs' folders go")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.steps < 1 or args.update_proj_gap < 1 or not args.lr > 0:
        parser.error("--rank, --steps and --update-proj-gap must be >= 1 and --lr > 0")
    base = TrainConfig(rank=args.rank, lr=args.lr, steps=args.steps, update_proj_gap=args.update_proj_gap,
                       progress=False)  # fmt: skip
    cfgs = {}
    for name in args.optimizers:
        for policy in POLICIES:
            for seed in args.seeds:
                out = f"{args.runs}/{name}-{policy}-r{args.rank}-lr{args.lr:g}-s{seed}"
                cfgs[(name, policy, seed)] = dataclasses.replace(
                    base, optimizer=name, moments=policy, seed=seed, out=out
                )
    t0 = time.perf_counter()
    results = dict(zip(cfgs, run_all(list(cfgs.values())), strict=True))
    losses = {f"{n}/{p}": {str(s): results[(n, p, s)]["final_val_loss"] for s in args.seeds}
              for n in args.optimizers for p in POLICIES}  # fmt: skip
    saved = {
        "setup": {"preset": base.preset, "steps": args.steps, "batch_size": base.batch_size, "seq_len": base.seq_len,
                  "rank": args.rank, "lr": args.lr, "update_proj_gap": base.update_proj_gap, "seeds": args.seeds},
        "final_val_loss": losses,
        "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
        "provenance": provenance.record(argv, __file__),
    }  # fmt: skip
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "moment_policy.json", json.dumps(saved, indent=1))
    files.write_text(out / "moment_policy.md", render(saved))
    print(render(saved))


def render(saved: dict) -> str:
    """results/moment_policy.md from results/moment_policy.json."""
    setup, losses = saved["setup"], saved["final_val_loss"]
    lines = [
        "# Adam's moments at a refresh: keep, reset or re-project (tiny)",
        "",
        f"`{saved['provenance']['command']}`",
        "",
        f"Made on {provenance.describe(saved['provenance'])}.",
        "",
        f"{setup['preset']} preset, {setup['steps']} steps × {setup['batch_size']} × {setup['seq_len']} bytes of the "
        f"built-in corpus, rank {setup['rank']}, learning rate {setup['lr']:g}, a refresh every "
        f"{setup['update_proj_gap']} steps (exact SVD, canonical signs); seeds {setup['seeds']} (same seed: same "
        "initialization and data order). Final validation loss (nats per byte), mean ± std over seeds, and the "
        "paired difference from `keep` (the authors' code) per seed.",
        "",
        "| optimizer | moments | final val loss | − keep, per seed |",
        "|---|---|---|---|",
    ]
    for key, per_seed in losses.items():
        name, policy = key.split("/")
        values = list(per_seed.values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        keep = losses[f"{name}/keep"]
        diffs = ", ".join(f"{per_seed[s] - keep[s]:+.4f}" for s in per_seed) if policy != "keep" else ""
        lines.append(f"| {name} | {policy} | {statistics.mean(values):.4f} ± {spread:.4f} | {diffs} |")
    lines += ["", f"Wall time of the runs this invocation trained: {saved['wall_minutes']} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
