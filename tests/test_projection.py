"""The bases (fira_jax.projection, fira_jax.basis): sides, refresh schedule, layouts, errors.

Tested through scale_by_galore with the identity in the subspace, whose update is then
``scale · back(R)``: the gradient's projection on the basis, in the leaf's layout.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_side import np_side

import fira_jax
from fira_jax._src import basis as basis_module

REFRESH_OPTIONS = ("method", "stagger", "canonical_signs", "oversample", "power_iters", "seed")


def project(rank, update_proj_gap, scale=1.0, refresh_by_shape=False, **kwargs):
    """G -> scale · P P^T G (or its left / two-sided form), with the bases in the state."""
    options = {k: kwargs.pop(k) for k in REFRESH_OPTIONS if k in kwargs}
    refresh = fira_jax.Refresh(update_proj_gap=update_proj_gap, by_shape=refresh_by_shape, **options)
    return fira_jax.scale_by_galore(rank, scale, refresh=refresh, base_optimizer=optax.identity(), **kwargs)


def assert_same_subspace(p, q, side):
    """p and q span the same subspace, vector by vector, up to sign."""
    cos = np.abs(np.sum(p * q, axis=-1 if side == "right" else -2))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_low_rank_gradient_and_back(variant, proj_type, shape):
    rng = np.random.default_rng(0)
    g = rng.standard_normal(shape).astype(np.float32)
    rank = 3
    tx = project(rank, update_proj_gap=5, scale=0.5, proj_type=proj_type)
    params = {"w": jnp.zeros(shape)}
    dense, state = variant(tx.update)({"w": jnp.asarray(g)}, tx.init(params))
    side = np_side(proj_type, *shape)
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    if side == "right":
        p_np = vh[:rank]
        low_np = g @ p_np.T
        p = np.asarray(state.right["w"])
    else:
        p_np = u[:, :rank]
        low_np = p_np.T @ g
        p = np.asarray(state.left["w"])
    assert_same_subspace(p, p_np, side)
    # Sign-free comparison: the back-projection of the low-rank gradient.
    back_np = low_np @ p_np if side == "right" else p_np @ low_np
    chex.assert_trees_all_close(dense["w"], 0.5 * jnp.asarray(back_np), atol=1e-4)


def test_refresh_only_every_gap_steps(variant):
    tx = project(2, update_proj_gap=3)
    params = {"w": jnp.zeros((6, 4))}
    state = tx.init(params)
    update = variant(tx.update)
    rng = np.random.default_rng(1)
    seen = []
    for _ in range(7):
        _, state = update({"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}, state)
        seen.append(np.asarray(state.right["w"]))
    changed = [not np.array_equal(seen[t], seen[t - 1]) for t in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # refreshes at t = 3 and 6


def test_default_basis_is_orthonormal():
    tx = project(rank=2, update_proj_gap=2)
    state = tx.init({"w": jnp.zeros((6, 4)), "v": jnp.zeros((3, 8))})
    assert state.right["w"].shape == (2, 4)
    assert state.left["v"].shape == (3, 2)
    # Before the first refresh the basis is a valid orthonormal default.
    np.testing.assert_allclose(np.asarray(state.left["v"]).T @ np.asarray(state.left["v"]), np.eye(2))


def test_rank_not_below_a_matrix_side_leaves_it_full_rank_and_says_so(caplog):
    """Projecting at a rank >= the smaller side would keep at least Adam's state and add an SVD
    per refresh: such a matrix gets the subspace optimizer on its whole gradient, logged once."""
    tx = project(rank=3, update_proj_gap=2)
    params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((3, 8)), "big": jnp.zeros((8, 5))}
    with caplog.at_level("WARNING", logger="fira_jax"):
        state = tx.init(params)
    assert isinstance(state.left["v"], optax.MaskedNode) and isinstance(state.right["v"], optax.MaskedNode)
    assert state.right["w"].shape == (3, 4) and state.right["big"].shape == (3, 5)
    (record,) = caplog.records
    assert "v (3 x 8 matrix: rank 3 is not below its smaller side)" in record.getMessage()
    g = {k: jnp.full(x.shape, 2.0) for k, x in params.items()}
    updates, _ = tx.update(g, state)
    np.testing.assert_array_equal(updates["v"], g["v"])  # the (identity) subspace optimizer, unprojected


def test_stacked_leaf_has_one_basis_per_matrix():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((4, 10, 6)).astype(np.float32)
    tx = project(2, update_proj_gap=5, axes=fira_jax.MatrixAxes(rows=-2, cols=-1))  # a declared stack
    _, state = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros((4, 10, 6))}))
    assert state.right["w"].shape == (4, 2, 6)
    for i in range(4):
        assert_same_subspace(np.asarray(state.right["w"][i]), np.linalg.svd(g[i])[2][:2], "right")


def test_matrix_axes_dense_general():
    """A (embed, heads, head_dim) kernel as one embed x (heads*head_dim) matrix."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((8, 2, 5)).astype(np.float32)
    axes = {"qkv": fira_jax.MatrixAxes(rows=0, cols=(1, 2))}
    tx = project(3, update_proj_gap=5, axes=axes)
    params = {"qkv": jnp.zeros((8, 2, 5))}
    dense, state = tx.update({"qkv": jnp.asarray(g)}, tx.init(params))
    assert state.left["qkv"].shape == (8, 3)  # 8 x 10 matrix: left side
    g2 = g.reshape(8, 10)
    u = np.linalg.svd(g2)[0][:, :3]
    np.testing.assert_allclose(np.asarray(dense["qkv"]), (u @ u.T @ g2).reshape(8, 2, 5), atol=1e-4)


