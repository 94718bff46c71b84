"""fira() and galore() against a NumPy transcription of steps 1-6, and how they compose."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpy_side import np_side

import fira_jax

# ---------------------------------------------------------------------------
# An independent NumPy transcription of the update rule (issue #2, steps 1-6).
# ---------------------------------------------------------------------------


def np_basis(g, rank, side, canonical):
    u, _, vh = np.linalg.svd(g.astype(np.float32).astype(np.float64), full_matrices=False)
    r = min(rank, *g.shape)
    if side == "right":
        p = vh[:r]
        if canonical:
            p = p * np.where(p[np.arange(r), np.abs(p).argmax(1)] < 0, -1.0, 1.0)[:, None]
    else:
        p = u[:, :r]
        if canonical:
            p = p * np.where(p[np.abs(p).argmax(0), np.arange(r)] < 0, -1.0, 1.0)[None, :]
    return p


def np_optimizer(
    kind,
    params,
    grad_fn,
    steps,
    lr,
    rank,
    gap,
    scale,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    wd=0.0,
    gamma=1.01,
    proj_type="std",
    canonical=True,
):
    """Runs Fira ('fira') or GaLore ('galore') on dicts of 2-D and 1-D float64 arrays."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    st = {k: {"m": None, "v": None, "P": None, "s": None} for k in w}
    traj = []
    for t in range(steps):
        grads = grad_fn(w)
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            s = st[k]
            if g.ndim == 2:
                m_, n_ = g.shape
                side = np_side(proj_type, m_, n_)
                if t % gap == 0:
                    s["P"] = np_basis(g, rank, side, canonical)
                p = s["P"]
                low = g @ p.T if side == "right" else p.T @ g

                def back(x, p=p, side=side):
                    return x @ p if side == "right" else p @ x

            else:
                low = g
            if s["m"] is None:
                s["m"], s["v"] = np.zeros_like(low), np.zeros_like(low)
            s["m"] = b1 * s["m"] + (1 - b1) * low
            s["v"] = b2 * s["v"] + (1 - b2) * low * low
            n_upd = s["m"] / (np.sqrt(s["v"]) + eps)
            if g.ndim == 2:
                upd = scale * back(n_upd)
                if kind == "fira":
                    axis = 0 if low.shape[0] < low.shape[1] else 1
                    phi = np.linalg.norm(n_upd, axis=axis) / (np.linalg.norm(low, axis=axis) + 1e-8)
                    phi = phi[None, :] if axis == 0 else phi[:, None]
                    resid = phi * (g - scale * back(low))
                    norm = np.linalg.norm(resid)
                    if s["s"] is None:
                        s["s"] = norm
                    else:
                        limiter = max(norm / (s["s"] + 1e-8), gamma) / gamma
                        resid = resid / limiter
                        s["s"] = norm / limiter
                    upd = upd + resid
            else:
                upd = n_upd
            c = math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            w[k] = w[k] - lr * c * upd
            w[k] = w[k] - lr * wd * w[k]
        traj.append({k: v.copy() for k, v in w.items()})
    return traj


# ---------------------------------------------------------------------------


def make_problem(seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"a": (12, 8), "b": (6, 10)}
    data = {k: (rng.standard_normal((16, s[0])), rng.standard_normal((16, s[1]))) for k, s in shapes.items()}
    params = {k: 0.1 * rng.standard_normal(s) for k, s in shapes.items()}
    params["bias"] = rng.standard_normal(5)
    target = rng.standard_normal(5)

    def grad_fn(p):
        g = {k: data[k][0].T @ (data[k][0] @ p[k] - data[k][1]) / 16 for k in shapes}
        g["bias"] = p["bias"] - target
        return g

    return params, grad_fn


def run_ours(tx, params, grad_fn, steps, jit=True):
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update) if jit else tx.update
    traj = []
    for _ in range(steps):
        g = {
            k: jnp.asarray(v, jnp.float32)
            for k, v in grad_fn({k: np.asarray(v, np.float64) for k, v in p.items()}).items()
        }
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        traj.append({k: np.asarray(v) for k, v in p.items()})
    return traj, state


def assert_traj_close(ours, ref, w0, rtol):
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for k in w0:
            d_ref = b[k] - w0[k]
            err = np.linalg.norm((a[k] - w0[k]) - d_ref) / np.linalg.norm(d_ref)
            assert err <= rtol, f"step {t}, leaf {k}: relative error {err:.2e}"


