"""The training loop: jitted steps, periodic validation, metrics, checkpoints, devices.

``train(config)`` runs one optimizer on one model and returns its results; ``train_lm.py`` is
its command line and ``compare.py`` calls it for each optimizer and learning rate.
"""

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import data as data_lib
from lm import model as model_lib
from lm import optim
from lm.config import TrainConfig


def maybe_initialize_distributed() -> None:
    """Starts multi-host JAX when a launcher set the usual environment (SLURM, Open MPI, explicit)."""
    if (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    ):
        jax.distributed.initialize()


def _param_spec(x: jax.Array, n: int) -> P:
    """FSDP-style: shard the largest axis divisible by the device count, else replicate."""
    for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
        if x.shape[axis] % n == 0:
            spec = [None] * x.ndim
            spec[axis] = "data"
            return P(*spec)
    return P()


def state_mib(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def build(cfg: TrainConfig) -> tuple[model_lib.LLaMA, optax.GradientTransformation]:
    """The model (initialized from ``cfg.seed``) and the optimizer with its schedule."""
    mcfg = model_lib.PRESETS[cfg.preset]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.dtype]
    model = model_lib.LLaMA(mcfg, dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    sched = optim.schedule(cfg.lr, cfg.steps, cfg.resolved_warmup())
    tx = optim.make_optimizer(
        cfg.optimizer, sched, rank=cfg.resolved_rank(), scale=cfg.scale, update_proj_gap=cfg.update_proj_gap,
        gamma=cfg.gamma, weight_decay=cfg.weight_decay, ablation=cfg.ablation,
    )  # fmt: skip
    return model, tx


def train(cfg: TrainConfig, log: Any = print) -> dict:
    """Trains ``cfg.optimizer`` on ``cfg.preset``; writes metrics.jsonl (and a plot) under ``cfg.out``."""
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens, val_tokens, description = data_lib.load_corpus(cfg.data)
    batches = data_lib.Batches(train_tokens, cfg.batch_size, cfg.seq_len, cfg.seed)
    val = data_lib.validation_batches(val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches)

    devices = jax.devices()
    n = len(devices)
    if cfg.batch_size % n:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {n} devices")
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))

    model, tx = build(cfg)
    params = nnx.state(model, nnx.Param)
    if cfg.mesh == "fsdp":
        specs = jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(x, n)), params)
    else:
        specs = jax.tree.map(lambda x: NamedSharding(mesh, P()), params)
    nnx.update(model, jax.device_put(params, specs))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    adamw_mib = state_mib(jax.eval_shape(optax.adamw(1e-3).init, nnx.to_pure_dict(params)))
    opt_mib = state_mib(nnx.state(optimizer))

    start_step = 0
    manager = None
    if cfg.checkpoint_every or cfg.resume:
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(
            (out / "checkpoints").resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )
        if cfg.resume and manager.latest_step() is not None:
            target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
            nnx.update(model, restored["model"])
            nnx.update(optimizer, restored["optimizer"])
            start_step = manager.latest_step()
            log(f"resumed from step {start_step}")

    @nnx.jit
    def train_step(model: model_lib.LLaMA, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(model_lib.loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def eval_step(model: model_lib.LLaMA, batch: jax.Array) -> jax.Array:
        return model_lib.loss_fn(model, batch)

    def evaluate() -> float:
        losses = [eval_step(model, jax.device_put(b, batch_sharding)) for b in val]
        return float(np.mean([float(x) for x in losses]))

    log(f"{description}: {len(train_tokens):,} train / {len(val_tokens):,} validation tokens")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(
        f"{cfg.optimizer} on {cfg.preset} ({n_params / 1e6:.2f}M params), {n} {devices[0].platform} device(s), "
        f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr}"
        + (f", rank {cfg.resolved_rank()}" if cfg.optimizer != "adamw" else "")
    )

    def say(msg: str) -> None:
        (bar.write if bar is not None else log)(msg)

    metrics_path = out / "metrics.jsonl"
    mode = "a" if start_step else "w"
    records: list[dict] = []
    step_times: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_start = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)
    with open(metrics_path, mode) as metrics_file:
        running = []
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            batch = jax.device_put(batches(step), batch_sharding)
            loss = train_step(model, optimizer, batch)
            running.append(loss)
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.log_every == 0 or last or (step + 1) % cfg.eval_every == 0:
                train_loss = float(np.mean([float(x) for x in running]))
                running = []
                record = {"step": step + 1, "train_loss": train_loss, "time": time.perf_counter() - t_start}
                if (step + 1) % cfg.eval_every == 0 or last:
                    val_loss = evaluate()
                    record |= {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
                    say(f"step {step + 1}: train {train_loss:.4f}  val {val_loss:.4f}  ppl {math.exp(val_loss):.2f}")
                if not math.isfinite(train_loss):
                    say(f"step {step + 1}: non-finite training loss {train_loss}; stopping")
                records.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / np.median(step_times or [1]):,.0f}"
                    )
                if not math.isfinite(train_loss):
                    break
            else:
                jax.block_until_ready(loss)
            step_times.append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
            if manager is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                import orbax.checkpoint as ocp

                state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
                manager.save(step + 1, args=ocp.args.StandardSave(state))
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.wait_until_finished()
    wall = time.perf_counter() - t_start
    final = next((r for r in reversed(records) if "val_loss" in r), {"val_loss": float("nan")})
    result = {
        "optimizer": cfg.optimizer,
        "preset": cfg.preset,
        "lr": cfg.lr,
        "final_val_loss": final["val_loss"],
        "final_val_ppl": math.exp(final["val_loss"]) if math.isfinite(final["val_loss"]) else float("nan"),
        "optimizer_state_mib": opt_mib,
        "adamw_state_mib": adamw_mib,
        "median_step_s": float(np.median(step_times[1:] if len(step_times) > 1 else step_times or [float("nan")])),
        "wall_s": wall,
        "records": records,
    }
    return result


def plot(runs: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    """Training (thin) and validation (markers) loss curves of several runs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["train_loss"] for r in records], color=color, alpha=0.35, lw=1)
        evals = [r for r in records if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=color, label=label, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    # One color per run; the line style says which curve is which.
    style = [
        plt.Line2D([], [], color="gray", alpha=0.5, lw=1, label="training loss (running mean)"),
        plt.Line2D([], [], color="gray", marker="o", ms=3, label="validation loss"),
    ]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + style)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
