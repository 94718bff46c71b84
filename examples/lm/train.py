"""Pre-training: the model, data, optimizer, mesh and checkpoints that the shared loop
(``lm/loop.py``) runs; devices and hosts.

``train(config)`` runs one optimizer on one model and returns its results; ``train_lm.py`` is
its command line and ``compare.py`` calls it for each optimizer and learning rate.

Many devices: a mesh of every device of every process with the axes ``data``, ``fsdp`` and
``tensor`` (``--mesh``); the batch's rows are sharded over ``data`` x ``fsdp``, and each
parameter by its logical axes (``lm/sharding.py``'s one table). Many processes:
each process reads only its rows of each global batch (``jax.make_array_from_process_local_data``),
every process runs the same steps, and only process 0 writes metrics, plots and logs.
"""

import dataclasses
import math
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from lm import checkpoints, files, loop, optim, runlog
from lm import config as config_lib
from lm import data as data_lib
from lm import model as model_lib
from lm import prepare as prepare_lib
from lm import sharding as sharding_lib
from lm import step as step_lib
from lm.config import TrainConfig

# Dense bf16 peak FLOP/s per device, for model FLOPs utilisation (MFU); others report none.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}  # fmt: skip


def maybe_initialize_distributed(cfg: TrainConfig | None = None) -> None:
    """Starts multi-process JAX from the flags, or when a launcher set the usual environment."""
    explicit = cfg is not None and cfg.coordinator_address is not None
    launched = (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if not (explicit or launched):
        return
    # Collectives between processes' CPU devices (the option concerns the CPU backend only).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    else:
        jax.distributed.initialize()


def state_mib(tree: Any) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def model_config(cfg: TrainConfig, vocab_size: int, eos_token_id: int | None = None) -> model_lib.ModelConfig:
    """The preset with the tokenizer's vocabulary (rounded up to a multiple of 128) and end-of-text id."""
    preset = model_lib.PRESETS[cfg.preset]
    max_seq_len = max(preset.max_seq_len, cfg.seq_len)  # an export says at least what was trained
    return dataclasses.replace(preset, vocab_size=vocab_size, eos_token_id=eos_token_id, max_seq_len=max_seq_len)


def build(cfg: TrainConfig, vocab_size: int = 256, eos_token_id: int | None = None,
          mesh: jax.sharding.Mesh | None = None) -> tuple[model_lib.LLaMA, optax.GradientTransformation]:  # fmt: skip
    """The model (initialized from ``cfg.seed``) and the optimizer with its schedule.

    With a ``mesh`` of several devices the model is initialized under ``jax.jit`` straight into its
    shardings (``lm.sharding.init_sharded``: no device holds more than its shards); else eagerly,
    on one device. The two agree within one float32 ulp (the compiled random-number program rounds
    a few values differently from the eager one); the jitted one is the same on any mesh, bit for bit.
    """
    dtype, param_dtype = (jnp.dtype(name) for name in (cfg.dtype, cfg.param_dtype))
    mcfg = model_config(cfg, vocab_size, eos_token_id)

    def make() -> model_lib.LLaMA:
        return model_lib.LLaMA(mcfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(cfg.seed), remat=cfg.remat)

    model = sharding_lib.init_sharded(make, mesh) if mesh is not None and mesh.size > 1 else make()
    sched = optim.schedule(cfg.lr, cfg.steps, cfg.resolved_warmup())
    tx = optim.make_optimizer(
        cfg.optimizer, sched, rank=cfg.resolved_rank(), scale=cfg.scale, update_proj_gap=cfg.update_proj_gap,
        gamma=cfg.gamma, weight_decay=cfg.weight_decay, ablation=cfg.ablation, svd=cfg.svd,
        apollo_scale=cfg.apollo_scale, moments=cfg.moments,
    )  # fmt: skip
    if cfg.grad_clip:  # None or 0: no clipping
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return model, tx


def flops_per_token(mcfg: model_lib.ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters + head) + attention (PaLM's count)."""
    h, layers = mcfg.hidden, mcfg.layers
    per_layer = 4 * h * h + 3 * h * mcfg.intermediate
    return 6 * (layers * per_layer + h * mcfg.vocab_size) + 12 * layers * h * seq_len


def _process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a global batch that live on this process's devices (one contiguous range)."""
    spans = [idx[0] for idx in sharding.addressable_devices_indices_map(shape).values()]
    start = min(s.start or 0 for s in spans)
    stop = max(shape[0] if s.stop is None else s.stop for s in spans)
    return slice(start, stop)


def _global_batch(local: np.ndarray, sharding: NamedSharding, shape: tuple[int, ...]) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, shape)


def _place(tree: Any, shardings: Any) -> Any:
    """Puts host-identical values on a (possibly multi-process) mesh."""

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree, shardings)


