"""The train step's memory measured, not analysed: the process's resident-set high-water mark.

For each optimizer, in a fresh process: build the model and optimizer with real arrays
(``--preset``, T5's vocabulary, the authors' rank, ``--dtype`` for parameters and compute),
compile the step training runs (``examples/lm/step.py``, state donated), then run a refresh step
(step 0: every projected matrix's SVD) and a plain step (step 1). Before each step the kernel's
high-water mark is reset (``/proc/self/clear_refs``), so ``VmHWM - VmRSS before`` is what that
step added on top of the parameters and state it found in memory. Beside it, the compiler's
figure for the same quantity: ``memory_analysis`` peak minus the arguments. Large allocations are
forced to ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so that freed buffers leave the resident set.

Linux only (``/proc``). CPU:

  python benchmarks/measure_peak_rss.py --preset 350m --json results/memory_rss.json
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROWS = ("sgd", "adamw", "galore", "fira")


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def measure(preset: str, name: str, dtype_name: str, seq_len: int, per_layer: bool = False) -> dict:
    """One optimizer's refresh and plain step, in this process."""
    import gc

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import jax
    import jax.numpy as jnp
    import memory_report
    from flax import nnx

    graphdef, state = nnx.split(memory_report.build(preset, name, jnp.dtype(dtype_name), per_layer=per_layer))
    vocab = memory_report.VOCAB
    rng = jax.random.key(0)
    batches = [jax.random.randint(jax.random.fold_in(rng, i), (1, seq_len + 1), 0, vocab) for i in range(2)]
    compiled = memory_report.train_step(per_layer).lower(graphdef, state, batches[0]).compile()
    mem = compiled.memory_analysis()
    analysed = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    out = {"analysed_peak_bytes": analysed, "analysed_over_arguments_bytes": analysed - mem.argument_size_in_bytes}
    for label, batch in zip(("refresh", "plain"), batches, strict=True):
        gc.collect()
        before = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))
        out[f"{label}_step_s"] = time.perf_counter() - t0
        out[f"{label}_rss_before_bytes"] = before
        out[f"{label}_rss_peak_bytes"] = _status("VmHWM")
        out[f"{label}_added_bytes"] = out[f"{label}_rss_peak_bytes"] - before
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--optimizer", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--per-layer", action="store_true", help="the step with per-layer updates (as memory_report's)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # run one optimizer in this process
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.preset, args.child, args.dtype, args.seq_len, args.per_layer)))
        return {}
    if not pathlib.Path("/proc/self/clear_refs").exists():
        p.error("needs Linux's /proc (the resident-set high-water mark)")
    results = {}
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    for name in args.optimizer:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--dtype", args.dtype, "--seq-len", str(args.seq_len),
               "--child", name] + (["--per-layer"] if args.per_layer else [])  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{name}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 2**30
    step = "the step with per-layer updates" if args.per_layer else "the step"
    print(f"{args.preset} {args.dtype}, 1 x {args.seq_len} tokens; GiB added to the resident set by {step}")
    print("| optimizer | analysed (peak - args) | refresh step | plain step | refresh step s | plain step s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [r["analysed_over_arguments_bytes"], r["refresh_added_bytes"], r["plain_added_bytes"]]
        times = [r["refresh_step_s"], r["plain_step_s"]]
        print(f"| {name} | " + " | ".join([f"{c / gib:.2f}" for c in cells] + [f"{t:.1f}" for t in times]) + " |")
    if args.json:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
        from lm import provenance

        record = {"provenance": provenance.record(argv, __file__), "preset": args.preset, "dtype": args.dtype,
                  "seq_len": args.seq_len, "per_layer": args.per_layer, "results": results}  # fmt: skip
        pathlib.Path(args.json).write_text(json.dumps(record, indent=1))
    return results


if __name__ == "__main__":
    main()