def test_canonical_signs():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((7, 11)).astype(np.float32)
    tx = project(4, update_proj_gap=5, canonical_signs=True)
    _, state = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros((7, 11))}))
    p = np.asarray(state.left["w"])
    largest = p[np.abs(p).argmax(axis=0), np.arange(4)]
    assert np.all(largest > 0)
    # Flipping the gradient's sign flips every singular vector; canonical signs undo it.
    _, state2 = tx.update({"w": -jnp.asarray(g)}, tx.init({"w": jnp.zeros((7, 11))}))
    np.testing.assert_allclose(np.asarray(state2.left["w"]), p, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_all_finite_per_matrix(jit, dtype):
    from fira_jax._src.basis import all_finite

    x = np.full((4, 3, 5), 3e38, np.float32)  # near the largest float32 and bfloat16: a sum would overflow
    x[1, 2, 3], x[2, 0, 0], x[3, 1, 4] = np.nan, -np.inf, np.inf
    fn = jax.jit(all_finite) if jit else all_finite
    ok = fn(jnp.asarray(x, dtype))
    assert ok.shape == (4, 1, 1)
    np.testing.assert_array_equal(np.asarray(ok).ravel(), np.isfinite(x).all(axis=(1, 2)))


def test_canonical_signs_ties_and_largest_entry():
    from fira_jax._src.basis import canonical_signs

    u = jnp.array([[-1.0, 0.5, -3.0], [1.0, -2.0, 2.0]])  # columns: a tie (kept, +1), then -2 and -3 largest
    signed, _ = canonical_signs(u, None, "left")
    np.testing.assert_array_equal(np.asarray(signed), [[-1.0, -0.5, 3.0], [1.0, 2.0, -2.0]])


def test_nonfinite_gradient_keeps_previous_basis():
    tx = project(2, update_proj_gap=1)
    params = {"w": jnp.zeros((5, 4))}
    state = tx.init(params)
    default = np.asarray(state.right["w"])
    bad = jnp.ones((5, 4)).at[0, 0].set(jnp.nan)
    _, state = jax.jit(tx.update)({"w": bad}, state)
    np.testing.assert_array_equal(np.asarray(state.right["w"]), default)
    good = jnp.asarray(np.random.default_rng(5).standard_normal((5, 4)), jnp.float32)
    _, state = jax.jit(tx.update)({"w": good}, state)
    _, state_inf = jax.jit(tx.update)({"w": good.at[1, 1].set(jnp.inf)}, state)
    np.testing.assert_array_equal(np.asarray(state_inf.right["w"]), np.asarray(state.right["w"]))


@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "subspace", "gram, finite eigenvectors"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_a_nonfinite_matrix_keeps_its_basis_and_the_others_refresh(method, bad, monkeypatch):
    """Per matrix, by every method: one NaN or infinity in one matrix of a stack keeps that matrix's
    basis, and the other matrices (of the stack and of a leaf sharing the site) take new ones.
    "gram, finite eigenvectors": an eigensolver that returns finite vectors whatever its input (the
    Gram refresh reads the gradient's finiteness from the Gram matrix, not from the vectors)."""
    if method == "gram, finite eigenvectors":
        method = "gram"
        monkeypatch.setattr(basis_module, "_top_eigenvectors", lambda a, rank: jnp.tanh(jnp.nan_to_num(a[..., :rank])))
    rng = np.random.default_rng(7)
    shapes = {"s": (3, 6, 8), "t": (8, 6)}  # left-side 3 x 6 x 8 and right-side 8 x 6: one Gram site
    tx = project(2, update_proj_gap=1, refresh_by_shape=True, method=method, axes=fira_jax.MatrixAxes())
    state = tx.init({k: jnp.zeros(v) for k, v in shapes.items()})
    first = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
    _, state = jax.jit(tx.update)(first, state)
    before = {"s": np.asarray(state.left["s"]), "t": np.asarray(state.right["t"])}
    second = {k: jnp.asarray(rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
    second["s"] = second["s"].at[1, 2, 3].set(bad)
    _, state = jax.jit(tx.update)(second, state)
    after = {"s": np.asarray(state.left["s"]), "t": np.asarray(state.right["t"])}
    assert np.isfinite(after["s"]).all() and np.isfinite(after["t"]).all()
    np.testing.assert_array_equal(after["s"][1], before["s"][1])
    assert not np.array_equal(after["s"][[0, 2]], before["s"][[0, 2]])
    assert not np.array_equal(after["t"], before["t"])


def test_bf16_gradient_svd_in_float32():
    g = jnp.asarray(np.random.default_rng(6).standard_normal((6, 4)), jnp.bfloat16)
    tx = fira_jax.scale_by_galore(2, refresh=fira_jax.Refresh(update_proj_gap=5))
    dense, state = tx.update({"w": g}, tx.init({"w": jnp.zeros((6, 4), jnp.bfloat16)}))
    assert state.right["w"].dtype == jnp.bfloat16
    # Adam's moments are float32 for bf16 parameters (b2 = 0.999 is 1 in bf16), unless asked otherwise.
    assert state.inner.mu["w"].dtype == state.inner.nu["w"].dtype == jnp.float32
    assert dense["w"].dtype == jnp.bfloat16
    low = fira_jax.scale_by_galore(
        2, base_optimizer=fira_jax.scale_by_torch_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    )
    kept = low.init({"w": jnp.zeros((6, 4), jnp.bfloat16)})
    assert kept.inner.mu["w"].dtype == kept.inner.nu["w"].dtype == jnp.bfloat16
    tx32 = project(2, update_proj_gap=5, basis_dtype=jnp.float32)
    _, state32 = tx32.update({"w": g}, tx32.init({"w": jnp.zeros((6, 4), jnp.bfloat16)}))
    assert state32.right["w"].dtype == jnp.float32


def test_mask_pytree_and_callable():
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((4, 3)), "c": jnp.zeros(3)}
    for mask in ({"a": True, "b": False, "c": False}, lambda p: {"a": True, "b": False, "c": False}):
        tx = project(2, 5, mask=mask)
        out, state = tx.update(params, tx.init(params))
        assert isinstance(state.right["a"], jax.Array)
        assert jax.tree.leaves(state.right["b"]) == [] and jax.tree.leaves(state.left["b"]) == []
        assert out["b"] is params["b"] and out["c"] is params["c"]


def test_empty_tree_and_no_selected_leaf():
    for params in ({}, {"bias": jnp.ones(3)}):
        tx = fira_jax.fira(1e-2, rank=2)
        state = tx.init(params)
        u, _ = jax.jit(tx.update)(params, state, params)
        chex.assert_trees_all_equal_shapes(u, params)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 0, "update_proj_gap": 1}, ValueError, "rank"),
        ({"rank": True, "update_proj_gap": 1}, TypeError, "rank"),
        ({"rank": 2, "update_proj_gap": 0}, ValueError, "update_proj_gap"),
        ({"rank": 2, "update_proj_gap": 1.5}, TypeError, "update_proj_gap"),
        ({"rank": 2, "update_proj_gap": 1, "proj_type": "up"}, ValueError, "proj_type"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kwargs = dict(kwargs)
        refresh = fira_jax.Refresh(update_proj_gap=kwargs.pop("update_proj_gap"))
        fira_jax.scale_by_galore(**kwargs, refresh=refresh)


@pytest.mark.parametrize(
    ("params", "mask", "axes", "match"),
    [
        ({"x": {"b": jnp.ones(3)}}, {"x": {"b": True}}, None, "x/b"),
        ({"ids": jnp.ones((3, 3), jnp.int32)}, {"ids": True}, None, "ids"),
        ({"w": jnp.ones((3, 3))}, {"w": 1}, None, "mask"),
        ({"w": jnp.ones((3, 3))}, {"v": True}, None, "mask"),
        ({"w": jnp.ones((3, 4, 5))}, None, fira_jax.MatrixAxes(rows=0, cols=0), "w"),
        ({"w": jnp.ones((3, 4, 5))}, None, fira_jax.MatrixAxes(rows=3, cols=1), "w"),
    ],
)
def test_bad_leaves_raise_at_init(params, mask, axes, match):
    tx = project(2, 5, mask=mask, axes=axes)
    with pytest.raises((ValueError, TypeError), match=match):
        tx.init(params)


def decaying(shape, seed, power=1.5):
    """A matrix with singular values k^-power, like LM gradients (fast spectral decay)."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
    v = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
    return ((u * (1.0 / np.arange(1, k + 1) ** power)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(48, 30), (30, 48), (2, 30, 20)])
def test_randomized_svd_is_orthonormal_and_captures_energy(proj_type, shape):
    g = np.stack([decaying(shape[-2:], i) for i in range(shape[0])]) if len(shape) == 3 else decaying(shape, 0)
    energies = {}
    for svd in ("exact", "randomized"):
        tx = project(6, 5, proj_type=proj_type, method=svd)
        back, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros(shape)}))
        for p in (state.left["w"], state.right["w"]):
            if isinstance(p, jax.Array):
                gram = (
                    jnp.einsum("...ij,...kj->...ik", p, p)
                    if p.shape[-2] < p.shape[-1]
                    else jnp.einsum("...ji,...jk->...ik", p, p)
                )
                np.testing.assert_allclose(np.asarray(gram), np.broadcast_to(np.eye(6), gram.shape), atol=1e-5)
        energies[svd] = float(jnp.sum(back["w"] ** 2) / np.sum(g**2))  # ||P P^T G||² = ||R||²
    assert energies["randomized"] >= 0.99 * energies["exact"]


def test_stagger_spreads_refreshes():
    shapes = {f"w{i}": (6, 4) for i in range(4)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    tx = project(2, update_proj_gap=4, stagger=True)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    refreshed = []
    prev = state.right
    for _ in range(9):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        _, state = update(g, state)
        refreshed.append(sorted(k for k in shapes if not np.array_equal(state.right[k], prev[k])))
        prev = state.right
    # Offsets 0, 1, 2, 3: everything at t = 0, then one leaf per step.
    assert refreshed == [["w0", "w1", "w2", "w3"], ["w3"], ["w2"], ["w1"], ["w0"], ["w3"], ["w2"], ["w1"], ["w0"]]
    jaxpr = str(jax.make_jaxpr(tx.update)(params, state))
    assert jaxpr.count("= cond[") == 4


@pytest.mark.parametrize("by_shape", [False, True])
def test_svd_call_sites_per_leaf_or_per_shape(variant, by_shape):
    """One SVD call site per leaf (a stacked leaf's matrices in one loop), or per matrix shape.

    The TPU compiler expands every SVD call site into its own program, so the compile time grows
    with the number of sites; the bases are each matrix's own either way.
    """
    rng = np.random.default_rng(0)
    shapes = {"a": (6, 4), "b": (6, 4), "stack": (3, 6, 4), "c": (4, 6), "d": (4, 6), "e": (5, 5)}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    tx = project(2, update_proj_gap=4, refresh_by_shape=by_shape, axes=fira_jax.MatrixAxes())
    state = tx.init(grads)
    hlo = jax.jit(tx.update).lower(grads, state).compile().as_text()  # LAPACK's gesdd on CPU
    assert hlo.count('custom_call_target="lapack_sgesdd') == (3 if by_shape else 6)  # (6, 4), (4, 6), (5, 5)
    _, state = variant(tx.update)(grads, state)
    for k, g in grads.items():
        u, _, vh = np.linalg.svd(np.asarray(g), full_matrices=False)
        side = "left" if g.shape[-2] < g.shape[-1] else "right"
        got = state.left[k] if side == "left" else state.right[k]
        want = u[..., :, :2] if side == "left" else vh[..., :2, :]
        assert_same_subspace(np.asarray(got), want, side)


# randomized with the slow tests: the subspace refresh runs it at its first refresh (README's command stays short)
@pytest.mark.parametrize("method", ["gram", pytest.param("randomized", marks=pytest.mark.slow), "subspace"])
def test_one_site_per_vector_length_for_gram_and_range_finders(method):
    """By shape, the Gram, randomized and subspace refreshes of one-sided bases share one compiled
    eigendecomposition per length of the basis's vectors: (6, 4) and (3, 6, 4) on the right side,
    (4, 6) on the left and (4, 4) all have vectors of length 4. Each leaf's bases are those it
    gets refreshed alone, and its subspace that of its own SVD. Jitted for every method (the
    compiled program is what is counted and run); without jit for the Gram refresh by shape."""
    rng = np.random.default_rng(0)
    shapes = {"a": (6, 4), "b": (6, 4), "stack": (3, 6, 4), "c": (4, 6), "d": (4, 6), "e": (5, 5), "f": (4, 4)}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    states = {}
    for by_shape in (False, True):
        tx = project(2, update_proj_gap=4, refresh_by_shape=by_shape, axes=fira_jax.MatrixAxes(), method=method,
                     power_iters=1)  # fmt: skip
        state = tx.init(grads)
        compiled = jax.jit(tx.update).lower(grads, state).compile()
        assert compiled.as_text().count('custom_call_target="lapack_ssyevd') == (2 if by_shape else 7)  # LAPACK on CPU
        _, states[by_shape] = compiled(grads, state)
        if by_shape and method == "gram":
            _, eager = tx.update(grads, state)
            for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(states[True]), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for k, g in grads.items():
        u, _, vh = np.linalg.svd(np.asarray(g), full_matrices=False)
        side = "left" if g.shape[-2] < g.shape[-1] else "right"
        got = {b: np.asarray(s.left[k] if side == "left" else s.right[k]) for b, s in states.items()}
        np.testing.assert_allclose(got[True], got[False], atol=1e-5, err_msg=k)
        if method != "randomized" or min(g.shape[-2:]) <= 10:  # rank + oversample covers these
            want = u[..., :, :2] if side == "left" else vh[..., :2, :]
            assert_same_subspace(got[True], want, side)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(48, 30), (30, 48), (2, 30, 20)])
@pytest.mark.parametrize("signs", [False, True])
def test_gram_basis_is_the_exact_subspace(variant, proj_type, shape, signs):
    """svd="gram" (eigenvectors of the Gram matrix) spans the SVD's subspace, vector by vector."""
    g = np.stack([decaying(shape[-2:], i) for i in range(shape[0])]) if len(shape) == 3 else decaying(shape, 0)
    states = {}
    for svd in ("exact", "gram"):
        tx = project(6, 5, proj_type=proj_type, method=svd, canonical_signs=signs)
        update = variant(tx.update) if svd == "gram" else jax.jit(tx.update)  # the reference: jitted both times
        _, states[svd] = update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros(shape)}))
    for side, attr in (("left", "left"), ("right", "right")):
        want, got = getattr(states["exact"], attr)["w"], getattr(states["gram"], attr)["w"]
        if isinstance(want, jax.Array):
            assert_same_subspace(np.asarray(got), np.asarray(want), side)
            # Canonical signs make the vectors equal, not only equal up to sign (two-sided: the
            # exact SVD's V takes U's signs, the Gram's V its own).
            if signs and (proj_type != "full" or side == "left"):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(48, 30), (30, 48), (2, 30, 20)])