def test_fira_and_galore(variant):
    params, grad_fn = make_problem()
    steps = 10 if variant is jax.jit else 6  # refreshes at 0, 4 (and 8 jitted): eager steps are slow
    for kind in ("fira", "galore"):
        for proj_type, scale, wd in [("std", 0.25, 0.0), ("reverse_std", 1.0, 0.1), ("left", 0.25, 0.1)]:
            factory = fira_jax.fira if kind == "fira" else fira_jax.galore
            tx = factory(
                3e-2, rank=3, update_proj_gap=4, scale=scale, weight_decay=wd, proj_type=proj_type,
                canonical_signs=True,
            )  # fmt: skip
            p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
            state = tx.init(p)
            update = variant(tx.update)
            ours = []
            for _ in range(steps):
                g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grad_fn(jax.tree.map(np.asarray, p)))
                u, state = update(g, state, p)
                p = optax.apply_updates(p, u)
                ours.append(jax.tree.map(np.asarray, p))
            ref = np_optimizer(
                kind, params, grad_fn, steps, 3e-2, 3, 4, scale, wd=wd, proj_type=proj_type, canonical=True
            )
            assert_traj_close(ours, ref, params, rtol=2e-4)


@pytest.mark.parametrize("kind", ["fira", "galore"])
def test_default_signs_match_within_first_gap(kind):
    """Before the second refresh the SVD's sign convention cannot matter (moments start at zero)."""
    params, grad_fn = make_problem(1)
    factory = fira_jax.fira if kind == "fira" else fira_jax.galore
    ours, _ = run_ours(factory(1e-2, rank=3, update_proj_gap=50), params, grad_fn, 10)
    ref = np_optimizer(kind, params, grad_fn, 10, 1e-2, 3, 50, 0.25, canonical=False)
    assert_traj_close(ours, ref, params, rtol=2e-4)


def test_hand_built_chain_equals_fira():
    """The chain shown in README and docs is fira(...) exactly."""
    params, grad_fn = make_problem(2)
    lr, b1, b2, eps, wd, scale = 1e-2, 0.9, 0.999, 1e-6, 0.1, 0.25
    by_hand = optax.chain(
        fira_jax.scale_by_fira(
            3,
            scale,
            refresh=fira_jax.Refresh(update_proj_gap=4),
            base_optimizer=fira_jax.scale_by_torch_adam(b1, b2, eps),
        ),
        optax.scale_by_schedule(fira_jax.adam_bias_correction(b1, b2)),
        optax.scale_by_learning_rate(lr),
        fira_jax.add_decayed_weights_after_step(wd, lr),
    )
    alias = fira_jax.fira(lr, rank=3, update_proj_gap=4, scale=scale, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    a, _ = run_ours(by_hand, params, grad_fn, 9)
    b, _ = run_ours(alias, params, grad_fn, 9)
    for x, y in zip(a, b, strict=True):
        chex.assert_trees_all_equal(x, y)


def test_base_optimizer_runs_in_subspace():
    """With Lion inside, the state is low-rank and step 0 is Fira's rule with N = Lion's sign update."""
    params, grad_fn = make_problem(3)
    lr = 1e-3
    tx = fira_jax.fira(lr, rank=2, update_proj_gap=5, base_optimizer=optax.scale_by_lion())
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    assert state[0].inner.mu["a"].shape == (12, 2)  # 12 x 8: right side
    assert state[0].inner.mu["b"].shape == (2, 10)  # 6 x 10: left side
    assert state[0].inner.mu["bias"].shape == (5,)
    g = grad_fn(params)
    u, _ = jax.jit(tx.update)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    # NumPy: left side, P = U[:, :2]; Lion's first output is sign((1 - b1) g) = sign(g); no bias correction.
    basis = np.linalg.svd(g["b"])[0][:, :2]
    low = basis.T @ g["b"]
    n_lion = np.sign(low)
    phi = np.linalg.norm(n_lion, axis=0) / (np.linalg.norm(low, axis=0) + 1e-8)
    expected = -lr * (0.25 * basis @ n_lion + phi[None, :] * (g["b"] - 0.25 * basis @ low))
    np.testing.assert_allclose(np.asarray(u["b"]), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(u["bias"]), -lr * np.sign(g["bias"]), rtol=1e-6)


def test_inject_hyperparams_schedule():
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    params, grad_fn = make_problem(4)
    tx = optax.inject_hyperparams(fira_jax.fira, static_args=("rank", "update_proj_gap"))(
        learning_rate=sched, rank=3, update_proj_gap=4, weight_decay=0.1
    )
    plain = fira_jax.fira(sched, rank=3, update_proj_gap=4, weight_decay=0.1)
    a, state = run_ours(tx, params, grad_fn, 6)
    b, _ = run_ours(plain, params, grad_fn, 6)
    for x, y in zip(a, b, strict=True):
        chex.assert_trees_all_close(x, y, rtol=1e-5, atol=1e-6)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(sched(5)))


