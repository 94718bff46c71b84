"""Fine-tuning on a CPU, no download: full AdamW vs LoRA vs GaLore vs Fira vs LoRA + Fira, on two tasks.

1. Pre-trains the ``tiny`` model (``--preset``) with Fira on the built-in corpus (the standard library's
   sources) once; the checkpoint is cached in Hugging Face format under ``--cache``.
2. Builds each task of ``--tasks`` from the corpus's held-out files, never seen in pre-training
   (lm/pytasks.py): "Which name is called?" on a line of code, with 4 names of that line as
   candidates; "Which operator fills the blank?" in a line of code, with 4 operators as candidates.
3. Fine-tunes the checkpoint with each method (examples/finetune.py; the same examples, order and
   steps for every method) at each seed of ``--seeds`` and scores the test lines by answer
   log-likelihood (chance: 0.25). A method's learning rate is ``LRS``'s, or with ``--lr-grid``
   the one of lowest validation loss on seed 0 among ``GRID``'s (never the test accuracy).
4. Writes results/finetune.md, results/finetune.png and results/finetune.json: per task, each
   method's mean and standard deviation over seeds, and the paired per-seed differences of
   ``PAIRS`` (LoRA + Fira - LoRA first) with a 95% t interval.

  python examples/finetune_demo.py                                  # every method, seed 0
  python examples/finetune_demo.py --lr-grid --seeds 0 1 2 3 4 5 6 7  # the results page's run

Finished runs are reused (each run's summary.json holds the flags it ran with), so an interrupted
demo resumes where it stopped and a finished one rewrites its tables in seconds.
"""

import argparse
import hashlib
import json
import pathlib
import random
import sys
import time

import jax
import numpy as np
from flax import nnx
from scipy import stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import finetune
import train_lm
from lm import config as config_lib
from lm import files, hf, instruct, provenance, pytasks
from lm import model as model_lib
from lm import prepare as prepare_lib
from lm import tokenizer as tokenizer_lib

# The learning rates --lr-grid tries on seed 0, per method. The results page's run (2026-12-05) tried
# the three middle ones of GaLore and the three upper ones of LoRA, and then, as a check of the
# edges it chose on a task, GaLore's 1e-2 and LoRA's 3e-4: both had a higher validation loss there.
GRID = {"full-adamw": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3, 1e-2), "galore": (3e-4, 1e-3, 3e-3, 1e-2),
        "fira": (1e-3, 3e-3, 1e-2), "lora-fira": (1e-3, 3e-3, 1e-2)}  # fmt: skip
# Without --lr-grid, per task and method: the rate the results page's --lr-grid run chose.
LRS = {
    "called": {"full-adamw": 1e-3, "lora": 1e-3, "galore": 3e-3, "fira": 3e-3, "lora-fira": 3e-3},
    "operator": {"full-adamw": 1e-3, "lora": 3e-3, "galore": 3e-3, "fira": 3e-3, "lora-fira": 3e-3},
}
# The paired comparisons the page reports (first minus second, seed by seed): the paper's fine-tuning
# claim (Fira on LoRA's factors against LoRA), then Fira against GaLore and against full AdamW.
PAIRS = (("lora-fira", "lora"), ("fira", "galore"), ("fira", "full-adamw"))
TITLES = {"called": "Which name is called?", "operator": "Which operator fills the blank?"}
# Comparable optimizer memory: LoRA as the authors (rank 32, alpha 64, dropout 0.05 on q, k, v, up,
# down: finetune.py's defaults); GaLore and Fira at rank 16 (hidden / 8) on every attention and MLP
# kernel, plain Adam on the embedding and head; LoRA + Fira: Fira at rank 16 on the LoRA factors
# (the authors' setup). Loss on the answer only, and the Alpaca template without its preamble:
# on this budget, two thirds of every example would otherwise be boilerplate.
COMMON = ["--rank", "16", "--update-proj-gap", "50", "--cutoff", "224", "--template", "plain", "--no-train-on-inputs"]
CONTROL = "full-adamw, no pre-training"  # the control row: a random initialization fine-tuned alike
VAL_EXAMPLES = 64  # test-file records held out for the validation loss (disjoint from the scored ones)