def test_subspace_iteration_tracks_a_moving_gradient(variant, proj_type, shape):
    """svd="subspace": orthonormal; its first refresh (Gaussian start) captures the randomized SVD's
    energy, and later refreshes, warm-started from the previous basis, follow a gradient whose
    top subspace moves to within 1 % of the exact SVD's energy."""
    rng = np.random.default_rng(1)
    g0 = np.stack([decaying(shape[-2:], i) for i in range(shape[0])]) if len(shape) == 3 else decaying(shape, 0)
    drift = rng.standard_normal(shape).astype(np.float32) * 0.02
    grads = [g0 + t * drift for t in range(4)]  # refreshed at every step (gap 1)
    # the exact SVD's share of the energy (one- or two-sided: the top 6 singular values' squares)
    top = [np.sum(np.linalg.svd(g, compute_uv=False)[..., :6] ** 2) / np.sum(g**2) for g in grads]
    energies = {"exact": [float(e) for e in top], "subspace": []}
    tx = project(6, 1, proj_type=proj_type, method="subspace")
    state = tx.init({"w": jnp.zeros(shape)})
    update = variant(tx.update)
    for g in grads:
        back, state = update({"w": jnp.asarray(g)}, state)
        energies["subspace"].append(float(jnp.sum(back["w"] ** 2) / np.sum(g**2)))
    for p in (state.left["w"], state.right["w"]):
        if isinstance(p, jax.Array):
            small = min(p.shape[-2:])
            gram = np.asarray(jnp.einsum("...ij,...kj->...ik", p, p) if p.shape[-2] == small else
                              jnp.einsum("...ji,...jk->...ik", p, p))  # fmt: skip
            np.testing.assert_allclose(gram, np.broadcast_to(np.eye(small), gram.shape), atol=1e-5)
    for exact, sub in zip(energies["exact"], energies["subspace"], strict=True):
        assert sub >= 0.99 * exact, (energies, proj_type, shape)


