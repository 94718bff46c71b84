"""LoRA adapters on the example's LLaMA, built on ``flax.nnx.LoRA`` with PEFT's conventions.

``nnx.LoRA`` computes ``x @ A @ B`` (A initialized like a kernel, B at zero) and adds its base
module's output; PEFT (what the Fira authors fine-tune with) also scales the adapter by
``alpha / r`` and applies dropout to its input. :class:`LoRALinear` adds those two, and
:func:`apply` puts adapters on the target modules (the authors': q, k, v, up, down). Only the
adapters' ``nnx.LoRAParam`` s are trained (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``);
:func:`merge` folds them into the kernels (``W + alpha / r * A B``) for export.

The model's blocks are stacked (``lm.model``), so each adapter is too: ``A`` is ``(layers, in, r)``
and ``B`` ``(layers, r, out)``, each layer's initialized from its own key, and the scan hands each
layer its slice.
"""

import jax
from flax import nnx

from lm import model as model_lib

AUTHORS_TARGETS = ("q", "k", "v", "up", "down")  # LLM-Adapters' / the Fira authors' fine-tuning targets


class LoRALinear(nnx.Module):
    """``base(x) + scaling * dropout(x) @ A @ B`` around an existing (stacked) ``nnx.Linear``;
    ``lora`` and ``dropout`` are stacked like it."""

    def __init__(self, base: nnx.Linear, lora: nnx.LoRA, dropout: nnx.Dropout, scaling: float) -> None:
        self.base, self.lora, self.dropout, self.scaling = base, lora, dropout, scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.scaling * self.lora(self.dropout(x)).astype(x.dtype)


def apply(model: model_lib.LLaMA, rank: int = 32, alpha: float = 64.0, dropout: float = 0.05,
          targets: tuple[str, ...] = AUTHORS_TARGETS, seed: int = 0) -> model_lib.LLaMA:  # fmt: skip
    """Wraps each target linear layer of the blocks in a :class:`LoRALinear` (in place); returns the model.

    The adapters are made layer by layer, target by target, from one ``nnx.Rngs(seed)``, then
    stacked: the numbers a Python list of layers would get."""
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1); got {rank}, {alpha}, {dropout}")
    known = {"q", "k", "v", "o", "gate", "up", "down"}
    if not targets or set(targets) - known:
        raise ValueError(f"LoRA targets must be among {sorted(known)}, got {targets}")
    rngs = nnx.Rngs(seed)
    blocks = model.layers
    parents = {name: blocks.attn if name in ("q", "k", "v", "o") else blocks.mlp for name in targets}
    made: dict[str, list] = {name: [] for name in targets}
    for _ in range(model.cfg.layers):
        for name in targets:
            _, d_in, d_out = getattr(parents[name], name).kernel.shape
            made[name].append((nnx.LoRA(d_in, rank, d_out, rngs=rngs), nnx.Dropout(dropout, rngs=rngs)))
    for name in targets:
        adapters, dropouts = zip(*made[name], strict=True)
        base = getattr(parents[name], name)
        wrapped = LoRALinear(base, model_lib.stack(list(adapters)), model_lib.stack(list(dropouts)), alpha / rank)
        setattr(parents[name], name, wrapped)
    return model


def merge(model: model_lib.LLaMA) -> model_lib.LLaMA:
    """Folds every adapter into its kernel (``W + alpha / r * A B``) and removes it (in place)."""
    for parent in (model.layers.attn, model.layers.mlp):
        for name, child in list(vars(parent).items()):
            if isinstance(child, LoRALinear):
                delta = child.scaling * child.lora.lora_a[...] @ child.lora.lora_b[...]  # (layers, in, out)
                child.base.kernel.set_value(child.base.kernel[...] + delta.astype(child.base.kernel.dtype))
                setattr(parent, name, child.base)
    return model
