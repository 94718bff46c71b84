"""Memory of SGD, AdamW, GaLore and Fira for the LLaMA presets, computed without allocating anything.

For each preset and optimizer: the parameters, gradients and optimizer state in bytes (from
``nnx.eval_shape`` of the model and its ``nnx.Optimizer``), and the peak memory of the compiled
train step: ``memory_analysis`` of the very step training runs (``lm/step.py``'s
``make_train_step``, the state donated) lowered on abstract values, for one batch of
``--batch-size`` x ``--seq-len`` tokens. Nothing is allocated, so a laptop reports 7B. ``sgd`` is
the same step with no optimizer state: the floor every optimizer pays (parameters, gradients in
flight, activations). Ranks are the authors' (60m 128, 130m 256, 350m 256, 1b 512, 7b 64).
``--dtype bfloat16`` stores parameters, gradients and state in bf16 and computes in bf16, as the
papers' memory estimates assume.

  python examples/memory_report.py --preset 60m 130m 350m 1b 7b
  python examples/memory_report.py --preset 7b --dtype bfloat16 --json

``--platform tpu-v5e`` (16 GiB chips) or ``tpu-v5p`` (95 GiB) compiles for one TPU chip without
one (libtpu's deviceless compilation; needs ``pip install "jax[tpu]"`` at the installed jax's
version): the CPU compiler upcasts bf16 matmuls to float32 and schedules differently, so its bf16
peaks overstate an accelerator's. Each row records its compile time.
``--breakdown K`` lists, to see where the peak goes, the K largest buffers of each compiled step
(XLA's memory-usage report of its buffer assignment) and the K largest groups of temporaries
alive at its peak (from the buffer assignment and the values' live ranges).

``--finetune`` reports instead, per fine-tuning method of ``finetune.py`` at its defaults (LoRA
rank 32 on q, k, v, up, down; GaLore / Fira rank 16; LoRA + Fira: Fira rank 16 on the LoRA
factors), the trainable parameters, the optimizer state and all weights (frozen ones and adapters
included), from ``eval_shape`` alone.

  python examples/memory_report.py --finetune --preset 7b --vocab-size 32000
"""

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fira_jax.projections import SVD_METHODS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from lm import config as config_lib
from lm import files, optim, provenance
from lm import model as model_lib
from lm import step as step_lib

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 64, "tiny": 32, "20m": 64, "micro": 8}
SCALES = {"1b": 0.0625, "7b": 0.0625}
VOCAB = 32_000  # T5's tokenizer, as in the papers
ROWS = ("sgd", "adamw", "galore", "fira")  # sgd: the same step without optimizer state (the floor)
EXTRA_ROWS = ("apollo", "apollo-mini")  # on request (--optimizer): APOLLO at the same ranks, APOLLO-Mini at rank 1
# GaLore's Table 2 (Fira's Table 3 reports the same): weights + optimizer state, BF16, in GB.
PAPER_GB = {
    "60m": {"adamw": 0.36, "galore": 0.24, "fira": 0.24},
    "130m": {"adamw": 0.76, "galore": 0.52, "fira": 0.52},
    "350m": {"adamw": 2.06, "galore": 1.22, "fira": 1.22},
    "1b": {"adamw": 7.80, "galore": 4.38, "fira": 4.38},
}
# TPU chips for deviceless compilation (--platform tpu-v5e / tpu-v5p): the topology, and what libtpu
# reads instead of a host. v5e has 16 GiB of HBM per chip, v5p 95 GiB.
TPU_CHIPS = {"tpu-v5e": ("v5e:2x2", "v5litepod-4"), "tpu-v5p": ("v5p:2x2x1", "v5p-8")}
PLATFORMS = ("cpu", *TPU_CHIPS)


def nbytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def optimizer(
    name: str, preset: str, hidden: int, svd: str = "exact", by_shape: bool = False
) -> optax.GradientTransformation:
    """The row's optimizer at the authors' rank and scale for ``preset``."""
    if name == "sgd":
        return optax.sgd(1e-3)
    rank, scale = RANKS.get(preset, hidden // 4), SCALES.get(preset, 0.25)
    return optim.make_optimizer(name, 1e-3, rank=rank, scale=scale, svd=svd, refresh_by_shape=by_shape)


def tpu_device(platform: str) -> Any:
    """One chip of a TPU topology, compiled for without a TPU (needs libtpu: ``jax[tpu]``)."""
    from jax.experimental import topologies

    topology, accelerator = TPU_CHIPS[platform]
    env = {"TPU_ACCELERATOR_TYPE": accelerator, "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1"}
    for key, val in env.items():
        os.environ.setdefault(key, val)
    try:
        return topologies.get_topology_desc(topology, platform="tpu").devices[0]
    except Exception as e:  # libtpu missing or unusable: one line, not a traceback
        need = f"pip install 'jax[tpu]=={jax.__version__}'"
        raise SystemExit(f"--platform {platform} needs libtpu ({need}): {e}") from None


def on_chip(tree: Any, platform: str) -> Any:
    """``tree``'s abstract arrays placed on one chip of ``platform`` (unchanged for the CPU)."""
    if platform == "cpu":
        return tree
    sharding = jax.sharding.SingleDeviceSharding(tpu_device(platform))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _dump_text(dump: str, suffix: str) -> str | None:
    """The text of the step's file in the XLA dump ``dump`` ending in ``suffix`` (the largest if several)."""
    files = glob.glob(os.path.join(dump, f"*jit_step*{suffix}"))
    return pathlib.Path(max(files, key=os.path.getsize)).read_text() if files else None


def largest_buffers(dump: str, k: int) -> list[tuple[int, str]]:
    """The ``k`` largest buffers of the step dumped in ``dump``: (bytes, the shapes XLA's memory-usage report lists).

    A buffer is one slot of the step's memory; several values whose lives do not overlap share it.
    """
    text = _dump_text(dump, "memory-usage-report.txt")
    if text is None:
        return []
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(";")]  # cumulative; size; offset; values; shapes
        if len(parts) == 5 and parts[3].isdigit():
            rows.append((_bytes(parts[1]), parts[4]))
    return sorted(rows, key=lambda r: -r[0])[:k]


def live_at_peak(dump: str, k: int) -> list[tuple[int, int, str, str]]:
    """The ``k`` largest groups of temporaries alive at the peak of the step dumped in ``dump``.

    From XLA's buffer assignment (each temporary's size, in the main temporary allocation) and its
    live ranges (each value's first and last position in the step's schedule): the position where
    the live temporaries sum highest, and the values alive there grouped by shape and by the
    operation that made them. Returns ``(bytes, count, shape, op_name)``, largest first; the sum
    can be below the allocation's size, which also holds the packing's gaps.
    """
    read = {kind: _dump_text(dump, f"after_optimizations-{kind}.txt")
            for kind in ("buffer-assignment", "live-range", "buffer-assignment-values")}  # fmt: skip
    if None in read.values():
        return []
    spans = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^ {4}(\S+):(\d+)-(\d+)$", read["live-range"], re.M)}
    ops = {}
    for block in read["buffer-assignment-values"].split("\n<")[1:]:
        name = block.split()[1]
        op = re.search(r'op_name="([^"]*)"', block.split("from instruction:")[-1])
        ops[name] = op[1] if op else ""
    temps = []  # (size, shape, op, first, last) of the main temporary allocation's values
    for alloc in read["buffer-assignment"].split("\nallocation ")[1:]:
        head = alloc.split("\n")[0]
        if "color" in head or not head.endswith("preallocated-temp:"):  # a color: another memory (TPU's VMEM)
            continue
        for m in re.finditer(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)", alloc):
            name = m[1] if "{" in m[1] else m[1] + "{}"
            if name in spans:
                temps.append((int(m[2]), m[3].split("{")[0], ops.get(m[1], ""), *spans[name]))
    if not temps:
        return []
    events: dict[int, int] = {}
    for size, _, _, first, last in temps:
        events[first] = events.get(first, 0) + size
        events[last + 1] = events.get(last + 1, 0) - size
    total, peak, at = 0, -1, 0
    for pos in sorted(events):
        total += events[pos]
        if total > peak:
            peak, at = total, pos
    groups: dict[tuple[str, str], list[int]] = {}
    for size, shape, op, first, last in temps:
        if first <= at <= last:
            g = groups.setdefault((shape, op), [0, 0])
            g[0], g[1] = g[0] + size, g[1] + 1
    rows = [(size, count, shape, op) for (shape, op), (size, count) in groups.items()]
    return sorted(rows, key=lambda r: -r[0])[:k]