class Data(NamedTuple):
    """The corpus, its training batches (a function of the step) and its validation batches."""

    corpus: Any
    batches: data_lib.Batches
    val: list[np.ndarray]


class Feed(NamedTuple):
    """How each global batch is laid on the mesh, and which of its rows this process reads."""

    train_sharding: NamedSharding
    train_shape: tuple[int, ...]
    train_rows: np.ndarray
    val_sharding: NamedSharding
    val_shape: tuple[int, ...]
    val_rows: slice


def check_outputs(cfg: TrainConfig) -> None:
    """Before any work (process 0): a place that cannot be written costs a one-line error, not a run."""
    files.check_folder(cfg.out, "--out", create=False)
    if cfg.resume:
        checkpoints.check_resumable(pathlib.Path(cfg.out).expanduser())
    if cfg.export:
        files.check_folder(cfg.export, "--export", create=False)


def load_data(cfg: TrainConfig, log: Any) -> Data:
    """The prepared corpus, read as micro-batches of ``cfg.seq_len + 1`` tokens."""
    corpus = prepare_lib.load(cfg.data, cfg.tokenizer, log=log)
    micro = cfg.batch_size // cfg.grad_accum
    val = data_lib.validation_batches(corpus.val, micro, cfg.seq_len, cfg.eval_batches)
    if not val:
        raise data_lib.DataError(f"{corpus.description}: the validation split is shorter than one batch")
    return Data(corpus, data_lib.Batches(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed), val)


