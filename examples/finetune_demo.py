"""Fine-tuning on a CPU, no download: full AdamW vs LoRA vs GaLore vs Fira vs LoRA + Fira.

1. Pre-trains the ``tiny`` model (``--preset``) with Fira on the built-in corpus (the standard library's
   sources) once; the checkpoint is cached in Hugging Face format under ``--cache``.
2. Builds a task from the corpus's held-out files, never seen in pre-training (lm/pytasks.py):
   "Which name is called?" on a line of code, with 4 names of that line as candidates.
3. Fine-tunes the checkpoint with each method (examples/finetune.py; the same examples, order and
   steps for every method, each at its learning rate in ``LRS``) and scores the test lines by
   answer log-likelihood (chance: 0.25).
4. Writes results/finetune.md, results/finetune.png and results/finetune.json.

  python examples/finetune_demo.py                            # Fira 3 seeds, the others 1
  python examples/finetune_demo.py --baseline-seeds 0 1 2     # every method 3 seeds

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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import finetune
import train_lm
from lm import files, hf, instruct, provenance, pytasks
from lm import model as model_lib
from lm import prepare as prepare_lib
from lm import tokenizer as tokenizer_lib

# Each method's learning rate: of {3e-4, 1e-3, 3e-3, 1e-2} (full AdamW, GaLore, Fira) or {1e-3, 3e-3,
# 1e-2} (LoRA, LoRA + Fira), the one of lowest validation loss on seed 0; results/finetune.md lists
# every run of the grid (run it with --lr X --seeds 0 --methods M into the same --runs folder).
LRS = {"full-adamw": 1e-3, "lora": 3e-3, "galore": 1e-3, "fira": 3e-3, "lora-fira": 3e-3}
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


def task_files(out: pathlib.Path, n_train: int, n_test: int) -> tuple[pathlib.Path, pathlib.Path]:
    """train.json (its first VAL_EXAMPLES records, from test files, held out for the validation loss)
    and test.json."""
    task = pytasks.called()
    rng = random.Random(0)
    if n_train > len(task["train"]) or VAL_EXAMPLES + n_test > len(task["test"]):
        raise ValueError(
            f"the task has {len(task['train'])} training and {len(task['test']) - VAL_EXAMPLES} test records "
            f"to spare; asked for {n_train} and {n_test}"
        )
    test = rng.sample(task["test"], VAL_EXAMPLES + n_test)
    train = rng.sample(task["train"], n_train)
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
    p = argparse.ArgumentParser(prog=pathlib.Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(finetune.METHODS), choices=finetune.METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the headline method, fira")
    p.add_argument("--baseline-seeds", type=int, nargs="+", default=[0],
                   help="seeds of the other methods (default: 0 alone, to fit 10 minutes on 2 CPU cores)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: LRS)")
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
    p.add_argument("--runs", default="runs/finetune_demo", help="one folder per fine-tuning run")
    p.add_argument("--out", default="results", help="finetune.md, finetune.png and finetune.json go here")
    args = p.parse_args(argv)
    for name in ("pretrain_steps", "steps", "batch_size", "train_examples", "test_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        runs, out = files.check_folder(args.runs, "--runs"), files.check_folder(args.out, "--out")
    except files.OutputError as e:
        p.error(str(e))
    try:
        train_json, test_json = task_files(runs, args.train_examples, args.test_examples)
    except ValueError as e:
        p.error(str(e))
    ckpt = pretrained(pathlib.Path(args.cache).expanduser(), args.preset, args.pretrain_steps)
    tok = tokenizer_lib.load("bytes")
    test = instruct.load_task(test_json)
    base = hf.load(ckpt)
    base_acc = instruct.accuracy(base, tok, test, template="plain")
    print(f"pre-trained model, before fine-tuning: accuracy {base_acc:.3f} on {len(test)} test lines", flush=True)

    def flags_for(checkpoint: pathlib.Path, method: str, lr: float, seed: int) -> list[str]:
        return ["--checkpoint", str(checkpoint), "--data", str(train_json), "--eval", str(test_json),
                "--method", method, "--lr", str(lr), "--seed", str(seed), "--max-steps", str(args.steps),
                "--epochs", "100", "--batch-size", str(args.batch_size), "--val-size", str(VAL_EXAMPLES),
                "--warmup", str(max(1, args.steps // 10)), "--eval-every", str(max(1, args.steps // 4)),
                *COMMON]  # fmt: skip

    results = {}
    for method in args.methods:
        lr = args.lr or LRS[method]
        for seed in args.seeds if method == "fira" else args.baseline_seeds:
            summary = run(flags_for(ckpt, method, lr, seed), runs / f"{method}-lr{lr:g}-seed{seed}")
            results.setdefault(method, []).append(summary)
            acc, val = summary["accuracy/test"], summary["final_val_loss"]
            print(f"{method} seed {seed}: accuracy {acc:.3f}, validation loss {val:.4f}", flush=True)
    if args.control and args.lr is None:
        # The same fine-tuning from a random initialization: what pre-training contributes.
        scratch = pathlib.Path(args.cache).expanduser() / f"{args.preset}-random"
        if not (scratch / "model.safetensors").exists():
            hf.save(model_lib.LLaMA(base.cfg, rngs=nnx.Rngs(0)), scratch)
        summary = run(flags_for(scratch, "full-adamw", LRS["full-adamw"], 0), runs / "control-random-init")
        results[CONTROL] = [summary]
        print(f"{CONTROL}: accuracy {summary['accuracy/test']:.3f}", flush=True)
    origin = provenance.record(argv, __file__)
    grid = lr_grid(runs, flags_for(ckpt, "fira", 0.0, 0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    write(results, grid, base_acc, params, args, out, origin, ckpt)
    return results


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
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def write(results: dict, grid: dict, base_acc: float, params: int, args: argparse.Namespace, out: pathlib.Path,
          origin: dict, ckpt: pathlib.Path) -> None:  # fmt: skip
    """results/finetune.{json,md,png}: the page is rendered from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pretrain = ckpt.parent / f"{ckpt.name}-run" / "summary.json"
    setup = {"preset": args.preset, "params": params, "pretrain_steps": args.pretrain_steps, "steps": args.steps,
             "batch_size": args.batch_size, "test_examples": args.test_examples, "val_examples": VAL_EXAMPLES,
             "pretrain_s": json.loads(pretrain.read_text())["wall_s"] if pretrain.exists() else None}  # fmt: skip
    keep = ("accuracy/test", "final_val_loss")
    grid_numbers = {m: {f"{lr:g}": {k: r[k] for k in keep} for lr, r in by_lr.items()} for m, by_lr in grid.items()}
    saved = {"provenance": origin, "setup": setup, "base_accuracy": base_acc, "runs": results, "grid": grid_numbers}
    files.write_text(out / "finetune.json", json.dumps(saved, indent=1))
    md = render(saved)
    files.write_text(out / "finetune.md", md)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(results)
    accs = [[r["accuracy/test"] for r in results[m]] for m in names]
    colors = [f"C{i}" for i in range(len(names))]
    labels = [n.replace(", ", ",\n") for n in names]
    left.bar(labels, [np.mean(a) for a in accs], yerr=[np.std(a) for a in accs], color=colors, capsize=4)
    left.tick_params(axis="x", labelsize=8)
    left.axhline(base_acc, color="gray", ls="--", label="before fine-tuning")
    left.axhline(0.25, color="gray", ls=":", label="chance")
    left.set_ylabel("test accuracy (bars: mean; whiskers: std over seeds)")
    left.legend(loc="upper right", fontsize=8)
    for i, m in enumerate(names):
        if m == CONTROL:  # on a scale of its own (2.2 to 0.8): left out of the curves
            continue
        curves = [[(x["step"], x["val_loss"]) for x in r["records"] if "val_loss" in x] for r in results[m]]
        steps = [s for s, _ in curves[0]]
        right.plot(steps, np.mean([[v for _, v in c] for c in curves], axis=0), "o-", color=colors[i], label=m, ms=3)
    right.set_xlabel("fine-tuning step")
    right.set_ylabel("validation loss of the answers (nats/token)")
    right.set_title("pre-trained models", fontsize=10)
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.preset} model, 'Which name is called?' on held-out standard-library code")
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=120)
    plt.close(fig)
    print(md)