def test_inject_hyperparams_with_defaults():
    """Default hyperparameters become injected arrays; the chain must be the same at init and update."""
    params, grad_fn = make_problem(4)
    for factory in (fira_jax.fira, fira_jax.galore):
        tx = optax.inject_hyperparams(factory, static_args=("rank",))(learning_rate=1e-2, rank=3)
        ours, state = run_ours(tx, params, grad_fn, 3)
        plain, _ = run_ours(factory(1e-2, rank=3), params, grad_fn, 3)
        chex.assert_trees_all_close(ours[-1], plain[-1], rtol=1e-5, atol=1e-6)
        assert float(state.hyperparams["weight_decay"]) == 0.0


@pytest.mark.parametrize("jit", [True, False])
def test_inject_hyperparams_with_stagger_and_injected_gap(jit):
    """stagger=True with update_proj_gap injected (an array, traced under jit) equals a static gap."""
    params = {"a": np.ones((6, 4)), "b": np.ones((5, 7)), "c": np.ones((8, 3))}
    rng = np.random.default_rng(0)
    targets = {k: rng.standard_normal(v.shape) for k, v in params.items()}

    def grad_fn(p):
        return {k: p[k] - targets[k] + 0.1 * np.sin(p[k] * 7) for k in p}

    tx = optax.inject_hyperparams(fira_jax.fira, static_args=("rank",))(
        learning_rate=1e-2, rank=2, update_proj_gap=4, stagger=True
    )
    ours, state = run_ours(tx, params, grad_fn, 9, jit=jit)
    plain, _ = run_ours(fira_jax.fira(1e-2, rank=2, update_proj_gap=4, stagger=True), params, grad_fn, 9)
    for x, y in zip(ours, plain, strict=True):
        chex.assert_trees_all_close(x, y, rtol=1e-5, atol=1e-6)
    assert int(state.hyperparams["update_proj_gap"]) == 4


def test_inject_hyperparams_without_static_rank_names_rank():
    tx = optax.inject_hyperparams(fira_jax.fira)(learning_rate=1e-2)
    with pytest.raises(TypeError, match="rank"):
        tx.init({"w": jnp.ones((4, 3))})


def test_multisteps_accumulates():
    params, grad_fn = make_problem(5)
    tx = optax.MultiSteps(fira_jax.fira(1e-2, rank=3, update_proj_gap=2), every_k_schedule=2)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grad_fn(params))
    u1, state = jax.jit(tx.update)(g, state, p)
    chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, p))
    u2, state = jax.jit(tx.update)(g, state, p)
    direct, _ = fira_jax.fira(1e-2, rank=3, update_proj_gap=2).update(g, fira_jax.fira(1e-2, rank=3).init(p), p)
    chex.assert_trees_all_close(u2, direct, rtol=1e-5, atol=1e-7)


def test_apply_if_finite_skips_bad_steps():
    params, grad_fn = make_problem(6)
    p0 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    base = fira_jax.fira(1e-2, rank=3, update_proj_gap=2)
    tx = optax.apply_if_finite(base, max_consecutive_errors=3)
    state, clean_state = tx.init(p0), base.init(p0)
    p, q = p0, p0
    update, clean_update = jax.jit(tx.update), jax.jit(base.update)
    for t in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grad_fn(jax.tree.map(np.asarray, p)))
        if t in (2, 3):
            bad = dict(g, a=g["a"].at[0, 0].set(jnp.nan))
            u, state = update(bad, state, p)
            p = optax.apply_updates(p, u)
            continue
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        v, clean_state = clean_update(g, clean_state, q)
        q = optax.apply_updates(q, v)
    chex.assert_trees_all_close(p, q, rtol=1e-6)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2