def test_subspace_iteration_keeps_an_exact_start_and_compiles_once():
    g = jnp.asarray(decaying((40, 24), 3))
    vh = np.linalg.svd(np.asarray(g), full_matrices=False)[2][:5]
    _, got = fira_jax.projections.subspace_iteration(g, jnp.asarray(vh.T), 5, "right", jax.random.key(0), 4, 1)
    assert_same_subspace(np.asarray(got), vh, "right")
    tx = fira_jax.fira(1e-2, rank=5, update_proj_gap=2, refresh_method="subspace")
    params = {"w": jnp.zeros((40, 24))}
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, s):
        return tx.update(g, s, params)

    for t in range(5):  # refreshes at 0 (Gaussian start) and 2, 4 (warm): one program
        _, state = step({"w": g * (1 + 0.1 * t)}, state)
    assert_same_subspace(np.asarray(state[0].right["w"]), vh, "right")


def _mha_params():
    """``nnx.MultiHeadAttention`` (features 64, 4 heads of 16): kernels (64, 4, 16), (4, 16, 64); biases (4, 16)."""
    from flax import nnx

    mha = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False, rngs=nnx.Rngs(0))
    return nnx.to_pure_dict(nnx.state(mha, nnx.Param))


def test_leaves_with_more_axes_are_not_guessed(caplog):
    """``nnx.MultiHeadAttention`` at rank 8: before, its (64, 4, 16) query kernel was taken as 64
    stacked 4 x 16 matrices (at rank 4: full rank, no saving) and its (4, 16) biases as matrices.
    Now, undeclared, every kernel is left full-rank, the biases too (4 <= rank), and init says so."""
    params = _mha_params()
    tx = fira_jax.scale_by_fira(rank=8, refresh=fira_jax.Refresh(update_proj_gap=5))
    with caplog.at_level("WARNING", logger="fira_jax"):
        state = tx.init(params)
    assert jax.tree.leaves(state.right) == [] and jax.tree.leaves(state.left) == []
    (record,) = caplog.records
    message = record.getMessage()
    for name in ("query", "key", "value", "out"):
        assert f"{name}/kernel (shape" in message and "no `axes` declared" in message
    # MultiHeadAttention's (heads, head_dim) biases are not matrices, whatever the rank.
    assert "query/bias (shape (4, 16): the bias of 'query/kernel' (64, 4, 16)" in message
    assert "to project the stacked" not in message  # no stack of layers here: nothing to suggest


