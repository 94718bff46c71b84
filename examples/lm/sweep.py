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


def numbers(cells: dict, base: TrainConfig, ranks: list[int], lrs: list[float], adamw_lrs: list[float],
            seeds: list[int], hidden: int, origin: dict, wall_s: float | None = None) -> dict:  # fmt: skip
    """results/rank_sweep.json: the cells (string keys: ranks, seeds, learning rates), the paired
    differences per rank, the setup and the provenance; :func:`render` makes the page from it."""

    def cell(c: dict) -> dict:
        return {"lr": c["lr"], "grid": {str(k): v for k, v in c["grid"].items()},
                "losses": {str(k): v for k, v in c["losses"].items()}}  # fmt: skip

    adamw = cells[("adamw", None)]
    out: dict = {
        "provenance": origin,
        "setup": {"preset": base.preset, "steps": base.steps, "batch_size": base.batch_size, "seq_len": base.seq_len,
                  "update_proj_gap": base.update_proj_gap, "scale": base.scale, "ranks": ranks, "lrs": lrs,
                  "adamw_lrs": adamw_lrs, "seeds": seeds, "hidden": hidden, "wall_s": wall_s},
        "ranks": {},
        "adamw": cell(adamw),
    }  # fmt: skip
    for rank in ranks:
        fira, galore = cells[("fira", rank)], cells[("galore", rank)]
        out["ranks"][str(rank)] = {
            "fira": cell(fira), "galore": cell(galore),
            "fira_minus_galore": [fira["losses"][s] - galore["losses"][s] for s in seeds],
            "fira_minus_adamw": [fira["losses"][s] - adamw["losses"][s] for s in seeds],
        }  # fmt: skip
    return out


