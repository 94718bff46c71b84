"""The rank sweep: Fira vs GaLore at falling rank, against full-rank AdamW, over seeds.

The paper's thesis predicts where Fira matters: as the rank falls, GaLore is confined to an
ever smaller subspace while Fira still trains with the full gradient. For each rank, Fira and
GaLore run over the same learning-rate grid, AdamW over its own; the learning rate of each cell
(optimizer × rank) is chosen on the first seed, and the other seeds run at it. Same seed means
same initialization and data order, so differences are paired per seed.
"""

import dataclasses
import math
import pathlib

import numpy as np

from lm.config import TrainConfig
from lm.runs import run_all

LOW_RANK = ("fira", "galore")


def sweep_configs(base: TrainConfig, out: pathlib.Path, ranks: list[int], lrs: list[float], adamw_lrs: list[float],
                  seed: int) -> dict[tuple, TrainConfig]:  # fmt: skip
    """Every run of one seed: {(optimizer, rank or None, lr): config}."""
    cfgs = {}
    for name in LOW_RANK:
        for rank in ranks:
            for lr in lrs:
                cfgs[(name, rank, lr)] = dataclasses.replace(
                    base, optimizer=name, rank=rank, lr=lr, seed=seed, progress=False,
                    out=str(out / "runs" / "rank_sweep" / f"{name}-r{rank}-lr{lr:g}-s{seed}"),
                )  # fmt: skip
    for lr in adamw_lrs:
        cfgs[("adamw", None, lr)] = dataclasses.replace(
            base, optimizer="adamw", rank=None, lr=lr, seed=seed, progress=False,
            out=str(out / "runs" / "rank_sweep" / f"adamw-lr{lr:g}-s{seed}"),
        )  # fmt: skip
    return cfgs


def run_sweep(base: TrainConfig, out: pathlib.Path, ranks: list[int], lrs: list[float], adamw_lrs: list[float],
              seeds: list[int], workers: int = 1) -> dict:  # fmt: skip
    """Runs (or reuses) the sweep; returns {(optimizer, rank): {"lr", "losses": {seed: loss}}}."""
    first = sweep_configs(base, out, ranks, lrs, adamw_lrs, seeds[0])
    results = dict(zip(first, run_all(list(first.values()), workers), strict=True))
    cells: dict[tuple, dict] = {}
    for (name, rank, lr), r in results.items():
        cell = cells.setdefault((name, rank), {"lr": lr, "grid": {}})
        cell["grid"][lr] = r["final_val_loss"]
        if r["final_val_loss"] < cell["grid"][cell["lr"]] or not math.isfinite(cell["grid"][cell["lr"]]):
            cell["lr"] = lr
    later = []
    for seed in seeds[1:]:
        configs = sweep_configs(base, out, ranks, lrs, adamw_lrs, seed)
        later += [(key, seed, configs[(key[0], key[1], cell["lr"])]) for key, cell in cells.items()]
    later_results = run_all([c for _, _, c in later], workers)
    for cell in cells.values():
        cell["losses"] = {seeds[0]: cell["grid"][cell["lr"]]}
    for (cell_key, seed, _), r in zip(later, later_results, strict=True):
        cells[cell_key]["losses"][seed] = r["final_val_loss"]
    return cells