@pytest.mark.parametrize("variant_name", ["galore", "fira", "apollo"])
def test_multi_head_attention_kernels_declared_by_path(variant_name):
    """Declared, each kernel is one 64 x 64 matrix at rank 8, and only the kernels are projected."""
    params = _mha_params()
    qkv = fira_jax.MatrixAxes(rows=0, cols=(1, 2))  # features x (heads, head_dim)
    out = fira_jax.MatrixAxes(rows=(0, 1), cols=2)  # (heads, head_dim) x features
    axes = fira_jax.axes_by_path({"query/kernel": qkv, "key/kernel": qkv, "value/kernel": qkv, "out/kernel": out})
    tx = getattr(fira_jax, f"scale_by_{variant_name}")(rank=8, refresh=fira_jax.Refresh(update_proj_gap=5), axes=axes)
    state = tx.init(params)
    for name in ("query", "key", "value", "out"):
        assert state.right[name]["kernel"].shape == (8, 64), name  # std: m >= n, right side
    assert isinstance(state.right["query"]["bias"], optax.MaskedNode)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    updates, state = jax.jit(tx.update)(grads, state)
    if variant_name != "apollo":  # (APOLLO's projection is random)
        g = np.asarray(grads["query"]["kernel"]).reshape(64, 64)
        assert_same_subspace(np.asarray(state.right["query"]["kernel"]), np.linalg.svd(g)[2][:8], "right")
    assert updates["out"]["kernel"].shape == (4, 16, 64)


