"""examples/lm/step.py: the train step with per-layer updates trains exactly as the ordinary one,
and refuses what it cannot do with an error that names the cause."""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax", reason="examples extra not installed")
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from lm import model as model_lib
from lm import optim
from lm import step as step_lib

CFG = dataclasses.replace(model_lib.PRESETS["micro"], layers=2)


def _params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", ["adamw", "galore", "fira"])
def test_per_layer_updates_train_as_the_whole_model_step(name):
    """Five steps, refreshes at 0, 2 and 4: the same losses and parameters as one nnx.Optimizer."""
    batches = jax.random.randint(jax.random.key(1), (5, 2, 17), 0, CFG.vocab_size)
    tx = optim.make_optimizer(name, 1e-2, rank=4, update_proj_gap=2, weight_decay=0.1)
    whole = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    whole_opt = nnx.Optimizer(whole, tx, wrt=nnx.Param)
    layered = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    layered_opt = step_lib.LayerwiseOptimizer(layered, tx, model_lib.stages)
    assert len(layered_opt.parts) == CFG.layers + 2  # embedding, each block, norm + head
    whole_step = step_lib.make_train_step(model_lib.loss_fn)
    layered_step = step_lib.make_layerwise_train_step(model_lib.stages)
    start = jax.tree.map(np.asarray, _params(layered))  # a copy: the step donates the parameters
    for batch in batches:
        a = step_lib.run_step(whole_step, whole, whole_opt, batch)
        b = step_lib.run_step(layered_step, layered, layered_opt, batch)
        np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), _params(layered), start)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), _params(layered), _params(whole))
    assert all(int(part.step[...]) == len(batches) for part in layered_opt.parts)


def test_stages_compose_to_the_loss():
    model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    batch = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    x = None
    for stage in model_lib.stages(model):
        x = stage.apply(stage.modules, x, batch)
    np.testing.assert_allclose(float(x), float(model_lib.loss_fn(model, batch)), rtol=1e-6)


def test_a_parameter_in_no_stage_or_in_two_is_named():
    model = model_lib.LLaMA(CFG, rngs=nnx.Rngs(0))
    tx = optim.make_optimizer("adamw", 1e-2, rank=4)
    with pytest.raises(ValueError, match="no stage owns layers/1/attn/k/kernel"):
        step_lib.LayerwiseOptimizer(model, tx, lambda m: model_lib.stages(m)[:2] + model_lib.stages(m)[3:])
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
