"""How scale_by_fira and scale_by_galore compose: optax transforms inside the subspace, and every
optax wrapper around the low-rank transform or around the whole optimizer.

Inside the subspace (``base_optimizer``), a stateless transform acts on the low-rank update only
and a stateful one keeps low-rank state. Around the transform or the optimizer, each wrapper
either gives what it gives around any optax transformation (checked against the unwrapped
result) or raises a clear error where it is built.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax

SHAPES = {"w": (8, 5), "v": (4, 9), "b": (5,)}


def problem(steps=5, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def low_rank(inner, fira=True):
    factory = fira_jax.scale_by_fira if fira else fira_jax.scale_by_galore
    return factory(2, 0.25, refresh=fira_jax.Refresh(update_proj_gap=2), base_optimizer=inner)


def run(tx, params, grads, update=None):
    state = tx.init(params)
    update = update or tx.update
    outs = []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
    return outs


@pytest.mark.parametrize("fira", [True, False])
def test_stateless_transform_inside_acts_on_the_low_rank_update(variant, fira):
    params, grads = problem()
    plain = run(low_rank(fira_jax.scale_by_torch_adam(), fira), params, grads)
    # Halving N halves phi too, hence S and the whole update.
    tx = low_rank(optax.chain(fira_jax.scale_by_torch_adam(), optax.scale(0.5)), fira)
    halved = run(tx, params, grads, variant(tx.update))
    for a, b in zip(halved, plain, strict=True):
        chex.assert_trees_all_close(a, jax.tree.map(lambda x: 0.5 * x, b), rtol=1e-5, atol=1e-7)


def test_scale_by_schedule_inside_scales_each_step():
    params, grads = problem()
    plain = run(low_rank(fira_jax.scale_by_torch_adam(), fira=False), params, grads)
    inner = optax.chain(fira_jax.scale_by_torch_adam(), optax.scale_by_schedule(lambda c: 0.5**c))
    scheduled = run(low_rank(inner, fira=False), params, grads)
    for t, (a, b) in enumerate(zip(scheduled, plain, strict=True)):
        chex.assert_trees_all_close(a, jax.tree.map(lambda x, t=t: 0.5**t * x, b), rtol=1e-5, atol=1e-7)


def test_clip_by_global_norm_inside_clips_the_low_rank_update(variant):
    """The norm is over the low-rank updates N (and the unselected leaves), never G: NumPy."""
    params, grads = problem(steps=3)
    max_norm = 0.5

    def np_adam_norms():  # GaLore's N in NumPy: P from the SVD at t = 0 and 2, Adam on R
        m, v, p, norms = {}, {}, {}, []
        for t, g in enumerate(grads):
            n_all = []
            for k, x in g.items():
                x = np.asarray(x, np.float64)
                if x.ndim == 2:
                    if t % 2 == 0:
                        u, _, vh = np.linalg.svd(x, full_matrices=False)
                        p[k] = vh[:2] if x.shape[0] >= x.shape[1] else u[:, :2]
                    x = x @ p[k].T if x.shape[0] >= x.shape[1] else p[k].T @ x
                m[k] = 0.9 * m.get(k, 0.0) + 0.1 * x
                v[k] = 0.999 * v.get(k, 0.0) + 0.001 * x * x
                n_all.append(m[k] / (np.sqrt(v[k]) + 1e-6))
            norms.append(np.sqrt(sum(np.sum(n * n) for n in n_all)))
        return norms

    plain = run(low_rank(fira_jax.scale_by_torch_adam(), fira=False), params, grads)
    tx = low_rank(optax.chain(fira_jax.scale_by_torch_adam(), optax.clip_by_global_norm(max_norm)), fira=False)
    clipped = run(tx, params, grads, variant(tx.update))
    for a, b, norm in zip(clipped, plain, np_adam_norms(), strict=True):
        factor = min(1.0, max_norm / norm)
        assert factor < 1.0  # the test must exercise clipping
        chex.assert_trees_all_close(a, jax.tree.map(lambda x, f=factor: f * x, b), rtol=1e-4, atol=1e-7)


def test_stateful_transform_inside_keeps_low_rank_state():
    params, grads = problem(steps=2)
    tx = low_rank(optax.chain(optax.scale_by_rms(decay=0.5), optax.scale(-1.0)))
    state = tx.init(params)
    chex.assert_trees_all_equal_shapes(
        state.inner[0].nu, {"w": jnp.zeros((8, 2)), "v": jnp.zeros((2, 9)), "b": jnp.zeros(5)}
    )
    u, _ = jax.jit(tx.update)(grads[0], state)
    chex.assert_trees_all_equal_shapes(u, params)


@pytest.mark.parametrize("jit", [False, True])
def test_inner_that_needs_params_gets_them_projected(jit):
    """An inner optimizer that reads the parameters sees P^T W / W P^T (NumPy), the others' as they are."""
    params, grads = problem(steps=1)
    tx = low_rank(optax.add_decayed_weights(0.1), fira=False)  # N = R + 0.1 (W P^T): GaLore, so U = 0.25 N P
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(grads[0], tx.init(params), params)
    for name, w in params.items():
        g, w = np.asarray(grads[0][name], np.float64), np.asarray(w, np.float64)
        if np.ndim(w) < 2 or min(np.shape(w)) <= 2:  # full-rank: the inner optimizer alone
            np.testing.assert_allclose(out[name], g + 0.1 * w, rtol=1e-5, atol=1e-6)
            continue
        if w.shape[0] >= w.shape[1]:  # right: P is r x n
            p = np.asarray(state.right[name], np.float64)
            expected = 0.25 * (g @ p.T + 0.1 * w @ p.T) @ p
        else:
            p = np.asarray(state.left[name], np.float64)
            expected = 0.25 * p @ (p.T @ g + 0.1 * p.T @ w)
        np.testing.assert_allclose(out[name], expected, rtol=1e-4, atol=1e-5)