def test_nnx_optimizer_matches_plain_optax():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.Linear(8, 6, rngs=rngs)
            self.head = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.attn(x)))

    model = Model(nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    pure0 = nnx.to_pure_dict(params0)
    tx = fira_jax.fira(1e-2, rank=2, update_proj_gap=3, mask=fira_jax.mask_by_path("attn"))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.linspace(-1, 1, 32).reshape(4, 8)

    def loss_fn(m):
        return jnp.mean(m(x) ** 2)

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(8)]
    assert losses[-1] < losses[0]

    # The same steps with plain optax on a dict of arrays.
    def pure_loss(p):
        state = nnx.State(params0)
        nnx.replace_by_pure_dict(state, p)
        return loss_fn(nnx.merge(graphdef, state))

    @jax.jit
    def plain_step(p, state):
        u, state = tx.update(jax.grad(pure_loss)(p), state, p)
        return optax.apply_updates(p, u), state

    p, state = pure0, tx.init(pure0)
    for _ in range(8):
        p, state = plain_step(p, state)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), p, rtol=1e-5, atol=1e-6)
    assert state[0].right["attn"]["kernel"].shape == (2, 6)  # 8 x 6 kernel: right side
    assert jax.tree.leaves(state[0].right["head"]) == []


def test_stacked_leaf_equals_separate_leaves():
    rng = np.random.default_rng(7)
    stacked = {"w": jnp.asarray(rng.standard_normal((3, 10, 6)), jnp.float32)}
    separate = {f"w{i}": stacked["w"][i] for i in range(3)}
    tx = fira_jax.fira(1e-2, rank=2, update_proj_gap=3, weight_decay=0.1, axes=fira_jax.MatrixAxes())  # a stack
    s_state, p_state = tx.init(stacked), tx.init(separate)
    ps, pp = stacked, separate
    for t in range(7):
        g = jnp.sin(ps["w"] * (t + 1)) + jnp.asarray(rng.standard_normal((3, 10, 6)), jnp.float32)
        us, s_state = jax.jit(tx.update)({"w": g}, s_state, ps)
        up, p_state = jax.jit(tx.update)({f"w{i}": g[i] for i in range(3)}, p_state, pp)
        ps, pp = optax.apply_updates(ps, us), optax.apply_updates(pp, up)
    chex.assert_trees_all_close(ps["w"], jnp.stack([pp[f"w{i}"] for i in range(3)]), rtol=1e-5, atol=1e-6)
    assert s_state[0].norms["w"].shape == (3,)


def test_state_bytes_llama_60m():
    """Nothing m x n in the state: count + bases + low-rank moments + one limiter scalar per matrix."""
    shapes = {"q": (512, 512), "k": (512, 512), "v": (512, 512), "o": (512, 512)}
    shapes |= {"gate": (512, 1376), "up": (512, 1376), "down": (1376, 512)}
    params = {f"layer{i}": {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()} for i in range(8)}
    state = jax.eval_shape(fira_jax.fira(1e-2, rank=128).init, params)
    got = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    r = 128
    # "std" projects on the smaller side: the basis is r x min(m, n), Adam's two
    # moments are r x max(m, n) each, and the limiter keeps one float per matrix.
    per_layer = sum(4 * (r * min(m, n) + 2 * r * max(m, n) + 1) for m, n in shapes.values())
    counts = 3 * 4  # int32 step counts: scale_by_fira, its Adam, the bias-correction schedule
    assert got == 8 * per_layer + counts
    adamw = jax.eval_shape(optax.adamw(1e-2).init, params)
    assert got < 0.5 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adamw))


def test_one_compilation_serves_refresh_and_other_steps():
    tx = fira_jax.fira(1e-2, rank=2, update_proj_gap=2, axes=fira_jax.MatrixAxes())  # "stack": a stack
    p = {"w": jnp.ones((6, 4)), "stack": jnp.ones((3, 5, 7)), "b": jnp.ones(3)}
    state = tx.init(p)

    @jax.jit
    @chex.assert_max_traces(n=1)  # refresh steps and the others: one trace, one compilation
    def step(g, state):
        return tx.update(g, state, p)

    for t in range(5):
        g = jax.tree.map(lambda x, t=t: jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * (t + 1)), p)
        _, state = step(g, state)
    jaxpr = str(jax.make_jaxpr(tx.update)(p, state, p))
    # One cond per selected leaf (residual_norm needs none at the default residual_scale); one
    # SVD per selected leaf, inside it (the stacked leaf's matrices one after another, in a loop
    # over the stack).
    assert len(re.findall(r"= cond\[", jaxpr)) == 2
    assert len(re.findall(r"= svd\[", jaxpr)) == 2
    assert re.search(r"= scan\[(.|\n)*= svd\[", jaxpr)


