"""The training loop's host overhead: ``--log-every 1`` against ``--log-every 50``, side by side.

With ``--log-every 1`` the loop (``examples/lm/loop.py``) fetches the loss after every step, so the
host waits for the device each step and dispatches the next step only then; with 50 it waits once
every 50 steps, and the next batches are made by the prefetch thread while the device runs. The
script trains the same run (``--preset``, ``--steps``, seed 0, Fira, the built-in corpus) with
each setting, ``--pairs`` times in alternation in one process, and reports each run's seconds per
step over the same steps in both settings (steps 51 to ``--steps``: after the first window of 50,
which compiles; the sum of the logging windows' seconds over their steps, so every step counts,
Fira's refresh included), its wall time, and its final validation loss, which must be the same: the
loop changes when the host looks, not what the device computes.

  python benchmarks/host_overhead.py --preset tiny --steps 300 --pairs 2 --json results/host_overhead.json

(``--json FILE`` also writes FILE's page, ``.md`` beside it.)
"""

import argparse
import itertools
import json
import pathlib
import sys
import tempfile

SETTINGS = (1, 50)


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    from lm import model as model_lib
    from lm import provenance
    from lm import train as train_lib
    from lm.config import TrainConfig

    p = argparse.ArgumentParser(prog=pathlib.Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
    p.add_argument("--steps", type=int, default=300, help="steps per run (a multiple of 50)")
    p.add_argument("--pairs", type=int, default=2, help="runs of each setting, in alternation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", metavar="FILE", help="also write the figures and their provenance to FILE")
    args = p.parse_args(argv)
    if args.steps < 100 or args.steps % max(SETTINGS):
        p.error(f"--steps must be a multiple of {max(SETTINGS)} and >= 100, got {args.steps}")
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    runs: dict[int, list[dict]] = {k: [] for k in SETTINGS}
    for pair in range(args.pairs):
        for log_every in SETTINGS if pair % 2 == 0 else SETTINGS[::-1]:
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(preset=args.preset, steps=args.steps, log_every=log_every, eval_every=args.steps,
                                  batch_size=args.batch_size, seq_len=args.seq_len, out=out,
                                  progress=False)  # fmt: skip
                result = train_lib.train(cfg, log=lambda msg: None)
            records = result["records"]  # a window's step_s: its seconds over its steps
            windows = [(r["step"] - prev["step"], r["step_s"]) for prev, r in itertools.pairwise(records)
                       if r["step"] > max(SETTINGS)]  # fmt: skip
            step_s = sum(n * s for n, s in windows) / sum(n for n, _ in windows)
            runs[log_every].append({"step_s": step_s, "final_val_loss": result["final_val_loss"],
                                    "wall_s": result["wall_s"]})  # fmt: skip
            print(f"--log-every {log_every}: {1e3 * step_s:.2f} ms per step (steps {max(SETTINGS) + 1}-"
                  f"{args.steps}), wall {result['wall_s']:.1f} s, final validation loss "
                  f"{result['final_val_loss']:.6f}", flush=True)  # fmt: skip
    saved = {"preset": args.preset, "steps": args.steps, "runs": {str(k): v for k, v in runs.items()}}
    if args.json:  # FILE and, beside it, its page (FILE with .md)
        saved["provenance"] = provenance.record(argv, __file__)
        pathlib.Path(args.json).write_text(json.dumps(saved, indent=1))
        pathlib.Path(args.json).with_suffix(".md").write_text(render(saved))
    print(render(saved))
    return saved


def render(saved: dict) -> str:
    """The table: each setting's median step time per run and its mean, the ratio, the final losses."""
    from lm import provenance

    rows = []
    mean = {}
    for k, runs in saved["runs"].items():
        ms = [1e3 * r["step_s"] for r in runs]
        mean[k] = sum(ms) / len(ms)
        losses = sorted({f"{r['final_val_loss']:.6f}" for r in runs})
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        rows.append(f"| {k} | {', '.join(f'{m:.2f}' for m in ms)} | {mean[k]:.2f} | {walls} | {', '.join(losses)} |")
    first, last = (str(k) for k in SETTINGS)
    lines = [
        f"# The training loop's host overhead: {saved['preset']} preset, {saved['steps']} steps",
        "",
        *(
            [f"`{saved['provenance']['command']}`", "", f"Made on {provenance.describe(saved['provenance'])}.", ""]
            if "provenance" in saved
            else []
        ),
        f"| --log-every | ms per step, steps {max(SETTINGS) + 1}-{saved['steps']}, each run | mean | wall (s), "
        "each run | final validation loss |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Mean ms per step, --log-every {last} / --log-every {first}: {mean[last] / mean[first]:.3f}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
