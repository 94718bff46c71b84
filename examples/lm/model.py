"""A LLaMA-style decoder in Flax NNX: RMSNorm, rotary embeddings, causal attention, SwiGLU.

The presets mirror the configurations of the Fira and GaLore papers (LLaMA 60M ... 1B) plus a
``tiny`` and ``micro`` one for CPUs and tests. Attention and MLP kernels sit under paths that
contain "attn" and "mlp", the papers' target modules for low-rank projection; the embedding,
the norms and the output head do not.

The blocks are scanned, as in MaxText (``scan_layers``) and levanter: ``model.layers`` is one
:class:`Block` whose every parameter holds all layers along a leading axis (made with
:func:`stacked`), and :func:`scan_blocks` runs them with ``jax.lax.scan``, so the step compiles one
block whatever the depth. A kernel is then an ``(layers, in, out)`` leaf: a stack of matrices, which
the optimizers are told (``fira_jax.axes_by_path``, ``lm.optim``). ``remat`` picks what the
backward pass recomputes instead of keeping: nothing (``"none"``), the whole block from its input
(``"block"``), or all but its matrix products (``"dots"``).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lm.step import Stage


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # byte-level tokens
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    layers: int = 4
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    kv_heads: int | None = None  # grouped-query attention: key/value heads (default: heads)
    tie_embeddings: bool = False  # the output head reuses the input embedding
    # Token ids a Hugging Face export records (config.json, generation_config.json); no effect on the math.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads


# Hidden / intermediate / heads / layers as in the papers' LLaMA configs.
PRESETS = {
    "micro": ModelConfig(hidden=32, intermediate=88, heads=2, layers=1),
    "tiny": ModelConfig(hidden=128, intermediate=344, heads=4, layers=4),
    "20m": ModelConfig(hidden=256, intermediate=688, heads=4, layers=4),
    "60m": ModelConfig(hidden=512, intermediate=1376, heads=8, layers=8),
    "130m": ModelConfig(hidden=768, intermediate=2048, heads=12, layers=12),
    "350m": ModelConfig(hidden=1024, intermediate=2736, heads=16, layers=24),
    "1b": ModelConfig(hidden=2048, intermediate=5461, heads=32, layers=24),
    "7b": ModelConfig(hidden=4096, intermediate=11008, heads=32, layers=32),
}


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype = jnp.float32) -> None:
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...]).astype(x.dtype)


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on (batch, seq, heads, head_dim), rotating half-dimension pairs."""
    seq, head_dim = x.shape[1], x.shape[-1]
    freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]  # (seq, head_dim/2)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _linear(d_in: int, d_out: int, dtype: jnp.dtype, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> nnx.Linear:
    init = nnx.initializers.normal(stddev=0.02)
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with rotary embeddings; grouped-query when ``kv_heads < heads``."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> None:
        self.heads, self.kv_heads, self.head_dim, self.theta = cfg.heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta
        kv = cfg.num_kv_heads * cfg.head_dim
        self.q = _linear(cfg.hidden, cfg.hidden, dtype, rngs, param_dtype)
        self.k = _linear(cfg.hidden, kv, dtype, rngs, param_dtype)
        self.v = _linear(cfg.hidden, kv, dtype, rngs, param_dtype)
        self.o = _linear(cfg.hidden, cfg.hidden, dtype, rngs, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, d = x.shape
        q = rotary(self.q(x).reshape(b, s, self.heads, self.head_dim), self.theta)
        k = rotary(self.k(x).reshape(b, s, self.kv_heads, self.head_dim), self.theta)
        v = self.v(x).reshape(b, s, self.kv_heads, self.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.reshape(b, s, d))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> None:
        self.gate = _linear(cfg.hidden, cfg.intermediate, dtype, rngs, param_dtype)
        self.up = _linear(cfg.hidden, cfg.intermediate, dtype, rngs, param_dtype)
        self.down = _linear(cfg.intermediate, cfg.hidden, dtype, rngs, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, param_dtype: jnp.dtype) -> None:
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype)
        self.attn = Attention(cfg, dtype, rngs, param_dtype)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype)
        self.mlp = MLP(cfg, dtype, rngs, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


REMAT = ("none", "block", "dots")


def stack(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose every variable is the stack of ``modules``' (alike) along a new leading axis."""
    graphdef, _ = nnx.split(modules[0])
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules]))


