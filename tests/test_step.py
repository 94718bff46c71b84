"""examples/lm/step.py: the train step with per-layer updates trains exactly as the ordinary one,
and refuses what it cannot do with an error that names the cause."""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="examples extra not installed")
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from lm import model as model_lib
from lm import optim
from lm import step as step_lib

import fira_jax

CFG = dataclasses.replace(model_lib.PRESETS["micro"], layers=2)


def _params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _optimizer(name: str) -> optax.GradientTransformation:
    """``optim.make_optimizer``'s, refreshing with canonical signs. An SVD's signs are arbitrary:
    float32 rounding (a layer's matrix decomposed alone, or inside the stack's loop) may flip one
    vector, which, the moments being carried over a refresh, changes the run (as on another
    machine). Canonical signs keep both steps' refreshes alike, so their parameters can be compared."""
    if name == "adamw":
        return optim.make_optimizer(name, 1e-2, rank=4, update_proj_gap=2, weight_decay=0.1)
    if name in ("apollo", "apollo-mini"):  # random projections: each layer draws its own, in both steps
        return optim.make_optimizer(name, 1e-2, rank=4, update_proj_gap=2, weight_decay=0.1)
    if name == "adamw+limiter":  # one norm per layer's matrix (or vector) of the stack, in both steps
        return optax.chain(
            optim.make_optimizer("adamw", 1e-2, rank=4), fira_jax.clip_by_norm_growth(1.01, axes=_STACKED)
        )
    build = {"fira": fira_jax.fira, "galore": fira_jax.galore}[name]
    return build(1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, axes=optim.TARGET_AXES, canonical_signs=True,
                 weight_decay_mask=fira_jax.mask_by_path(*optim.DECAY_MODULES))  # fmt: skip


# The scanned blocks' kernels are stacks of matrices, their norm scales stacks of vectors (a layer's
# slice: one matrix, one vector), for a limiter with one norm per layer's matrix or vector.
_STACKED = fira_jax.axes_by_path(
    {"layers/attn/": fira_jax.MatrixAxes(), "layers/mlp/": fira_jax.MatrixAxes(),
     "layers/": fira_jax.MatrixAxes(rows=-1, cols=())}
)  # fmt: skip


# fira in the default run; the others (20-30 s each on 2 cores; galore's path is fira's without the
# residual) with the slow tests.
@pytest.mark.parametrize(
    "name",
    [
        "fira",
        *(
            pytest.param(n, marks=pytest.mark.slow)
            for n in ("galore", "adamw", "apollo", "apollo-mini", "adamw+limiter")
        ),
    ],
)
def test_per_layer_updates_train_as_the_whole_model_step(name):
    """Five steps, refreshes at 0, 2 and 4: the same losses and parameters as one nnx.Optimizer."""
    batches = jax.random.randint(jax.random.key(1), (5, 2, 17), 0, CFG.vocab_size)
    tx = _optimizer(name)
    whole = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    whole_opt = nnx.Optimizer(whole, tx, wrt=nnx.Param)
    layered = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    layered_opt = step_lib.LayerwiseOptimizer(layered, tx, model_lib.stages)
    assert len(layered_opt.parts) == 3  # embedding, the scanned blocks, norm + head
    whole_step = step_lib.make_train_step(model_lib.loss_fn)
    layered_step = step_lib.make_layerwise_train_step(model_lib.stages)
    start = jax.tree.map(np.asarray, _params(layered))  # a copy: the step donates the parameters
    for batch in batches:
        a = step_lib.run_step(whole_step, whole, whole_opt, batch)
        b = step_lib.run_step(layered_step, layered, layered_opt, batch)
        np.testing.assert_allclose(float(b), float(a), rtol=2e-5)
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), _params(layered), start)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained
    # Adam divides by the gradient's size, so float32 rounding on a near-zero gradient (the scan
    # sums the embedding's gradient in another order) moves a weight by ~1e-6: 1e-4 of a step of lr 1e-2.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), _params(layered), _params(whole))
    assert all(int(part.step[...]) == len(batches) for part in layered_opt.parts)


def test_stages_compose_to_the_loss():
    model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    batch = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    x = None
    for stage in model_lib.stages(model):
        if stage.layers is None:
            x = stage.apply(stage.modules, x, batch)
            continue
        graphdef, state = nnx.split(stage.modules)  # a scanned stage: its layers one after another
        for i in range(stage.layers):
            x = stage.apply(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)), x, batch)
    np.testing.assert_allclose(float(x), float(model_lib.loss_fn(model, batch)), rtol=1e-6)


def test_a_parameter_in_no_stage_or_in_two_is_named():
    model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    tx = optim.make_optimizer("adamw", 1e-2, rank=4)
    with pytest.raises(ValueError, match="no stage owns layers/attn/k/kernel"):
        step_lib.LayerwiseOptimizer(model, tx, lambda m: model_lib.stages(m)[:1] + model_lib.stages(m)[2:])
    with pytest.raises(ValueError, match="both own embed/embedding"):
        step_lib.LayerwiseOptimizer(model, tx, lambda m: model_lib.stages(m)[:1] + model_lib.stages(m))