def test_scanned_stack_is_projected_only_where_declared():
    """A scanned model's leaves, (layers, m, n) kernels and (layers, n) biases: with the kernels
    declared as stacks, each layer's matrix has its own basis and the stacked biases (2-D, not
    matrices) are left alone. Undeclared, the kernels are left full-rank (and a stacked bias, 2-D,
    would be taken for a matrix were its smaller side above the rank: declare by path)."""
    from flax import nnx

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(16, 24, rngs=nnx.Rngs(params=key))

    layers = make(jax.random.split(jax.random.key(0), 3))
    params = nnx.to_pure_dict(nnx.state(layers, nnx.Param))
    assert params["kernel"].shape == (3, 16, 24) and params["bias"].shape == (3, 24)
    stacks = fira_jax.axes_by_path({"kernel": fira_jax.MatrixAxes()})
    state = fira_jax.scale_by_galore(rank=4, refresh=fira_jax.Refresh(update_proj_gap=5), axes=stacks).init(params)
    assert state.left["kernel"].shape == (3, 16, 4) and isinstance(state.left["bias"], optax.MaskedNode)
    state = fira_jax.scale_by_galore(rank=4, refresh=fira_jax.Refresh(update_proj_gap=5)).init(params)
    assert jax.tree.leaves((state.left, state.right)) == []  # kernel: undeclared; bias: 3 <= rank


def test_integer_leaves_are_left_out_by_the_default_mask():
    """An integer matrix (token ids, a step counter) is not a weight: the default mask skips it
    (an explicit mask selecting it is an error naming it, test_bad_leaves_raise_at_init)."""
    params = {"w": jnp.ones((6, 4)), "ids": jnp.ones((3, 3), jnp.int32)}
    state = fira_jax.scale_by_galore(rank=2, refresh=fira_jax.Refresh(update_proj_gap=5)).init(params)
    assert state.right["w"].shape == (2, 4) and isinstance(state.right["ids"], optax.MaskedNode)
    tx = fira_jax.fira(1e-2, rank=2)
    updates, _ = tx.update(params, tx.init(params), params)
    assert not jnp.any(updates["ids"])  # not trained: a zero update (docs/reliability.md)