def test_galore_over_adafactor_trains():
    """GaLore with Adafactor's factored second moment inside (optax.scale_by_factored_rms needs params)."""
    params, grads = problem(steps=3)
    tx = low_rank(optax.scale_by_factored_rms(min_dim_size_to_factor=2), fira=False)
    outs = run(tx, params, grads)
    assert all(bool(jnp.isfinite(u).all()) for out in outs for u in jax.tree.leaves(out))
    assert outs[-1]["w"].shape == params["w"].shape
    state = tx.init(params)  # the factored statistics of w's 8 x 2 low-rank gradient, not of its 8 x 5
    assert (state.inner.v_row["w"].shape, state.inner.v_col["w"].shape) == ((2,), (8,))


# ---------------------------------------------------------------------------
# Optax wrappers, around the low-rank transform ("piece") and around fira(...) ("whole").
# ---------------------------------------------------------------------------


def piece() -> optax.GradientTransformation:
    return fira_jax.scale_by_fira(2, 0.25, refresh=fira_jax.Refresh(update_proj_gap=2))


def whole() -> optax.GradientTransformation:
    return fira_jax.fira(1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)


def scanned(tx: optax.GradientTransformation):
    """All steps in one lax.scan: the state must be a pytree of arrays of fixed structure."""

    def all_steps(params, grads):
        def body(state, g):
            u, state = tx.update(g, state, params)
            return state, u

        _, us = jax.lax.scan(body, tx.init(params), jax.tree.map(lambda *g: jnp.stack(g), *grads))
        return [jax.tree.map(lambda x, t=t: x[t], us) for t in range(len(grads))]

    return all_steps


WRAPPERS = {
    # name: (wrap, what the wrapped transform gives in terms of the plain one's updates)
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=3),
    "MultiSteps(1)": lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
    "masked(all)": lambda tx: optax.masked(tx, lambda p: jax.tree.map(lambda _: True, p)),
    "named_chain": lambda tx: optax.named_chain(("low_rank", tx)),
    "partition(one)": lambda tx: optax.partition({"all": tx}, lambda p: jax.tree.map(lambda _: "all", p)),
}