def stacked(layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """``make(rngs)`` for ``layers`` layers, stacked (:func:`stack`). The layers are made one after
    another from ``rngs``, as a Python list of layers is: a scanned model starts from the numbers
    an unscanned one of the same seed would."""
    return stack([make(rngs) for _ in range(layers)])


def remat(fn: Callable, policy: str) -> Callable:
    """``fn`` under ``jax.checkpoint`` as ``policy`` (one of :data:`REMAT`) says."""
    if policy not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, got {policy!r}")
    if policy == "none":
        return fn
    if policy == "block":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def scan_blocks(layers: nnx.Module, x: jax.Array, policy: str = "none") -> jax.Array:
    """Runs the stacked ``layers`` on ``x`` one layer after another (``jax.lax.scan``); a layer's
    RNG state (LoRA's dropout) advances in place."""
    graphdef, state = nnx.split(layers)

    def body(x: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, nnx.State]:
        layer = nnx.merge(graphdef, layer_state)
        return layer(x), nnx.state(layer, nnx.RngState)

    x, rng_state = jax.lax.scan(remat(body, policy), x, state)
    nnx.update(layers, rng_state)
    return x


# What each axis of each parameter is: logical axis names, as MaxText's, that lm/sharding.py's
# RULES map to mesh axes. Keyed by (module, parameter); a kernel is (in, out).
_LOGICAL = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("q", "kernel"): ("embed", "heads"), ("k", "kernel"): ("embed", "heads"), ("v", "kernel"): ("embed", "heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"), ("up", "kernel"): ("embed", "mlp"), ("down", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("attn_norm", "weight"): ("norm",), ("mlp_norm", "weight"): ("norm",), ("norm", "weight"): ("norm",),
}  # fmt: skip


def path_names(path: tuple) -> tuple[str, ...]:
    """A pytree path of an ``nnx.State`` as names (``("layers", "attn", "q", "kernel")``)."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def logical_axes(names: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical axis names of the parameter at ``names`` with ``ndim`` axes (``layers`` first
    for the stacked blocks'). A LoRA factor (``.../q/lora/lora_a``, ``(in, r)``; ``lora_b``,
    ``(r, out)``) takes its kernel's in or out axis, and ``lora`` for its rank.

    Raises:
      ValueError: a parameter this table does not know (name its axes in ``_LOGICAL``).
    """
    inner = [n for n in names if n not in ("base",)]
    lead = ("layers",) if names and names[0] == "layers" else ()
    if len(inner) >= 3 and inner[-2] == "lora" and inner[-1] in ("lora_a", "lora_b"):
        kernel = _LOGICAL.get((inner[-3], "kernel"))
        axes = None if kernel is None else (kernel[0], "lora") if inner[-1] == "lora_a" else ("lora", kernel[1])
    else:
        axes = _LOGICAL.get(tuple(inner[-2:]))
    if axes is None or len(lead) + len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(names)} ({ndim} axes): no logical axis names for it in lm/model.py")
    return lead + axes


class LLaMA(nnx.Module):
    """Decoder-only LM; the output head is its own matrix unless ``cfg.tie_embeddings``.

    ``dtype`` is the computation's dtype, ``param_dtype`` the one the parameters (and so the
    gradients and the optimizer state) are stored in; ``remat`` one of :data:`REMAT`.
    """

    def __init__(
        self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs, remat: str = "none",
    ) -> None:  # fmt: skip
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
        self.cfg, self.remat = cfg, remat
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden, embedding_init=nnx.initializers.normal(0.02), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.layers = stacked(cfg.layers, lambda r: Block(cfg, dtype, r, param_dtype), rngs)
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg.hidden, cfg.vocab_size, dtype, rngs, param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = scan_blocks(self.layers, self.embed(tokens), self.remat)
        return output_logits(self.norm, self.embed.attend if self.lm_head is None else self.lm_head, x)


def output_logits(norm: RMSNorm, head: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """The final norm, then the output head (its own matrix, or the tied embedding's ``attend``), in float32."""
    return head(norm(x)).astype(jnp.float32)


def next_token_loss(logits: jax.Array, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits`` (for ``batch[:, :-1]``) against the next tokens ``batch[:, 1:]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


def loss_fn(model: LLaMA, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of a (batch, seq_len + 1) token array."""
    return next_token_loss(model(batch[:, :-1]), batch)


def stages(model: LLaMA) -> list[Stage]:
    """``loss_fn`` as a chain of stages for per-layer updates (``step.make_layerwise_train_step``):
    the embedding, the blocks (scanned: each layer's update is applied in the backward scan), then
    the norm and head with the loss. Each stage owns its modules under their paths in the model,
    so path rules (``fira_jax.axes_by_path``) select the same leaves."""
    if model.lm_head is None:
        raise ValueError(
            "per-layer updates need each parameter in one stage; with tie_embeddings the embedding is used by "
            "the first and the last stage: train this model with the ordinary step"
        )
    embed = Stage({"embed": model.embed}, lambda m, _, batch: m["embed"](batch[:, :-1]))
    blocks = Stage({"layers": model.layers}, lambda m, x, _: m["layers"](x), layers=model.cfg.layers)
    head = Stage(
        {"norm": model.norm, "lm_head": model.lm_head},
        lambda m, x, batch: next_token_loss(output_logits(m["norm"], m["lm_head"], x), batch),
    )
    return [embed, blocks, head]