def test_subspace_first_refresh_starts_from_its_gaussian_probes():
    """svd="subspace" has no previous basis at its first refresh: it runs the randomized range finder
    from rank + oversample Gaussian probes (drawn with the matrix's key), not an iteration from the
    default basis (the first r coordinate vectors)."""
    from fira_jax.projections import matrix_keys, randomized_svd, subspace_iteration

    g = jnp.asarray(np.random.default_rng(7).standard_normal((40, 30)), jnp.float32)  # 11 probes of 30 columns
    refresh = fira_jax.Refresh(update_proj_gap=5, method="subspace", canonical_signs=False, power_iters=0, seed=4)
    tx = fira_jax.scale_by_galore(3, refresh=refresh)
    _, state = jax.jit(tx.update)({"w": g}, tx.init({"w": jnp.zeros((40, 30))}))
    key = matrix_keys(4, "w", jnp.int32(0), jnp.int32(0))
    _, cold = jax.jit(lambda g, k: randomized_svd(g, 3, "right", k, 8, 0, both=False))(g, key)  # the basis side only
    np.testing.assert_allclose(np.asarray(state.right["w"]), np.asarray(cold), atol=1e-5)
    iterate = jax.jit(lambda g, k: subspace_iteration(g, jnp.eye(30, 3), 3, "right", k, 8, 0, both=False))
    _, warm = iterate(g, key)  # from the default basis
    overlap = np.abs(np.asarray(state.right["w"]) @ np.asarray(warm).T).max(axis=1)
    assert overlap.min() < 0.9, overlap  # another subspace, not the same one up to signs


def test_the_keys_of_all_leaves_are_derived_once():
    """APOLLO's per-matrix keys: every leaf's keys are those ``matrix_keys`` gives it alone, and the
    update derives them in one vectorized computation: its Threefry call sites do not grow with
    the number of leaves (a derivation per leaf compiled three per leaf, and 20 s of APOLLO's
    compile at 56 leaves)."""
    from fira_jax._src.subspace import leaves_matrix_keys
    from fira_jax.projections import matrix_keys

    indices = [jnp.arange(6, dtype=jnp.int32).reshape(2, 3), jnp.int32(4), jnp.arange(3, dtype=jnp.int32)]
    paths = ["layers/attn/kernel", "embed", "layers/mlp/kernel"]
    together = leaves_matrix_keys(7, paths, indices, jnp.int32(200))
    for path, index, got in zip(paths, indices, together, strict=True):
        alone = matrix_keys(7, path, index, jnp.int32(200))
        assert got.shape == jnp.shape(index)
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(alone))
    assert leaves_matrix_keys(7, [], [], jnp.int32(200)) == []  # no projected leaf
    sites = {}
    for n in (2, 6):
        params = {f"w{i}": jnp.zeros((16, 24)) for i in range(n)}
        tx = fira_jax.apollo(1e-2, rank=4)
        text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
        sites[n] = (text.count("call @threefry"), text.count("call @_threefry_fold_in"))
    assert sites[2] == sites[6] and sites[2][1] <= 3, sites


def test_default_selection_reads_a_scanned_model(caplog):
    """No declaration: a (16, 64) norm stack beside (16, 64, 64) kernels in a scanned module is a
    stack of vectors, not a matrix; the stacked kernels stay full-rank and the log says, once,
    what is projected, what is not and why, and the one line that would project the kernels."""
    params = {
        "embed": jnp.zeros((100, 64)),  # an ordinary 2-D matrix: projected
        "layers": {"attn": {"kernel": jnp.zeros((16, 64, 64))}, "norm": {"scale": jnp.zeros((16, 64))}},
        "final_norm": {"scale": jnp.zeros(64)},
    }
    tx = fira_jax.scale_by_fira(rank=4)
    with caplog.at_level("INFO", logger="fira_jax"):
        state = tx.init(params)
    assert state.right["embed"].shape == (4, 64)
    assert isinstance(state.right["layers"]["norm"]["scale"], optax.MaskedNode)
    assert isinstance(state.left["layers"]["norm"]["scale"], optax.MaskedNode)
    assert isinstance(state.right["layers"]["attn"]["kernel"], optax.MaskedNode)
    (record,) = caplog.records
    message = record.getMessage()
    assert "1 leaves projected: embed (100 x 64, rank 4)" in message
    assert "layers/norm/scale (shape (16, 64): a stack of 16 vectors" in message
    assert "layers/attn/kernel (shape (16, 64, 64): more than 2 axes" in message
    rule = 'axes=fira_jax.axes_by_path({"layers/attn/kernel": fira_jax.MatrixAxes()})'
    assert rule in message
    declared = fira_jax.scale_by_fira(rank=4, axes=fira_jax.axes_by_path({"layers/attn/kernel": fira_jax.MatrixAxes()}))
    assert declared.init(params).right["layers"]["attn"]["kernel"].shape == (16, 4, 64)  # the suggestion works