def _mean_std(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def report(cells: dict, base: TrainConfig, ranks: list[int], lrs: list[float], adamw_lrs: list[float],
           seeds: list[int], hidden: int, wall_s: float | None = None) -> tuple[str, dict]:  # fmt: skip
    """The markdown page and its numbers (paired differences per rank)."""
    adamw = cells[("adamw", None)]
    lines = [
        f"# Rank sweep: Fira vs GaLore vs full-rank AdamW ({base.preset})",
        "",
        f"{base.preset} preset, {base.steps} steps × {base.batch_size} × {base.seq_len} tokens per run, "
        f"built-in corpus unless --data; seeds {seeds}; update_proj_gap {base.update_proj_gap}, "
        f"scale {base.scale}. Learning rate of each cell chosen on seed {seeds[0]} from {lrs} (Fira and GaLore) "
        f"or {adamw_lrs} (AdamW), then used for every seed. Final validation loss (nats per byte), "
        "mean ± std over seeds.",
        "",
        "| rank | Fira | GaLore | Fira − GaLore (mean [min, max]) | Fira − AdamW (mean [min, max]) |",
        "|---|---|---|---|---|",
    ]
    numbers: dict = {"ranks": {}, "adamw": {"lr": adamw["lr"], "losses": adamw["losses"]}}
    for rank in ranks:
        fira, galore = cells[("fira", rank)], cells[("galore", rank)]
        d_galore = [fira["losses"][s] - galore["losses"][s] for s in seeds]
        d_adamw = [fira["losses"][s] - adamw["losses"][s] for s in seeds]
        numbers["ranks"][rank] = {
            "fira": fira, "galore": galore, "fira_minus_galore": d_galore, "fira_minus_adamw": d_adamw,
        }  # fmt: skip

        def paired(d: list[float]) -> str:
            sign = " (every seed < 0)" if max(d) < 0 else (" (every seed > 0)" if min(d) > 0 else " (sign varies)")
            return f"{np.mean(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]{sign}"

        fraction = f"h/{hidden // rank}" if hidden % rank == 0 else f"{rank / hidden:.3g}h"
        lines.append(
            f"| {rank} ({fraction}) | {_mean_std(list(fira['losses'].values()))} (lr {fira['lr']:g}) | "
            f"{_mean_std(list(galore['losses'].values()))} (lr {galore['lr']:g}) | {paired(d_galore)} | "
            f"{paired(d_adamw)} |"
        )
    lines.append(f"| AdamW (full rank) | {_mean_std(list(adamw['losses'].values()))} (lr {adamw['lr']:g}) | | | |")
    lines += ["", "Per seed (Fira / GaLore / AdamW):", "", "| rank | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for rank in ranks:
        f, g = cells[("fira", rank)]["losses"], cells[("galore", rank)]["losses"]
        lines.append(
            f"| {rank} | " + " | ".join(f"{f[s]:.4f} / {g[s]:.4f} / {adamw['losses'][s]:.4f}" for s in seeds) + " |"
        )
    lines += ["", f"Learning-rate grid on seed {seeds[0]} (final validation loss):", ""]
    lines += ["| optimizer | rank | " + " | ".join(f"lr {x:g}" for x in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for rank in ranks:
        for name in LOW_RANK:
            grid = cells[(name, rank)]["grid"]
            lines.append(f"| {name} | {rank} | " + " | ".join(f"{grid[x]:.4f}" for x in lrs) + " |")
    lines.append("| adamw | full | " + " | ".join(f"{adamw['grid'][x]:.4f}" for x in adamw_lrs) + " |")
    if wall_s is not None:
        lines += ["", f"Wall time of the runs this invocation trained: {wall_s / 60:.1f} min."]
    return "\n".join(lines) + "\n", numbers


def plot(cells: dict, ranks: list[int], seeds: list[int], path: pathlib.Path, title: str) -> None:
    """Validation loss vs rank (log-x): one line per optimizer, the seeds' range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, name in enumerate(LOW_RANK):
        losses = np.array([[cells[(name, r)]["losses"][s] for s in seeds] for r in ranks])
        ax.plot(ranks, losses.mean(axis=1), "o-", color=f"C{i}", label=f"{name} (mean over {len(seeds)} seeds)")
        ax.fill_between(ranks, losses.min(axis=1), losses.max(axis=1), color=f"C{i}", alpha=0.2)
    adamw = np.array(list(cells[("adamw", None)]["losses"].values()))
    ax.axhline(adamw.mean(), color="C2", ls="--", label="AdamW, full rank (mean)")
    ax.axhspan(adamw.min(), adamw.max(), color="C2", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank of the optimizer state's subspace")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend(title="bands: min–max over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