def _bytes(text: str) -> int:
    """'2.69MiB' -> bytes (the report's units)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * size)
    raise ValueError(f"unknown size {text!r} in XLA's memory-usage report")


def build(
    preset: str, name: str, dtype: Any, vocab: int = VOCAB, svd: str = "exact", by_shape: bool = False,
    per_layer: bool = False, layers: int | None = None, grad_clip: float | None = None,
) -> tuple[model_lib.LLaMA, nnx.Optimizer | step_lib.LayerwiseOptimizer]:  # fmt: skip
    """The preset's model (parameters and compute in ``dtype``; ``layers`` blocks instead of the
    preset's, if given) and the row's optimizer: an ``nnx.Optimizer``, or with ``per_layer`` one
    per stage (``step_lib.LayerwiseOptimizer``); ``grad_clip``: clipped by the global gradient norm
    first, as ``train_lm.py --grad-clip`` does (the ordinary step only)."""
    if grad_clip is not None and per_layer:
        raise ValueError("--grad-clip needs every gradient before the first update: not with --per-layer")
    mcfg = dataclasses.replace(model_lib.PRESETS[preset], vocab_size=vocab)
    mcfg = mcfg if layers is None else dataclasses.replace(mcfg, layers=layers)
    model = model_lib.LLaMA(mcfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    tx = optimizer(name, preset, mcfg.hidden, svd, by_shape)
    if grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    if per_layer:
        return model, step_lib.LayerwiseOptimizer(model, tx, model_lib.stages)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_step(per_layer: bool = False) -> Any:
    """The step training runs (``lm/step.py``): the ordinary one, or with per-layer updates."""
    if per_layer:
        return step_lib.make_layerwise_train_step(model_lib.stages)
    return step_lib.make_train_step(model_lib.loss_fn)


def state_bytes(opt: nnx.Optimizer | step_lib.LayerwiseOptimizer) -> int:
    """Bytes of the optimizer's state (every stage's, for a ``LayerwiseOptimizer``)."""
    parts = opt.parts if isinstance(opt, step_lib.LayerwiseOptimizer) else [opt]
    return sum(nbytes(part.opt_state) for part in parts)


def _compile(lowered: Any, label: str, dump: str | None) -> Any:
    """The compiled step, or None when the (TPU) compiler refuses a step larger than the chip."""
    try:
        return lowered.compile(compiler_options={"xla_dump_to": dump} if dump else None)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"{label}: does not fit the chip: {str(e).splitlines()[0]}", file=sys.stderr)
        return None


def report(preset: str, name: str, dtype: Any, batch_size: int, seq_len: int, vocab: int = VOCAB,
           platform: str = "cpu", breakdown: int = 0, svd: str = "exact", by_shape: bool = False,
           per_layer: bool = False, layers: int | None = None, grad_clip: float | None = None) -> dict:  # fmt: skip
    """Bytes of parameters, gradients, state, and the compiled train step's peak, for one optimizer."""
    model, opt = nnx.eval_shape(lambda: build(preset, name, dtype, vocab, svd, by_shape, per_layer, layers, grad_clip))
    graphdef, state = nnx.split((model, opt))
    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    state, batch = on_chip((state, batch), platform)
    lowered = train_step(per_layer).lower(graphdef, state, batch)
    buffers = None
    start = time.perf_counter()
    if breakdown:  # compiled afresh (a persistent compilation cache would skip the dump)
        cache = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            with tempfile.TemporaryDirectory() as dump:
                compiled = _compile(lowered, f"{preset} {name}", dump)
                buffers = largest_buffers(dump, breakdown)
                live = live_at_peak(dump, breakdown)
        finally:
            jax.config.update("jax_enable_compilation_cache", cache)
    else:
        compiled = _compile(lowered, f"{preset} {name}", None)
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis() if compiled is not None else None
    peak = None
    if mem is not None:
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    params = nnx.state(model, nnx.Param)
    out = {"params_bytes": nbytes(params), "grads_bytes": nbytes(params), "state_bytes": state_bytes(opt),
           "peak_bytes": peak, "compile_seconds": round(seconds, 1)}  # fmt: skip
    if buffers is not None:
        out["largest_buffers"] = buffers
        out["live_at_peak"] = live
    return out