def pretrained(cache: pathlib.Path, preset: str, steps: int) -> pathlib.Path:
    """The model pre-trained with Fira for ``steps`` steps, as a Hugging Face checkpoint (cached)."""
    ckpt = cache / f"{preset}-fira-{steps}"
    if not (ckpt / "model.safetensors").exists():
        print(f"pre-training the {preset} model for {steps} steps (once; cached in {ckpt})", flush=True)
        run_dir = str(cache / f"{ckpt.name}-run")
        train_lm.main(["--preset", preset, "--steps", str(steps), "--out", run_dir, "--export", str(ckpt)])
    return ckpt


def task_files(task: str, out: pathlib.Path, n_train: int, n_test: int) -> tuple[pathlib.Path, pathlib.Path]:
    """``task``'s train.json (its first VAL_EXAMPLES records, from test files, held out for the
    validation loss) and test.json, in ``out``."""
    records = pytasks.TASKS[task]()
    rng = random.Random(0)
    if n_train > len(records["train"]) or VAL_EXAMPLES + n_test > len(records["test"]):
        raise ValueError(
            f"the {task} task has {len(records['train'])} training and {len(records['test']) - VAL_EXAMPLES} test "
            f"records to spare; asked for {n_train} and {n_test}"
        )
    test = rng.sample(records["test"], VAL_EXAMPLES + n_test)
    train = rng.sample(records["train"], n_train)
    files.write_text(out / "train.json", json.dumps(test[:VAL_EXAMPLES] + train))
    files.write_text(out / "test.json", json.dumps(test[VAL_EXAMPLES:]))
    return out / "train.json", out / "test.json"


def inputs(flags: list[str]) -> str:
    """A hash of what the run reads: the checkpoint's weights and the task files named in ``flags``."""
    h = hashlib.sha256()
    for flag, name in (("--checkpoint", "model.safetensors"), ("--data", ""), ("--eval", "")):
        h.update((pathlib.Path(flags[flags.index(flag) + 1]) / name).read_bytes())
    return h.hexdigest()