def test_tied_embeddings_are_refused():
    model = model_lib.LLaMA(dataclasses.replace(CFG, tie_embeddings=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tie_embeddings"):
        model_lib.stages(model)


class _Counting(nnx.Module):
    """A stage that updates a non-trainable counter, which per-layer updates cannot carry."""

    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones((3,)))
        self.calls = nnx.BatchStat(jnp.zeros(()))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls[...] = self.calls[...] + 1
        return jnp.sum(self.w[...] * x)


def test_a_stage_that_changes_non_trainable_state_is_refused():
    model = _Counting()
    stages = lambda m: [step_lib.Stage({"m": m}, lambda mods, _, x: mods["m"](x))]  # noqa: E731
    opt = step_lib.LayerwiseOptimizer(model, optim.make_optimizer("adamw", 1e-2, rank=1), stages)
    with pytest.raises(ValueError, match="stage 0 changes m/calls"):
        step_lib.run_step(step_lib.make_layerwise_train_step(stages), model, opt, jnp.ones((3,)))


def test_per_layer_optimizer_speaks_for_the_whole_model(caplog):
    """Stages that select no leaf (the embedding's) stay quiet; leaves left full-rank are named once."""
    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))
    with caplog.at_level("WARNING", logger="fira_jax"):
        step_lib.LayerwiseOptimizer(model, optim.make_optimizer("fira", 1e-3, rank=4), model_lib.stages)
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="fira_jax"):
        step_lib.LayerwiseOptimizer(model, optim.make_optimizer("fira", 1e-3, rank=40), model_lib.stages)
    (record,) = caplog.records
    assert "7 selected leaves left full-rank" in record.getMessage()


def test_layer_axes_tell_per_layer_state_from_shared():
    stacked = {"w": jnp.zeros((3, 4, 5)), "b": jnp.zeros((3, 5))}
    tx = optax.adamw(1e-2)
    state = tx.init(stacked)
    per_layer = step_lib.layer_axes(tx, stacked, state, 3)
    flat = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert {f for f, p in zip(flat, per_layer, strict=True) if not p} == {"[0].count"}
    assert sum(per_layer) == 4  # mu and nu of w and b
    odd = (state[0]._replace(count=jnp.zeros(2, jnp.int32)), *state[1:])
    with pytest.raises(ValueError, match=r"\[0\]\.count has shape \(2,\): neither per layer"):
        step_lib.layer_axes(tx, stacked, odd, 3)


@pytest.mark.parametrize("policy", ["block", "dots"])
def test_remat_changes_no_number(policy):
    batch = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.vocab_size)
    grads = {}
    for p in ("none", policy):
        model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0), remat=p)
        loss, g = nnx.jit(nnx.value_and_grad(model_lib.loss_fn))(model, batch)
        grads[p] = (float(loss), nnx.to_pure_dict(g))
    assert grads[policy][0] == pytest.approx(grads["none"][0], rel=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[policy][1], grads["none"][1]
    )
    with pytest.raises(ValueError, match="remat must be one of"):
        model_lib.LLaMA(CFG, rngs=nnx.Rngs(0), remat="all")


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_step_program_does_not_grow_with_depth(per_layer):
    """The blocks are scanned: 2 or 6 layers lower to the same program, but for the layer count."""
    sizes = []
    for layers in (2, 6):
        cfg = dataclasses.replace(CFG, layers=layers)
        model = model_lib.LLaMA(cfg, rngs=nnx.Rngs(0))
        tx = optim.make_optimizer("fira", 1e-2, rank=4)
        if per_layer:
            opt, step = (
                step_lib.LayerwiseOptimizer(model, tx, model_lib.stages),
                step_lib.make_layerwise_train_step(model_lib.stages),
            )
        else:
            opt, step = nnx.Optimizer(model, tx, wrt=nnx.Param), step_lib.make_train_step(model_lib.loss_fn)
        graphdef, state = nnx.split((model, opt))
        text = step.lower(graphdef, state, jax.ShapeDtypeStruct((2, 9), jnp.int32)).as_text()
        sizes.append(len(text.splitlines()))
    assert sizes[0] == sizes[1]


def test_weight_decay_reaches_the_kernels_only():
    """The stacked norm scales are 2-D (layers, hidden), yet no matrix: neither decayed nor projected."""
    model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    decayed = fira_jax.mask_by_path(*optim.DECAY_MODULES)(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(decayed)[0]}
    assert {k for k, v in flat.items() if v} == {k for k in flat if k.endswith("['kernel']")}
    state = optim.make_optimizer("fira", 1e-2, rank=4).init(params)
    left = (
        jax.tree_util.tree_flatten_with_path(state[0].right)[0] + jax.tree_util.tree_flatten_with_path(state[0].left)[0]
    )
    projected = {jax.tree_util.keystr(p) for p, _ in left}
    assert len(projected) == 7 and all("['attn']" in k or "['mlp']" in k for k in projected)