def finetune_report(preset: str, method: str, dtype: Any, vocab: int = VOCAB) -> dict:
    """Trainable parameters and optimizer-state bytes of one fine-tuning method (finetune.py's defaults)."""
    import finetune

    mcfg = dataclasses.replace(model_lib.PRESETS[preset], vocab_size=vocab)
    defaults = finetune.parser().parse_args(["--checkpoint", "unused"])
    made = []

    def build() -> model_lib.LLaMA:
        model = model_lib.LLaMA(mcfg, dtype=dtype, rngs=nnx.Rngs(0))
        made.append(finetune.make_optimizer(method, model, 1e-4, defaults))
        return model

    abstract = nnx.eval_shape(build)
    wrt, tx = made[0]
    pure = nnx.to_pure_dict(nnx.state(abstract, wrt))
    trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), pure)
    state = jax.eval_shape(tx.init, trainable)
    count = sum(x.size for x in jax.tree.leaves(trainable))
    weights = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) * jnp.dtype(dtype).itemsize
    return {"trainable_params": count, "trainable_bytes": nbytes(trainable), "state_bytes": nbytes(state),
            "weights_bytes": weights}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = config_lib.parser(__file__, __doc__)
    p.add_argument(
        "--preset", nargs="+", default=["60m", "130m", "350m", "1b", "7b"], choices=sorted(model_lib.PRESETS)
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of parameters, grads, state")
    p.add_argument("--batch-size", type=int, default=1, help="sequences in the step whose peak is measured")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=VOCAB, help="default T5's 32,000, as in the papers")
    p.add_argument("--optimizer", nargs="+", default=list(ROWS), choices=ROWS + EXTRA_ROWS, help="rows to report")
    p.add_argument(
        "--platform", choices=PLATFORMS, default="cpu",
        help="compile for this machine's CPU or, deviceless, for one TPU v5e or v5p chip (needs jax[tpu])",
    )  # fmt: skip
    p.add_argument(
        "--svd", choices=SVD_METHODS, default="exact",
        help="how GaLore and Fira compute the basis (on TPU, gram compiles in seconds)",
    )  # fmt: skip
    p.add_argument(
        "--refresh-by-shape", action="store_true",
        help="GaLore and Fira refresh same-shaped matrices together, one compiled SVD per shape (for TPU)",
    )  # fmt: skip
    p.add_argument(
        "--per-layer", action="store_true",
        help="the step with per-layer updates (lm/step.py's make_layerwise_train_step): each stage's update "
        "applied as soon as its gradient exists",
    )  # fmt: skip
    p.add_argument(
        "--grad-clip", type=float, metavar="NORM",
        help="clip by the global gradient norm first (the paper-7b recipe's 1.0; the ordinary step only)",
    )  # fmt: skip
    p.add_argument(
        "--breakdown", type=int, default=0, metavar="K",
        help="list each step's K largest buffers and groups of temporaries alive at its peak",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--save", metavar="FILE", help="also write the figures and their provenance to FILE (JSON)")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning methods of finetune.py instead")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.vocab_size < 1 or args.breakdown < 0:
        p.error("--batch-size, --seq-len and --vocab-size must be >= 1, --breakdown >= 0")
    if args.grad_clip is not None and (args.per_layer or not args.grad_clip > 0):
        p.error("--grad-clip must be > 0, and needs the ordinary step: per-layer updates cannot clip globally")
    if args.save:
        try:
            files.check_folder(pathlib.Path(args.save).expanduser().parent, "--save")
        except files.OutputError as e:
            p.error(str(e))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if args.finetune:
        return _finetune_main(args, dtype)
    out = {}
    for preset in args.preset:
        out[preset] = {}
        for name in args.optimizer:
            out[preset][name] = report(
                preset, name, dtype, args.batch_size, args.seq_len, args.vocab_size, args.platform, args.breakdown,
                args.svd, args.refresh_by_shape, args.per_layer, grad_clip=args.grad_clip,
            )  # fmt: skip
            if not args.json:
                print(f"{preset} {name}: compiled", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out))
    write(args, argv, out)
    return out