def run(flags: list[str], out: pathlib.Path) -> dict:
    """finetune.py with ``flags`` into ``out``, or its saved summary if it ran with the same flags and inputs."""
    saved = out / "summary.json"
    digest = inputs(flags)
    if saved.exists():
        summary = json.loads(saved.read_text())
        same_origin = provenance.same_origin(summary.get("provenance", {}), provenance.record())
        if summary.get("flags") == flags and summary.get("inputs") == digest and same_origin:
            return summary
    t0 = time.perf_counter()
    summary = finetune.main([*flags, "--out", str(out), "--no-progress"])
    summary["run_s"] = time.perf_counter() - t0  # fine-tuning and scoring
    summary["flags"], summary["inputs"], summary["provenance"] = flags, digest, provenance.record()
    summary["records"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    files.write_text(saved, json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = config_lib.parser(__file__, __doc__)
    p.add_argument("--tasks", nargs="+", default=list(pytasks.TASKS), choices=pytasks.TASKS)
    p.add_argument("--methods", nargs="+", default=list(finetune.METHODS), choices=finetune.METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds of every method (the data order and LoRA's initialization; default: 0 alone, "
                        "to fit about 10 minutes on 2 CPU cores)")  # fmt: skip
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: LRS)")
    lr.add_argument("--lr-grid", action="store_true",
                    help="each method's rate: of GRID's, the one of lowest validation loss on seed 0")  # fmt: skip
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune a random initialization with full AdamW (seed 0; not with --lr)")  # fmt: skip
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS), help="the model's size")
    p.add_argument("--pretrain-steps", type=int, default=600, help="pre-training steps (Fira, built-in corpus)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning examples per step")
    p.add_argument("--train-examples", type=int, default=960, help="task records to fine-tune on")
    p.add_argument("--test-examples", type=int, default=300, help="task records to score")
    p.add_argument("--cache", default=str(prepare_lib.cache_root().parent / "finetune_demo"),
                   help="where the pre-trained checkpoint is kept")  # fmt: skip
    p.add_argument("--runs", default="runs/finetune_demo", help="one folder per task, and in it one per run")
    p.add_argument("--out", default="results", help="finetune.md, finetune.png and finetune.json go here")
    args = p.parse_args(argv)
    for name in ("pretrain_steps", "steps", "batch_size", "train_examples", "test_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.lr_grid and 0 not in args.seeds:
        p.error("--lr-grid chooses on seed 0: --seeds must include 0")
    try:
        runs, out = files.check_folder(args.runs, "--runs"), files.check_folder(args.out, "--out")
        task_data = {}
        for task in args.tasks:
            folder = files.check_folder(runs / task, "--runs")
            task_data[task] = task_files(task, folder, args.train_examples, args.test_examples)
    except (files.OutputError, ValueError) as e:
        p.error(str(e))
    ckpt = pretrained(pathlib.Path(args.cache).expanduser(), args.preset, args.pretrain_steps)
    tok = tokenizer_lib.load("bytes")
    base = hf.load(ckpt)
    tasks = {task: run_task(task, *paths, args, runs / task, ckpt, base, tok) for task, paths in task_data.items()}
    origin = provenance.record(argv, __file__)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    write(tasks, params, args, out, origin, ckpt)
    return tasks


def run_task(task: str, train_json: pathlib.Path, test_json: pathlib.Path, args: argparse.Namespace,
             runs: pathlib.Path, ckpt: pathlib.Path, base: model_lib.LLaMA,
             tok: tokenizer_lib.Tokenizer) -> dict:  # fmt: skip
    """Every method of ``args`` on ``task`` (and the control): its runs, grid and paired differences."""

    def flags_for(checkpoint: pathlib.Path, method: str, lr: float, seed: int) -> list[str]:
        return ["--checkpoint", str(checkpoint), "--data", str(train_json), "--eval", str(test_json),
                "--method", method, "--lr", f"{lr:g}", "--seed", str(seed), "--max-steps", str(args.steps),
                "--epochs", "100", "--batch-size", str(args.batch_size), "--val-size", str(VAL_EXAMPLES),
                "--warmup", str(max(1, args.steps // 10)), "--eval-every", str(max(1, args.steps // 4)),
                *COMMON]  # fmt: skip

    def fine_tune(method: str, lr: float, seed: int, checkpoint: pathlib.Path = ckpt, name: str = "") -> dict:
        summary = run(flags_for(checkpoint, method, lr, seed), runs / (name or f"{method}-lr{lr:g}-seed{seed}"))
        print(f"{task}: {name or method} lr {lr:g} seed {seed}: accuracy {summary['accuracy/test']:.3f}, "
              f"validation loss {summary['final_val_loss']:.4f}", flush=True)  # fmt: skip
        return summary

    base_acc = instruct.accuracy(base, tok, instruct.load_task(test_json), template="plain")
    print(f"{task}: the pre-trained model, before fine-tuning: accuracy {base_acc:.3f}", flush=True)
    results = {}
    for method in args.methods:
        if args.lr_grid:
            tried = {lr: fine_tune(method, lr, 0) for lr in GRID[method]}
            lr = min(tried, key=lambda x: tried[x]["final_val_loss"])
        else:
            lr = args.lr or LRS[task][method]
        results[method] = [fine_tune(method, lr, seed) for seed in dict.fromkeys(args.seeds)]
    if args.control and args.lr is None:
        # The same fine-tuning from a random initialization (at full AdamW's rate): what pre-training contributes.
        scratch = pathlib.Path(args.cache).expanduser() / f"{args.preset}-random"
        if not (scratch / "model.safetensors").exists():
            hf.save(model_lib.LLaMA(base.cfg, rngs=nnx.Rngs(0)), scratch)
        lr = float(_lr(results["full-adamw"][0])) if "full-adamw" in results else LRS[task]["full-adamw"]
        results[CONTROL] = [fine_tune("full-adamw", lr, 0, scratch, "control-random-init")]
    grid = lr_grid(runs, flags_for(ckpt, "fira", 0.0, 0))
    return {"base_accuracy": base_acc, "runs": results, "grid": grid, "paired": paired(results)}


def _seed(summary: dict) -> int:
    return int(summary["flags"][summary["flags"].index("--seed") + 1])


def paired(results: dict[str, list[dict]]) -> dict[str, dict]:
    """For each pair (a, b) of PAIRS both in ``results``: a's test accuracy minus b's, seed by seed
    (the seeds both ran), their mean and, with two seeds or more, its 95% t interval."""
    out = {}
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        acc_b = {_seed(r): r["accuracy/test"] for r in results[b]}
        diff = {s: r["accuracy/test"] - acc_b[s] for r in results[a] if (s := _seed(r)) in acc_b}
        d = np.array(list(diff.values()))
        row = {"seeds": list(diff), "diff": d.tolist(), "mean": float(d.mean()), "lo": None, "hi": None}
        if len(d) > 1:
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            row["lo"], row["hi"] = float(d.mean() - half), float(d.mean() + half)
        out[f"{a} - {b}"] = row
    return out


def _without(flags: list[str], names: tuple[str, ...]) -> list[str]:
    """``flags`` less the named flags and their values."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def lr_grid(runs: pathlib.Path, like: list[str]) -> dict[str, dict[float, dict]]:
    """Every finished seed-0 run in ``runs`` that differs from ``like`` only in method and lr."""
    base = _without(like, ("--method", "--lr", "--seed"))
    grid: dict[str, dict[float, dict]] = {}
    for saved in sorted(runs.glob("*/summary.json")):
        summary = json.loads(saved.read_text())
        flags = summary.get("flags", [])
        if _without(flags, ("--method", "--lr", "--seed")) == base and flags[flags.index("--seed") + 1] == "0":
            grid.setdefault(summary["method"], {})[float(flags[flags.index("--lr") + 1])] = summary
    return grid


def _mean_spread(xs: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def write(tasks: dict, params: int, args: argparse.Namespace, out: pathlib.Path, origin: dict,
          ckpt: pathlib.Path) -> None:  # fmt: skip
    """results/finetune.{json,md,png}: the page is rendered from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretrain = ckpt.parent / f"{ckpt.name}-run" / "summary.json"
    setup = {"preset": args.preset, "params": params, "pretrain_steps": args.pretrain_steps, "steps": args.steps,
             "batch_size": args.batch_size, "test_examples": args.test_examples, "val_examples": VAL_EXAMPLES,
             "pretrain_s": json.loads(pretrain.read_text())["wall_s"] if pretrain.exists() else None}  # fmt: skip
    keep = ("accuracy/test", "final_val_loss")
    saved_tasks = {}
    for task, t in tasks.items():
        grid = {m: {f"{lr:g}": {k: r[k] for k in keep} for lr, r in by_lr.items()} for m, by_lr in t["grid"].items()}
        saved_tasks[task] = {**t, "grid": grid}
    saved = {"provenance": origin, "setup": setup, "tasks": saved_tasks}
    files.write_text(out / "finetune.json", json.dumps(saved, indent=1))
    md = render(saved)
    files.write_text(out / "finetune.md", md)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items(), strict=True):
        names = list(t["runs"])
        accs = [[r["accuracy/test"] for r in t["runs"][m]] for m in names]
        x = np.arange(len(names))
        ax.bar(x, [np.mean(a) for a in accs], color=[f"C{i}" for i in x], alpha=0.6)
        for i, a in enumerate(accs):
            ax.plot(np.full(len(a), i) + np.linspace(-0.2, 0.2, len(a)), a, "k.", ms=4)
        ax.set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=8)
        ax.axhline(t["base_accuracy"], color="gray", ls="--", label="before fine-tuning")
        ax.axhline(0.25, color="gray", ls=":", label="chance")
        ax.set_title(TITLES[task], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (bars: mean; dots: seeds)")
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{args.preset} model fine-tuned on held-out standard-library code")
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=120)
    plt.close(fig)
    print(md)


def _lr(summary: dict) -> str:
    return summary["flags"][summary["flags"].index("--lr") + 1]


def _interval(row: dict) -> str:
    return f"[{row['lo']:+.3f}, {row['hi']:+.3f}]" if row["lo"] is not None else "(one seed: none)"


def render(saved: dict) -> str:
    """results/finetune.md from the contents of results/finetune.json (tested to agree)."""
    setup, prov = saved["setup"], saved["provenance"]
    all_runs = [r for t in saved["tasks"].values() for runs in t["runs"].values() for r in runs]
    total_s = sum(r.get("run_s", r["wall_s"]) for r in all_runs)
    pretrain_min = f"{setup['pretrain_s'] / 60:.1f} min" if setup["pretrain_s"] is not None else "(cached: not timed)"
    md = [
        "# Fine-tuning on a CPU: full AdamW vs LoRA vs GaLore vs Fira vs LoRA + Fira",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}. Time: pre-training {pretrain_min} (once, then cached), these "
        f"{len(all_runs)} fine-tuning runs {total_s / 60:.1f} min (fine-tuning and scoring, compilation included).",
        "",
        f"The `{setup['preset']}` model ({setup['params'] / 1e6:.2f}M parameters) pre-trained with Fira for "
        f"{setup['pretrain_steps']} steps on the built-in corpus, then fine-tuned for {setup['steps']} steps of "
        f"{setup['batch_size']} examples on each task's lines from the corpus's held-out files (lm/pytasks.py), and "
        f"scored on {setup['test_examples']} lines of other held-out files by answer log-likelihood (chance 0.25). "
        "Mean ± sample standard deviation over seeds (the data order, and LoRA's initialization); validation loss: "
        f"nats/token of the answers of {setup['val_examples']} more test-file lines. Paired differences: test "
        "accuracy of the first method minus the second's, seed by seed (the same data order), with the 95% t "
        "interval of their mean.",
    ]
    for task, t in saved["tasks"].items():
        md += _render_task(task, t)
    return "\n".join(md) + "\n"