def render(numbers: dict) -> str:
    """results/rank_sweep.md from the contents of results/rank_sweep.json (tested to agree)."""
    from lm import provenance

    setup, adamw, prov = numbers["setup"], numbers["adamw"], numbers["provenance"]
    seeds, lrs, adamw_lrs = [str(s) for s in setup["seeds"]], setup["lrs"], setup["adamw_lrs"]
    lines = [
        f"# Rank sweep: Fira vs GaLore vs full-rank AdamW ({setup['preset']})",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}.",
        "",
        f"{setup['preset']} preset, {setup['steps']} steps × {setup['batch_size']} × {setup['seq_len']} tokens per "
        f"run, built-in corpus unless --data; seeds {setup['seeds']}; update_proj_gap {setup['update_proj_gap']}, "
        f"scale {setup['scale']}. Learning rate of each cell chosen on seed {seeds[0]} from {lrs} (Fira and GaLore) "
        f"or {adamw_lrs} (AdamW), then used for every seed. Final validation loss (nats per byte), "
        "mean ± std over seeds.",
        "",
        "| rank | Fira | GaLore | Fira − GaLore (mean [min, max]) | Fira − AdamW (mean [min, max]) |",
        "|---|---|---|---|---|",
    ]

    def paired(d: list[float]) -> str:
        sign = " (every seed < 0)" if max(d) < 0 else (" (every seed > 0)" if min(d) > 0 else " (sign varies)")
        return f"{np.mean(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]{sign}"

    hidden = setup["hidden"]
    for rank in setup["ranks"]:
        row = numbers["ranks"][str(rank)]
        fira, galore = row["fira"], row["galore"]
        fraction = f"h/{hidden // rank}" if hidden % rank == 0 else f"{rank / hidden:.3g}h"
        lines.append(
            f"| {rank} ({fraction}) | {_mean_std(list(fira['losses'].values()))} (lr {fira['lr']:g}) | "
            f"{_mean_std(list(galore['losses'].values()))} (lr {galore['lr']:g}) | "
            f"{paired(row['fira_minus_galore'])} | {paired(row['fira_minus_adamw'])} |"
        )
    lines.append(f"| AdamW (full rank) | {_mean_std(list(adamw['losses'].values()))} (lr {adamw['lr']:g}) | | | |")
    lines += ["", "Per seed (Fira / GaLore / AdamW):", "", "| rank | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for rank in setup["ranks"]:
        f, g = numbers["ranks"][str(rank)]["fira"]["losses"], numbers["ranks"][str(rank)]["galore"]["losses"]
        lines.append(
            f"| {rank} | " + " | ".join(f"{f[s]:.4f} / {g[s]:.4f} / {adamw['losses'][s]:.4f}" for s in seeds) + " |"
        )
    lines += ["", f"Learning-rate grid on seed {seeds[0]} (final validation loss):", ""]
    lines += ["| optimizer | rank | " + " | ".join(f"lr {x:g}" for x in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for rank in setup["ranks"]:
        for name in LOW_RANK:
            grid = numbers["ranks"][str(rank)][name]["grid"]
            lines.append(f"| {name} | {rank} | " + " | ".join(f"{grid[str(x)]:.4f}" for x in lrs) + " |")
    lines += [
        "",
        "| optimizer | " + " | ".join(f"lr {x:g}" for x in adamw_lrs) + " |",
        "|---|" + "---|" * len(adamw_lrs),
    ]
    lines.append("| adamw (full rank) | " + " | ".join(f"{adamw['grid'][str(x)]:.4f}" for x in adamw_lrs) + " |")
    if setup["wall_s"] is not None:
        lines += ["", f"Wall time of the runs this invocation trained: {setup['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(numbers: dict, path: pathlib.Path, title: str) -> None:
    """Validation loss vs rank (log-x) from the sweep's JSON: per optimizer and rank, the seeds' mean
    with their min-max range as an error bar (the ranks are separate measurements: no line joins
    them); AdamW, full rank, as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = numbers["setup"]["ranks"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, name in enumerate(LOW_RANK):
        losses = np.array([list(numbers["ranks"][str(r)][name]["losses"].values()) for r in ranks])
        mean = losses.mean(axis=1)
        x = np.array(ranks, float) * (1.06 if i else 1 / 1.06)  # side by side, not on top of each other
        ax.errorbar(x, mean, yerr=[mean - losses.min(axis=1), losses.max(axis=1) - mean], fmt="o", capsize=4,
                    color=f"C{i}", label=f"{name} (mean over {losses.shape[1]} seeds)")  # fmt: skip
    adamw = np.array(list(numbers["adamw"]["losses"].values()))
    ax.axhline(adamw.mean(), color="C2", ls="--", label="AdamW, full rank (mean)")
    ax.axhspan(adamw.min(), adamw.max(), color="C2", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank of the optimizer state's subspace")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend(title="bars and band: min–max over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The family sweep: APOLLO, APOLLO-Mini and Fira's cheaper refresh beside the rank sweep's rows.
# ---------------------------------------------------------------------------


def family_cells(ranks: list[int]) -> list[tuple[str, int, dict, bool]]:
    """(label, rank, TrainConfig changes, whether its learning rate is chosen on a grid) per cell.

    A cell without a grid is a Fira refresh variant: it runs at exact-SVD Fira's learning rate for
    that rank, so that the comparison with exact Fira is paired (same lr, seeds and data order).
    """
    cells = [("APOLLO", r, {"optimizer": "apollo", "rank": r}, True) for r in ranks]
    cells.append(("APOLLO-Mini", 1, {"optimizer": "apollo-mini", "rank": 1}, True))
    cells += [("Fira, svd=subspace", r, {"optimizer": "fira", "rank": r, "svd": "subspace"}, False) for r in ranks]
    return cells


def _family_config(base: TrainConfig, out: pathlib.Path, label: str, rank: int, changes: dict, lr: float,
                   seed: int) -> TrainConfig:  # fmt: skip
    tag = label.lower().replace(", svd=", "-").replace(" ", "")
    return dataclasses.replace(base, **changes, lr=lr, seed=seed, progress=False,
                               out=str(out / "runs" / "family_sweep" / f"{tag}-r{rank}-lr{lr:g}-s{seed}"))  # fmt: skip


def run_family(base: TrainConfig, out: pathlib.Path, reference: dict, lrs: list[float], workers: int = 1,
               ranks: list[int] | None = None) -> dict:  # fmt: skip
    """Runs (or reuses) the family sweep at ``ranks`` (default: the rank sweep's) and the rank
    sweep's seeds (``reference``: the contents of results/rank_sweep.json). Returns {"cells": [...],
    "check": {...}}: each cell with its lr, grid and losses per seed; ``check`` re-runs exact Fira
    at the first rank on the first seed, to show that the reference's rows still hold for this code."""
    seeds = reference["setup"]["seeds"]
    ranks = ranks or reference["setup"]["ranks"]
    missing = [r for r in ranks if str(r) not in reference["ranks"]]
    if missing:
        raise ValueError(f"--ranks {missing}: results/rank_sweep.json has no Fira row at that rank to compare with")
    cells = family_cells(ranks)
    first: list[tuple[int, float, TrainConfig]] = []
    for i, (label, rank, changes, grid) in enumerate(cells):
        for lr in lrs if grid else [reference["ranks"][str(rank)]["fira"]["lr"]]:
            first.append((i, lr, _family_config(base, out, label, rank, changes, lr, seeds[0])))
    fira_lr = reference["ranks"][str(ranks[0])]["fira"]["lr"]
    check_out = out / "runs" / "family_sweep" / f"check-fira-r{ranks[0]}-s{seeds[0]}"
    check_cfg = dataclasses.replace(
        base, optimizer="fira", rank=ranks[0], lr=fira_lr, seed=seeds[0], progress=False, out=str(check_out)
    )
    results = run_all([c for _, _, c in first] + [check_cfg], workers)
    found: list[dict] = [{"lr": None, "grid": {}, "losses": {}} for _ in cells]
    for (i, lr, _), r in zip(first, results, strict=False):
        cell = found[i]
        cell["grid"][lr] = r["final_val_loss"]
        if cell["lr"] is None or r["final_val_loss"] < cell["grid"][cell["lr"]]:
            cell["lr"] = lr
    later = [(i, seed, _family_config(base, out, label, rank, changes, found[i]["lr"], seed))
             for i, (label, rank, changes, _) in enumerate(cells) for seed in seeds[1:]]  # fmt: skip
    for (i, seed, _), r in zip(later, run_all([c for _, _, c in later], workers), strict=True):
        found[i]["losses"][seed] = r["final_val_loss"]
    out_cells = []
    for (label, rank, changes, grid), cell in zip(cells, found, strict=True):
        losses = {seeds[0]: cell["grid"][cell["lr"]], **cell["losses"]}
        out_cells.append({"label": label, "rank": rank, "optimizer": changes["optimizer"],
                          "svd": changes.get("svd", "exact"), "lr_grid": grid, "lr": cell["lr"],
                          "grid": {str(k): v for k, v in cell["grid"].items()},
                          "losses": {str(s): losses[s] for s in seeds}})  # fmt: skip
    published = reference["ranks"][str(ranks[0])]["fira"]["losses"][str(seeds[0])]
    check = {"rank": ranks[0], "seed": seeds[0], "lr": fira_lr, "loss": results[-1]["final_val_loss"],
             "published": published}  # fmt: skip
    return {"cells": out_cells, "check": check}


def family_numbers(found: dict, reference: dict, base: TrainConfig, lrs: list[float], origin: dict,
                   wall_s: float | None = None) -> dict:  # fmt: skip
    """results/family_sweep.json: the new cells, the rank sweep's rows they are compared with (and
    that file's provenance), the check run, the setup and this run's provenance."""
    setup = reference["setup"]
    return {
        "provenance": origin,
        "setup": {"preset": base.preset, "steps": base.steps, "batch_size": base.batch_size, "seq_len": base.seq_len,
                  "update_proj_gap": base.update_proj_gap, "ranks": setup["ranks"], "seeds": setup["seeds"],
                  "family_ranks": sorted({c["rank"] for c in found["cells"] if c["label"] != "APOLLO-Mini"}),
                  "lrs": lrs, "hidden": setup["hidden"], "wall_s": wall_s},
        "cells": found["cells"],
        "check": found["check"],
        "reference": {"provenance": reference["provenance"], "adamw": reference["adamw"],
                      "ranks": {r: {k: row[k] for k in ("fira", "galore")} for r, row in reference["ranks"].items()}},
    }  # fmt: skip


def _paired(losses: dict, other: dict, seeds: list[str]) -> str:
    """Paired differences over seeds: mean [min, max] and whether their sign holds."""
    d = [losses[s] - other[s] for s in seeds]
    sign = " (every seed < 0)" if max(d) < 0 else (" (every seed > 0)" if min(d) > 0 else " (sign varies)")
    return f"{np.mean(d):+.4f} [{min(d):+.4f}, {max(d):+.4f}]{sign}"


def _family_header(numbers: dict) -> list[str]:
    """The family page's title, command, provenance, setup and the check of the reference rows."""
    from lm import provenance

    setup, ref, prov, check = numbers["setup"], numbers["reference"], numbers["provenance"], numbers["check"]
    seeds = [str(s) for s in setup["seeds"]]
    return [
        f"# The family: APOLLO, APOLLO-Mini and Fira's subspace refresh beside Fira, GaLore and AdamW "
        f"({setup['preset']})",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}.",
        "",
        f"{setup['preset']} preset (hidden {setup['hidden']}), {setup['steps']} steps × {setup['batch_size']} × "
        f"{setup['seq_len']} tokens per run, built-in corpus; seeds {setup['seeds']} (same seed: same "
        f"initialization and data order, so differences are paired); update_proj_gap {setup['update_proj_gap']}. "
        f"APOLLO and APOLLO-Mini: the authors' settings (random projection, scale 1 and channel-wise factors; "
        f"rank 1, scale 128 and one factor per matrix), learning rate chosen on seed {seeds[0]} from {setup['lrs']}. "
        'Fira with `svd="subspace"` runs at exact Fira\'s learning rate for its rank. Final validation loss '
        "(nats per byte), mean ± std over seeds.",
        "",
        f"Fira, GaLore and AdamW rows: results/rank_sweep.json ({provenance.describe(ref['provenance'])}). "
        f"Check that they still hold for this code: exact Fira, rank {check['rank']}, seed {check['seed']}, "
        f"lr {check['lr']:g} gives {check['loss']:.4f} here against {check['published']:.4f} there"
        + (
            "."
            if check["loss"] == check["published"]
            else f" ({check['loss'] - check['published']:+.4f}): the rows below set runs of this machine against "
            "runs of that one, so a difference of that size between them is not evidence."
        ),
    ]


def render_family(numbers: dict) -> str:
    """results/family_sweep.md from results/family_sweep.json (tested to agree)."""
    setup, ref = numbers["setup"], numbers["reference"]
    seeds = [str(s) for s in setup["seeds"]]
    adamw, hidden = ref["adamw"]["losses"], setup["hidden"]

    def frac(rank: int) -> str:
        return f"h/{hidden // rank}" if hidden % rank == 0 else f"{rank / hidden:.3g}h"

    lines = _family_header(numbers)
    lines += ["", "| optimizer | rank | final val loss | − AdamW (mean [min, max]) | − exact Fira, same rank |",
              "|---|---|---|---|---|"]  # fmt: skip
    rows = []
    for rank in setup["ranks"]:
        for name in ("fira", "galore"):
            cell = ref["ranks"][str(rank)][name]
            rows.append((("Fira" if name == "fira" else "GaLore"), rank, cell, name == "fira"))
    rows += [(cell["label"], cell["rank"], cell, False) for cell in numbers["cells"]]
    for label, rank, cell, is_fira in rows:
        losses = cell["losses"]
        vs_fira = ""
        if not is_fira and str(rank) in ref["ranks"]:
            vs_fira = _paired(losses, ref["ranks"][str(rank)]["fira"]["losses"], seeds)
        lines.append(f"| {label} | {rank} ({frac(rank)}) | {_mean_std([losses[s] for s in seeds])} (lr {cell['lr']:g}) "
                     f"| {_paired(losses, adamw, seeds)} | {vs_fira} |")  # fmt: skip
    lines.append(f"| AdamW (full rank) | — | {_mean_std([adamw[s] for s in seeds])} (lr {ref['adamw']['lr']:g}) | | |")
    lines += ["", f"Learning-rate grid on seed {seeds[0]} (final validation loss):", ""]
    lines += ["| optimizer | rank | " + " | ".join(f"lr {x:g}" for x in setup["lrs"]) + " |",
              "|---|---|" + "---|" * len(setup["lrs"])]  # fmt: skip
    for cell in numbers["cells"]:
        if cell["lr_grid"]:
            lines.append(f"| {cell['label']} | {cell['rank']} | "
                         + " | ".join(f"{cell['grid'][str(x)]:.4f}" for x in setup["lrs"]) + " |")  # fmt: skip
    if setup["wall_s"] is not None:
        lines += ["", f"Wall time of the runs this invocation trained: {setup['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"