def test_default_selection_of_flax_layers():
    """MultiHeadAttention's (heads, head_dim) bias is not projected even where the rank is below its
    sides; a Dense kernel is; DenseGeneral and convolution kernels stay full-rank (undeclared)."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    layers = {
        "attn": nnx.MultiHeadAttention(num_heads=8, in_features=256, qkv_features=256, decode=False, rngs=rngs),
        "dense": nnx.Linear(256, 128, rngs=rngs),
        "general": nnx.LinearGeneral(256, (4, 32), rngs=rngs),
        "conv": nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs),
    }
    params = {name: nnx.to_pure_dict(nnx.state(layer, nnx.Param)) for name, layer in layers.items()}
    assert params["attn"]["query"]["bias"].shape == (8, 32)
    state = fira_jax.scale_by_galore(rank=4).init(params)
    assert isinstance(state.right["attn"]["query"]["bias"], optax.MaskedNode)
    assert isinstance(state.left["attn"]["query"]["bias"], optax.MaskedNode)
    assert state.right["dense"]["kernel"].shape == (4, 128)
    for name in ("general", "conv"):
        assert isinstance(state.right[name]["kernel"], optax.MaskedNode)
    assert isinstance(state.right["attn"]["query"]["kernel"], optax.MaskedNode)


@pytest.mark.parametrize("numbers", ["MuonDimensionNumbers", "GaLoreDimensionNumbers"])
def test_optax_dimension_numbers_declare_matrices(numbers):
    """The trees optax's Muon and GaLore users write declare the matrices here too."""
    if not hasattr(optax.contrib, numbers):  # optax.contrib's GaLore is newer than this project's optax floor
        pytest.skip(f"optax {optax.__version__} has no optax.contrib.{numbers}")
    dims = getattr(optax.contrib, numbers)
    params = {"qkv": jnp.zeros((64, 4, 16)), "stack": jnp.zeros((3, 32, 48))}
    axes = {"qkv": dims(reduction_axis=0, output_axis=(1, 2)), "stack": dims(reduction_axis=1, output_axis=2)}
    state = fira_jax.scale_by_galore(rank=4, axes=axes).init(params)
    assert state.right["qkv"].shape == (4, 64)  # one 64 x 64 matrix
    assert state.left["stack"].shape == (3, 32, 4)  # three 32 x 48 matrices (std: the left side)
    clip = fira_jax.clip_by_norm_growth(axes=axes).init(params)
    assert clip.norms["qkv"].shape == () and clip.norms["stack"].shape == (3,)


def test_logical_axis_names_declare_the_stacked_matrices():
    """Partitioning metadata (logical axis names, as PartitionSpecs or tuples) declares the stacked
    kernels as stacks of matrices, plain 2-axis leaves as matrices, and leaves the norm stacks out."""
    from jax.sharding import PartitionSpec as P

    params = {"layers": {"mlp": jnp.zeros((3, 32, 48)), "norm": jnp.zeros((3, 32))}, "head": jnp.zeros((32, 40))}
    names = {"layers": {"mlp": P("layers", "embed", "mlp"), "norm": ("layers", "embed")}, "head": P("embed", "vocab")}
    axes = fira_jax.axes_from_logical(names)
    assert axes["layers"]["norm"] is None and axes["head"] == fira_jax.MatrixAxes(rows=0, cols=1)
    state = fira_jax.scale_by_galore(rank=4, axes=axes).init(params)
    assert state.left["layers"]["mlp"].shape == (3, 32, 4)  # each layer's 32 x 48 matrix
    assert state.left["head"].shape == (32, 4)
    assert isinstance(state.right["layers"]["norm"], optax.MaskedNode)
    assert isinstance(state.left["layers"]["norm"], optax.MaskedNode)
    clip = fira_jax.clip_by_norm_growth(axes=fira_jax.axes_from_logical({"w": P("embed", "layers", "mlp")}))
    assert clip.init({"w": jnp.zeros((4, 3, 5))}).norms["w"].shape == (3,)  # one norm per layer


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_sided_rayleigh_ritz_spans_the_svds_subspace(side):
    """``both=False`` (what a one-sided refresh runs: the eigenvectors of ``B B^T``) gives the basis
    side of ``both=True`` (the SVD of ``B``) up to signs, and no other side."""
    from fira_jax.projections import randomized_svd

    g = jnp.asarray(decaying((48, 30), 5))
    key = jax.random.key(3)
    u, vh = randomized_svd(g, 5, side, key, 8, 1)
    u1, vh1 = randomized_svd(g, 5, side, key, 8, 1, both=False)
    if side == "left":
        assert vh1 is None
        overlap = np.abs(np.asarray(u1).T @ np.asarray(u))
    else:
        assert u1 is None
        overlap = np.abs(np.asarray(vh1) @ np.asarray(vh).T)
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-4)  # the same vectors, in the same order