def _render_task(task: str, t: dict) -> list[str]:
    """One task's section: its table of methods, the paired differences, the learning rates tried."""
    md: list[str] = []
    md += [
        "",
        f'## "{TITLES[task]}" ({task})',
        "",
        f"Before fine-tuning: {t['base_accuracy']:.3f}.",
        "",
        "| method | lr | trainable params | optimizer state (MiB) | test accuracy | per seed | validation loss "
        "| seeds | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in t["runs"].items():
        acc = [r["accuracy/test"] for r in runs]
        val = [r["final_val_loss"] for r in runs]
        md.append(
            f"| {method} | {_lr(runs[0])} | {runs[0]['trainable_params']:,} "
            f"| {runs[0]['optimizer_state_mib']:.2f} | {_mean_spread(acc)} | {', '.join(f'{a:.3f}' for a in acc)} "
            f"| {_mean_spread(val)} | {len(runs)} | {np.mean([r.get('run_s', r['wall_s']) for r in runs]):.0f} |"
        )
    if t["paired"]:
        md += ["", "| paired difference | mean | 95% interval | per seed |", "|---|---|---|---|"]
        md += [
            f"| {pair} | {row['mean']:+.3f} | {_interval(row)} | {', '.join(f'{d:+.3f}' for d in row['diff'])} |"
            for pair, row in t["paired"].items()
        ]
    chosen = {m: float(_lr(runs[0])) for m, runs in t["runs"].items() if m != CONTROL}
    order = sorted(t["grid"].items(), key=lambda item: finetune.METHODS.index(item[0]))
    if order:
        md += [
            "",
            "Learning rates: seed-0 runs found in the runs folder, as lr: test accuracy / validation loss "
            "(with --lr-grid, each method's rate is the one of lowest validation loss, never the test accuracy):",
            "",
            "| method | learning rates tried |",
            "|---|---|",
            *(
                f"| {method} | "
                + "; ".join(
                    f"{lr}: {r['accuracy/test']:.3f} / {r['final_val_loss']:.3f}"
                    + (" (chosen)" if float(lr) == chosen.get(method) else "")
                    for lr, r in sorted(by_lr.items(), key=lambda kv: float(kv[0]))
                )
                + " |"
                for method, by_lr in order
            ),
        ]
    return md


if __name__ == "__main__":
    main()