def test_dtype_preserved_bf16():
    p = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.ones(4, jnp.bfloat16)}
    tx = fira_jax.fira(1e-2, rank=2)
    state = tx.init(p)
    u, state = jax.jit(tx.update)(jax.tree.map(lambda x: x * 0.5 + jnp.eye(*x.shape[-2:], dtype=x.dtype)
                                               if x.ndim == 2 else x, p), state, p)  # fmt: skip
    assert u["w"].dtype == jnp.bfloat16 and u["b"].dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"update_proj_gap": 0}, ValueError, "update_proj_gap"),
        ({"gamma": 0.99}, ValueError, "gamma"),
        ({"b1": 1.0}, ValueError, "b1"),
        ({"b2": -0.1}, ValueError, "b2"),
        ({"eps": -1e-8}, ValueError, "eps"),
        ({"proj_type": "diagonal"}, ValueError, "proj_type"),
        ({"proj_type": "full"}, ValueError, "full"),
    ],
)
def test_bad_hyperparameters_raise_at_build(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        fira_jax.fira(1e-2, **kwargs)


def test_galore_accepts_full_and_rejects_bad_values():
    fira_jax.galore(1e-2, proj_type="full")
    with pytest.raises(ValueError, match="b1"):
        fira_jax.galore(1e-2, b1=1.5)


@pytest.mark.parametrize(
    ("params", "match"),
    [({"layer": {"bias": jnp.ones(3)}}, "layer/bias"), ({"table": jnp.ones((4, 3), jnp.int32)}, "table")],
)
def test_bad_selected_leaf_raises_at_init_naming_path(params, match):
    tx = fira_jax.fira(1e-2, mask=jax.tree.map(lambda _: True, params))
    with pytest.raises((ValueError, TypeError), match=match):
        tx.init(params)


def test_galore_full_projection_matches_numpy():
    """Two-sided GaLore: low = U^T G V, back(X) = U X V^T; checked at the step after the refresh."""
    rng = np.random.default_rng(8)
    g0, g1 = rng.standard_normal((2, 9, 7)).astype(np.float32)
    tx = fira_jax.galore(1.0, rank=3, update_proj_gap=10, proj_type="full", scale=1.0)
    p = {"w": jnp.zeros((9, 7))}
    state = tx.init(p)
    _, state = tx.update({"w": jnp.asarray(g0)}, state, p)
    u, _ = tx.update({"w": jnp.asarray(g1)}, state, p)
    uu, _, vh = np.linalg.svd(g0.astype(np.float64), full_matrices=False)
    left, right = uu[:, :3], vh[:3]
    low0, low1 = left.T @ g0 @ right.T, left.T @ g1 @ right.T
    m = 0.9 * 0.1 * low0 + 0.1 * low1
    v = 0.999 * 0.001 * low0**2 + 0.001 * low1**2
    c = math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    expected = -c * left @ (m / (np.sqrt(v) + 1e-6)) @ right
    np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("factory", [fira_jax.fira, fira_jax.galore])
@pytest.mark.parametrize("as_callable", [True, False])
def test_weight_decay_mask_decays_only_selected_leaves(factory, as_callable):
    params, grad_fn = make_problem(4)
    decay = {"a": True, "b": False, "bias": False}
    mask = (lambda p: {k: k == "a" for k in p}) if as_callable else decay
    masked, _ = run_ours(factory(1e-2, rank=3, weight_decay=0.5, weight_decay_mask=mask), params, grad_fn, 3)
    decayed, _ = run_ours(factory(1e-2, rank=3, weight_decay=0.5), params, grad_fn, 3)
    plain, _ = run_ours(factory(1e-2, rank=3), params, grad_fn, 3)
    for k, sel in decay.items():
        want = decayed if sel else plain
        np.testing.assert_allclose(masked[-1][k], want[-1][k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(decayed[-1]["b"], plain[-1]["b"], rtol=1e-4)  # the decay is visible