def write(args: argparse.Namespace, argv: list[str] | None, out: dict) -> None:
    """The tables (unless ``--json``), and with ``--save FILE`` FILE.json and its page FILE.md, rendered
    from it (only a saved file needs its provenance)."""
    saved = {"dtype": args.dtype, "platform": args.platform, "svd": args.svd,
             "refresh_by_shape": args.refresh_by_shape, "per_layer": args.per_layer,
             **({"grad_clip": args.grad_clip} if args.grad_clip is not None else {}),
             "tokens": [args.batch_size, args.seq_len], "vocab_size": args.vocab_size, "report": out}  # fmt: skip
    if args.save:
        saved = {"provenance": provenance.record(argv, __file__)} | saved
        path = pathlib.Path(args.save)
        files.write_text(path, json.dumps(saved, indent=1))
        files.write_text(path.with_suffix(".md"), render(saved))
    if not args.json:
        print(render(saved, heading=False))


def render(saved: dict, heading: bool = True) -> str:
    """The tables of a ``--save`` file (its page, results/memory_<dtype>.md), from its JSON."""
    gib, dtype, platform = 2**30, saved["dtype"], saved["platform"]
    batch, seq = saved["tokens"]
    lines = []
    if heading:
        prov = saved["provenance"]
        lines += [f"# Train-step memory, {dtype}, {platform.upper()} compiler", "", f"`{prov['command']}`", "",
                  f"Made on {provenance.describe(prov)}.", ""]  # fmt: skip
    paper_col = dtype == "bfloat16"  # the paper's estimates are bf16: beside bf16 figures only
    for preset, rows in saved["report"].items():
        lines += [
            f"{preset} ({dtype}, rank {RANKS.get(preset)}, svd={saved.get('svd', 'exact')!r}"
            + (", refresh by shape" if saved.get("refresh_by_shape") else "")
            + (", per-layer updates" if saved.get("per_layer") else "")
            + (f", clipped to global norm {saved['grad_clip']:g}" if saved.get("grad_clip") is not None else "") + ", "
            f"{platform.upper()} compiler, peak for {batch} x {seq} tokens)",
            "",
            "| optimizer | params GiB | grads GiB | state GiB | params + state GiB |"
            + (" paper GB |" if paper_col else "") + " peak GiB | (peak - state) / SGD peak | compile s |",
            "|---|---|---|---|---|" + ("---|" if paper_col else "") + "---|---|---|",
        ]  # fmt: skip
        floor = rows.get("sgd", {}).get("peak_bytes")
        for name, r in rows.items():
            cells = [r["params_bytes"], r["grads_bytes"], r["state_bytes"], r["params_bytes"] + r["state_bytes"]]
            line = f"| {name} | " + " | ".join(f"{c / gib:.3f}" for c in cells) + " |"
            if paper_col:
                line += f" {PAPER_GB.get(preset, {}).get(name, '')} |"
            peak = r["peak_bytes"]
            line += " n/a |" if peak is None else f" {peak / gib:.2f} |"
            line += f" {(peak - r['state_bytes']) / floor:.3f} |" if peak is not None and floor else " |"
            line += f" {r['compile_seconds']:.0f} |"
            lines.append(line)
        for name, r in rows.items():
            if r.get("largest_buffers"):
                lines += ["", f"{preset} {name}: largest buffers of the step", ""]
                lines += [f"    {size / 2**20:9.1f} MiB  {shapes}" for size, shapes in r["largest_buffers"]]
            if r.get("live_at_peak"):
                lines += ["", f"{preset} {name}: temporaries alive at the peak, by shape and operation", ""]
                lines += [f"    {size / 2**20:9.1f} MiB  {count:4d} x {shape}  {op}"
                          for size, count, shape, op in r["live_at_peak"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _finetune_main(args: argparse.Namespace, dtype: Any) -> dict:
    import finetune

    out = {preset: {m: finetune_report(preset, m, dtype, args.vocab_size) for m in finetune.METHODS}
           for preset in args.preset}  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return out
    gib = 2**30
    for preset, rows in out.items():
        print(f"\n{preset} fine-tuning ({args.dtype}, vocabulary {args.vocab_size:,}; finetune.py's defaults)")
        print("| method | trainable params | optimizer state GiB | all weights GiB | weights + state GiB |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            cells = [r["state_bytes"], r["weights_bytes"], r["weights_bytes"] + r["state_bytes"]]
            print(f"| {name} | {r['trainable_params']:,} | " + " | ".join(f"{c / gib:.3f}" for c in cells) + " |")
    return out


if __name__ == "__main__":
    main()