def make_feed(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> Feed:
    """Batches' rows sharded over the mesh's data x fsdp devices; a training batch has a leading
    accumulation axis when ``cfg.grad_accum > 1``."""
    micro = cfg.batch_size // cfg.grad_accum
    rows = sharding_lib.batch_rows(mesh.shape)
    if micro % rows:
        raise sharding_lib.MeshError(f"--batch-size / --grad-accum = {micro} must be divisible by the mesh's data x "
                                     f"fsdp = {rows} devices")  # fmt: skip
    val_sharding, val_shape = sharding_lib.batch_sharding(mesh), (micro, cfg.seq_len + 1)
    if cfg.grad_accum == 1:  # (row, token)
        train_sharding, train_shape = val_sharding, val_shape
    else:  # (accumulation step, row, token)
        train_sharding = sharding_lib.batch_sharding(mesh, leading=1)
        train_shape = (cfg.grad_accum, micro, cfg.seq_len + 1)
    val_rows = _process_rows(val_sharding, val_shape)  # a micro-batch is sharded like a validation batch
    # This process's rows of the global batch: its rows of each accumulation step's micro-batch.
    train_rows = np.concatenate([np.arange(a * micro + val_rows.start, a * micro + val_rows.stop)
                                 for a in range(cfg.grad_accum)])  # fmt: skip
    return Feed(train_sharding, train_shape, train_rows, val_sharding, val_shape, val_rows)


def make_model_and_optimizer(cfg: TrainConfig, meta: dict, mesh: jax.sharding.Mesh) -> tuple[Any, Any, Any]:
    """The model on the mesh, its optimizer (one per stage with ``cfg.per_layer_updates``) and the step."""
    model, tx = build(cfg, meta["model_vocab_size"], meta.get("separator"), mesh)  # documents end with the separator
    params = nnx.state(model, nnx.Param)
    if mesh.size == 1:
        nnx.update(model, _place(params, sharding_lib.param_shardings(params, mesh)))
    if cfg.per_layer_updates:  # one optimizer per stage, each stage's update applied in the backward pass
        optimizer = step_lib.LayerwiseOptimizer(model, tx, model_lib.stages)
        train_step = step_lib.make_layerwise_train_step(model_lib.stages)
    else:
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        train_step = step_lib.make_train_step(model_lib.loss_fn, nnx.Param, cfg.grad_accum)
    sharding_lib.replicate_rest(mesh, model, optimizer)  # the step counts too: the step compiles once, not twice
    return model, optimizer, train_step


def device_memory(devices: list) -> tuple[int | None, str]:
    """(bytes one device may use, what that is): an accelerator's limit, or the host's memory shared
    by its CPU devices; None where unknown."""
    if devices[0].platform != "cpu":
        return (devices[0].memory_stats() or {}).get("bytes_limit"), f"of one {devices[0].device_kind}"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None, ""
    return total // len(jax.local_devices()), "of this machine's memory per CPU device"


def check_room(cfg: TrainConfig, out: pathlib.Path, model: Any, optimizer: Any) -> None:
    """Room for the checkpoints kept, and for an export (the parameters once), before the first step."""
    ckpt_bytes = checkpoints.kept_bytes(model, optimizer) if cfg.checkpoint_every else 0
    files.check_folder(out, "--out", need_bytes=ckpt_bytes)
    if cfg.export:
        params_bytes = int(state_mib(nnx.state(model, nnx.Param)) * 2**20)
        files.check_folder(cfg.export, "--export", need_bytes=params_bytes, create=False)


def describe(cfg: TrainConfig, corpus: Any, model: Any, devices: list) -> list[str]:
    """The two header lines: the data, then the run."""
    bpt = corpus.bytes_per_token
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return [
        f"{corpus.description}: {len(corpus.train):,} train / {len(corpus.val):,} validation tokens "
        f"({corpus.meta['tokenizer']}, vocabulary {corpus.meta['vocab_size']:,}, {bpt:.2f} bytes/token)",
        f"{cfg.optimizer} on {cfg.preset} ({n_params / 1e6:.2f}M params), {len(devices)} {devices[0].platform} "
        f"device(s) in {jax.process_count()} process(es), {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens"
        + (f" ({cfg.grad_accum} accumulation steps)" if cfg.grad_accum > 1 else "")
        + (", per-layer updates" if cfg.per_layer_updates else "")
        + f", lr {cfg.lr}"
        + (f", rank {cfg.resolved_rank()}" if cfg.optimizer != "adamw" else ""),
    ]


def peak_flops(devices: list) -> float | None:
    """The devices' combined dense bf16 peak FLOP/s (:data:`PEAK_FLOPS`), None where unknown or on CPU."""
    kind = devices[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None) if devices[0].platform != "cpu" else None
    return peak * len(devices) if peak else None


def train(cfg: TrainConfig, log: Any = print) -> dict:
    """Trains ``cfg.optimizer`` on ``cfg.preset``; writes metrics.jsonl under ``cfg.out`` (process 0)."""
    lead = jax.process_index() == 0
    log = log if lead else (lambda msg: None)
    if lead:
        check_outputs(cfg)
    data = load_data(cfg, log)  # 1. data
    out = pathlib.Path(cfg.out).expanduser()  # created once the data is known to be good
    devices = jax.devices()
    mesh = sharding_lib.make_mesh(sharding_lib.parse_mesh(cfg.mesh, len(devices)), devices)
    feed = make_feed(cfg, mesh)
    rows = cfg.batch_size // cfg.grad_accum // sharding_lib.batch_rows(mesh.shape)
    config_lib.check_fits(cfg, data.corpus.meta["model_vocab_size"], rows, *device_memory(devices))
    model, optimizer, train_step = make_model_and_optimizer(cfg, data.corpus.meta, mesh)  # 2. model, optimizer, step
    if lead:
        check_room(cfg, out, model, optimizer)
    manager = checkpoints.manager(out, cfg.checkpoint_every, cfg.resume)
    run_config = resume_record(cfg, data.corpus.meta)
    start_step, wall_before = (
        checkpoints.restore(manager, model, optimizer, run_config, log, cfg.steps) if cfg.resume else (0, 0.0)
    )
    for line in describe(cfg, data.corpus, model, devices):
        log(line)
    vocab = data.corpus.meta["model_vocab_size"]

    @nnx.jit
    def eval_step(model: model_lib.LLaMA, batch: jax.Array) -> jax.Array:
        return model_lib.loss_fn(model, batch)

    def validation() -> dict[str, float]:
        losses = [
            eval_step(model, _global_batch(b[feed.val_rows], feed.val_sharding, feed.val_shape)) for b in data.val
        ]
        val_loss = float(jnp.mean(jnp.stack(losses)))  # one wait, after every batch is dispatched
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_bpb": bits_per_byte(val_loss, data.corpus)}

    def batch(step: int) -> jax.Array:
        local = data.batches(step, feed.train_rows).reshape(*feed.train_shape[:-2], -1, cfg.seq_len + 1)
        return _global_batch(local, feed.train_sharding, feed.train_shape)

    def checkpoint(step: int, wall: float, force: bool) -> None:  # force: after a Ctrl-C
        checkpoints.save(manager, step, 1 if force else cfg.checkpoint_every, model, optimizer, run_config, wall)

    try:
        # The mesh in context: the optimizer's refresh spreads each group's matrices over its devices.
        with runlog.RunLog(out if lead else None, cfg.steps, start_step, cfg.progress, log, cfg.tensorboard) as run, \
                jax.set_mesh(mesh):  # fmt: skip
            result = loop.run(  # 3. the loop
                run, lambda b: step_lib.run_step(train_step, model, optimizer, b), batch, start_step, cfg.steps,
                log_every=cfg.log_every, eval_every=cfg.eval_every, evaluate=validation, checkpoint=checkpoint,
                throughput=lambda step_s: throughput(cfg, vocab, step_s, devices), wall_before=wall_before,
                profile=config_lib.profile_window(cfg), profile_dir=str(out / "profile"),
            )  # fmt: skip
            records = run.earlier + result.records  # a resumed run's records continue its first part's
    except loop.StoppedError:
        checkpoints.close(manager)  # the Ctrl-C's checkpoint, written
        raise
    checkpoints.close(manager)
    if cfg.export:
        export(model, cfg.export, fallback=out / "export")
    return summary(cfg, data.corpus, model, optimizer, result, records, devices)


def bits_per_byte(nats_per_token: float, corpus: Any) -> float:
    return nats_per_token / corpus.bytes_per_token / math.log(2)


def throughput(cfg: TrainConfig, vocab: int, step_s: float, devices: list) -> dict[str, float]:
    """Tokens per second, and the model FLOPs utilisation where the devices' peak is known."""
    tokens = cfg.batch_size * cfg.seq_len
    flops = flops_per_token(model_config(cfg, vocab), cfg.seq_len)
    peak = peak_flops(devices)
    return {"tokens_per_s": tokens / step_s} | ({"mfu": flops * tokens / step_s / peak} if peak else {})


def summary(
    cfg: TrainConfig, corpus: Any, model: Any, optimizer: Any, result: Any, records: list, devices: list
) -> dict:
    """What ``train`` returns: the final validation loss, state sizes, speed and memory, every record."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    memory = devices[0].memory_stats() if devices[0].platform != "cpu" else None
    final = next((r for r in reversed(records) if "val_loss" in r), {"val_loss": float("nan")})
    speed = throughput(cfg, corpus.meta["model_vocab_size"], result.median_step_s, devices)
    return {
        "optimizer": cfg.optimizer,
        "preset": cfg.preset,
        "lr": cfg.lr,
        "tokenizer": corpus.meta["tokenizer"],
        "final_val_loss": final["val_loss"],
        "final_val_ppl": math.exp(final["val_loss"]) if math.isfinite(final["val_loss"]) else float("nan"),
        "final_val_bpb": bits_per_byte(final["val_loss"], corpus),
        "optimizer_state_mib": state_mib(nnx.state(optimizer)),
        "adamw_state_mib": state_mib(jax.eval_shape(optax.adamw(1e-3).init, params)),
        "median_step_s": result.median_step_s,
        "tokens_per_s": speed["tokens_per_s"],
        "mfu": speed.get("mfu"),
        "peak_bytes_in_use": (memory or {}).get("peak_bytes_in_use"),
        "wall_s": result.wall_s,
        "records": records,
    }


# Settings a resumed run may change: where it writes and reads, how often it reports, its devices.
RESUMABLE_CHANGES = ("out", "export", "data", "eval_every", "eval_batches", "log_every", "checkpoint_every", "resume",
                     "remat", "mesh", "progress", "tensorboard", "profile", "coordinator_address", "num_processes",
                     "process_id")  # fmt: skip


def resume_record(cfg: TrainConfig, meta: dict) -> dict[str, Any]:
    """What a checkpoint records of its run, and a resumed run must repeat: every setting but
    :data:`RESUMABLE_CHANGES`, with the data's tokenizer and vocabulary in place of its path."""
    record = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return record | {"tokenizer": meta["tokenizer"], "vocabulary": meta["model_vocab_size"]}


def export(model: model_lib.LLaMA, path: str, fallback: pathlib.Path | None = None) -> None:
    """Saves ``model`` as a Hugging Face checkpoint; with several processes, gathered and written by process 0.

    Raises:
      files.OutputError: writing ``path`` failed; the model went to ``fallback`` instead (named in
        the message) when that could be written.
    """
    from lm import hf

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), params))
    if jax.process_index() == 0:
        hf.save_or_keep(model, path, "--export", fallback)


def plot(runs: dict[str, list[dict]], path: pathlib.Path, title: str, unit: str = "nats/token") -> None:
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
    ax.set_ylabel(f"loss ({unit})")
    ax.set_title(title)
    # One color per run; the line style says which curve is which.
    style = [
        plt.Line2D([], [], color="gray", alpha=0.5, lw=1, label="training loss (running mean)"),
        plt.Line2D([], [], color="gray", marker="o", ms=3, label="validation loss"),
    ]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + style)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")  # written whole, then renamed over the old
    fig.savefig(staging, dpi=120)
    plt.close(fig)
    os.replace(staging, path)