@functools.cache
def plain_updates(where: str) -> list:
    """The unwrapped transform's jitted updates over ``problem(steps=4)`` (computed once per ``where``)."""
    params, grads = problem(steps=4)
    tx = piece() if where == "piece" else whole()
    return run(tx, params, grads, jax.jit(tx.update))


@pytest.mark.parametrize("where", ["piece", "whole"])
@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrappers_give_the_plain_updates(variant, where, name):
    params, grads = problem(steps=4)
    build = piece if where == "piece" else whole
    plain = plain_updates(where)
    wrapped = WRAPPERS[name](build())
    got = run(wrapped, params, grads, variant(wrapped.update))
    for a, b in zip(got, plain, strict=True):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["piece", "whole"])
def test_lax_scan_over_steps_gives_the_plain_updates(where):
    params, grads = problem(steps=4)
    build = piece if where == "piece" else whole
    plain = run(build(), params, grads)
    for a, b in zip(jax.jit(scanned(build()))(params, grads), plain, strict=True):
        chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_apply_if_finite_skips_a_bad_step_around_the_piece():
    params, grads = problem(steps=3)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[1])
    tx = optax.apply_if_finite(piece(), max_consecutive_errors=3)
    got = run(tx, params, [grads[0], bad, grads[2]], jax.jit(tx.update))
    plain = run(piece(), params, [grads[0], grads[2]])
    chex.assert_trees_all_equal(jax.tree.map(jnp.zeros_like, params), got[1])  # the bad step: no update
    chex.assert_trees_all_close(got[2], plain[1], rtol=1e-6, atol=1e-7)  # the state skipped it


def test_multisteps_accumulates_around_the_piece():
    params, grads = problem(steps=4)
    tx = optax.MultiSteps(piece(), every_k_schedule=2)
    got = run(tx, params, grads, jax.jit(tx.update))
    mean = [
        jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1]),
        jax.tree.map(lambda a, b: (a + b) / 2, *grads[2:]),
    ]
    plain = run(piece(), params, mean)
    chex.assert_trees_all_close(got[1], plain[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[3], plain[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["piece", "whole"])
def test_inject_hyperparams(variant, where):
    """Float hyperparameters can be injected (same updates); the rank cannot: a clear error."""
    params, grads = problem(steps=4)
    if where == "piece":
        refresh, residual = fira_jax.Refresh(update_proj_gap=2), fira_jax.Residual(gamma=1.5)
        plain = run(fira_jax.scale_by_fira(2, 0.25, refresh=refresh, residual=residual), params, grads)
        # The options objects pass through as they are (not numbers); the scale is injected.
        tx = optax.inject_hyperparams(fira_jax.scale_by_fira, static_args=("rank",))(
            rank=2, scale=0.25, refresh=refresh, residual=residual
        )
        unsupported = lambda: optax.inject_hyperparams(fira_jax.scale_by_fira)(rank=2).init(params)  # noqa: E731
    else:
        plain = run(fira_jax.fira(1e-2, rank=2, update_proj_gap=2), params, grads)
        tx = optax.inject_hyperparams(fira_jax.fira, static_args=("rank",))(learning_rate=1e-2, rank=2,
                                                                            update_proj_gap=2)  # fmt: skip
        unsupported = lambda: optax.inject_hyperparams(fira_jax.fira)(learning_rate=1e-2, rank=2).init(params)  # noqa: E731
    got = run(tx, params, grads, variant(tx.update))
    # An injected scale is a traced s, for which residual_norm keeps its exact branch (a lax.cond):
    # a program compiled differently, the same values to float32 rounding.
    for a, b in zip(got, plain, strict=True):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="rank"):
        unsupported()