def render(saved: dict) -> str:
    """results/finetune.md from the contents of results/finetune.json (tested to agree)."""
    setup, results, prov = saved["setup"], saved["runs"], saved["provenance"]
    rows = []
    for method, runs in results.items():
        flags = runs[0]["flags"]
        acc = [r["accuracy/test"] for r in runs]
        val = [r["final_val_loss"] for r in runs]
        rows.append(
            f"| {method} | {flags[flags.index('--lr') + 1]} | {runs[0]['trainable_params']:,} "
            f"| {runs[0]['optimizer_state_mib']:.2f} | {_mean_spread(acc)} | {', '.join(f'{a:.3f}' for a in acc)} "
            f"| {_mean_spread(val)} | {len(runs)} "
            f"| {np.mean([r.get('run_s', r['wall_s']) for r in runs]):.0f} |"
        )
    order = sorted(saved["grid"].items(), key=lambda item: finetune.METHODS.index(item[0]))
    grid_rows = [
        f"| {method} | " + "; ".join(f"{lr}: {r['accuracy/test']:.3f} / {r['final_val_loss']:.3f}"
                                      + (" (chosen)" if float(lr) == LRS[method] else "")
                                      for lr, r in sorted(by_lr.items(), key=lambda kv: float(kv[0]))) + " |"
        for method, by_lr in order
    ]  # fmt: skip
    total_s = sum(r.get("run_s", r["wall_s"]) for runs in results.values() for r in runs)
    pretrain_min = f"{setup['pretrain_s'] / 60:.1f} min" if setup["pretrain_s"] is not None else "(cached: not timed)"
    md = [
        "# Fine-tuning on a CPU: full AdamW vs LoRA vs GaLore vs Fira vs LoRA + Fira",
        "",
        f"`{prov['command']}`",
        "",
        f"Made on {provenance.describe(prov)}. Time: pre-training {pretrain_min} (once, then "
        f"cached), these {sum(len(r) for r in results.values())} fine-tuning runs {total_s / 60:.1f} min "
        "(fine-tuning and scoring, compilation included).",
        "",
        f"The `{setup['preset']}` model ({setup['params'] / 1e6:.2f}M parameters) pre-trained with Fira for "
        f"{setup['pretrain_steps']} steps on the built-in "
        f'corpus, then fine-tuned for {setup["steps"]} steps of {setup["batch_size"]} examples on "Which name is '
        "called?\" lines from the corpus's held-out files (lm/pytasks.py), and scored on "
        f"{setup['test_examples']} lines of other held-out files by answer log-likelihood: chance 0.25, "
        f"{saved['base_accuracy']:.3f} before fine-tuning. Mean ± standard deviation over seeds (the data order, "
        f"and LoRA's initialization); validation loss: nats/token of the answers of {setup['val_examples']} more "
        "test-file lines.",
        "",
        "| method | lr | trainable params | optimizer state (MiB) | test accuracy | per seed | validation loss | seeds "
        "| s/run |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if grid_rows:
        md += [
            "",
            "Learning rates: each method's is the one of lowest validation loss on seed 0 (never the test accuracy). "
            "Seed-0 runs found in the runs folder, as lr: test accuracy / validation loss:",
            "",
            "| method | learning rates tried |",
            "|---|---|",
            *grid_rows,
        ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
