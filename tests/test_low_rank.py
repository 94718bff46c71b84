"""fira_jax.low_rank: scale_by_fira and scale_by_galore as transformations (their numerics against
NumPy are in test_alias.py, through fira() and galore()).

Data flows as arrays: states and updates are pytrees whose metadata is static and hashable, so
any prefix of a chain can be jitted and its outputs used later.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fira_jax


def assert_static_metadata(tree, where):
    """Every node's auxiliary data is hashable and holds no array (JAX's contract for pytrees)."""

    def walk(treedef, path):
        data = treedef.node_data()
        if data is not None:
            aux = data[1]
            hash(tuple(aux) if isinstance(aux, list) else aux)  # raises for unhashable metadata (dict keys: a list)
            assert not any(isinstance(x, jax.Array | jax.core.Tracer) for x in jax.tree.leaves(aux)), (where, path)
        for i, child in enumerate(treedef.children()):
            walk(child, (*path, i))

    walk(jax.tree.structure(tree), ())


def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32), "b": jnp.zeros(5),
              "stack": jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)}  # fmt: skip
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    return params, grads


@pytest.mark.parametrize(
    "make",
    [
        lambda: fira_jax.scale_by_fira(2, refresh=fira_jax.Refresh(update_proj_gap=2)),
        lambda: fira_jax.scale_by_galore(2, refresh=fira_jax.Refresh(update_proj_gap=2), proj_type="full"),
        lambda: fira_jax.fira(1e-2, rank=2, update_proj_gap=2, weight_decay=0.1),
        lambda: fira_jax.galore(1e-2, rank=2, update_proj_gap=2),
    ],
    ids=["scale_by_fira", "scale_by_galore", "fira", "galore"],
)
def test_states_and_updates_are_arrays_with_static_metadata(make):
    params, grads = problem()
    tx = make()
    state = tx.init(params)
    assert_static_metadata(state, "state")
    updates, state = jax.jit(tx.update)(grads, state, params)  # a jitted prefix of any chain
    assert_static_metadata(state, "state after update")
    chex.assert_trees_all_equal_shapes(updates, params)
    # What a jitted call returns is usable afterwards, outside it (no leaked tracer).
    chex.assert_tree_all_finite(optax.apply_updates(params, updates))
    updates, _ = tx.update(grads, state, params)
    chex.assert_tree_all_finite(updates)


def test_inner_sees_the_low_rank_gradients_and_the_other_leaves(variant):
    """GaLore with scale 1 and RMSProp inside: U = back(rms(R)) for w, rms(b) for b (NumPy)."""
    params, grads = problem()
    inner = optax.scale_by_rms(decay=0.5)
    tx = fira_jax.scale_by_galore(
        2, 1.0, refresh=fira_jax.Refresh(update_proj_gap=5), base_optimizer=inner, axes=fira_jax.MatrixAxes()
    )  # "stack" is a declared stack
    state = tx.init(params)
    chex.assert_trees_all_equal_shapes(
        state.inner.nu, {"w": jnp.zeros((8, 2)), "b": jnp.zeros(5), "stack": jnp.zeros((2, 2, 6))}
    )
    u, state = variant(tx.update)(grads, state)
    g = np.asarray(grads["w"], np.float64)
    p = np.linalg.svd(g, full_matrices=False)[2][:2]  # 8 x 5: right side
    r = g @ p.T
    rms = lambda x: x / (np.sqrt(0.5 * x * x) + 1e-8)  # noqa: E731  (optax's first step, eps outside)
    np.testing.assert_allclose(np.asarray(u["w"]), rms(r) @ p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(u["b"]), rms(np.asarray(grads["b"])), rtol=1e-5)


def test_updates_keep_each_leafs_layout_and_dtype():
    params = {"w": jnp.zeros((6, 4), jnp.bfloat16), "qkv": jnp.zeros((8, 2, 5)), "b": jnp.zeros(3)}
    axes = {"w": None, "qkv": fira_jax.MatrixAxes(rows=0, cols=(1, 2)), "b": None}
    tx = fira_jax.scale_by_fira(2, refresh=fira_jax.Refresh(update_proj_gap=5), axes=axes)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) / 7, params)
    u, state = jax.jit(tx.update)(grads, tx.init(params))
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert state.left["qkv"].shape == (8, 2) and state.norms["qkv"].shape == ()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"proj_type": "full"}, ValueError, "GaLore-only"),
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"gamma": 0.9}, ValueError, "gamma"),
        ({"rank": 0}, ValueError, "rank"),
        ({"method": "qr"}, ValueError, "method"),
        ({"scale": -0.25}, ValueError, "`scale`"),
        ({"residual_scale": -1.0}, ValueError, "residual_scale"),
    ],
)
def test_bad_arguments_raise_at_build(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kwargs = {"rank": 2} | kwargs
        residual = {k: kwargs.pop(k) for k in ("granularity", "gamma", "residual_scale") if k in kwargs}
        refresh = {k: kwargs.pop(k) for k in ("method",) if k in kwargs}
        fira_jax.scale_by_fira(**kwargs, refresh=fira_jax.Refresh(**refresh), residual=fira_jax.Residual(**residual))


@pytest.mark.parametrize(
    "proj_type, elements",
    [("std", 40), ("reverse_std", 32), ("right", 40), ("left", 32), ("full", 32)],
)
def test_state_per_proj_type_is_docs_table(proj_type, elements):
    """docs/semantics.md's table: GaLore's moments and basis for one 8 x 4 matrix at rank 2
    (``std`` keeps the larger moments, so more state than ``reverse_std`` when m > n)."""
    tx = fira_jax.scale_by_galore(rank=2, proj_type=proj_type)
    state = tx.init({"w": jnp.zeros((8, 4))})
    matrices = [x for x in jax.tree.leaves(state) if hasattr(x, "ndim") and x.ndim >= 2]
    assert sum(x.size for x in matrices) == elements


def test_negative_galore_scale_raises_at_build():
    with pytest.raises(ValueError, match="`scale`"):
        fira_jax.galore(1e-2, rank=2, scale=-1.0)


def test_transposed_gradient_is_an_error_naming_the_leaf(variant):
    """A gradient of another shape than its parameter (here transposed) used to fail deep inside
    with "'MaskedNode' object has no attribute 'dtype'"; now the leaf and the shapes are named."""
    params = {"w": jnp.ones((6, 4)), "b": jnp.ones(4)}
    tx = fira_jax.scale_by_fira(rank=2, refresh=fira_jax.Refresh(update_proj_gap=5))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"leaf 'w' has shape \(4, 6\)"):
        variant(tx.update)({"w": jnp.ones((4, 6)), "b": jnp.ones(4)}, state)


CHUNK_MAKERS = {
    "fira": lambda ch: fira_jax.scale_by_fira(
        2, refresh=fira_jax.Refresh(update_proj_gap=2), axes=fira_jax.MatrixAxes(), chunk_bytes=ch
    ),
    "fira_s1": lambda ch: fira_jax.scale_by_fira(  # residual_scale 1: the norm's cancellation branch
        2,
        refresh=fira_jax.Refresh(update_proj_gap=2),
        residual=fira_jax.Residual(residual_scale=1.0),
        axes=fira_jax.MatrixAxes(),
        chunk_bytes=ch,
    ),
    "galore": lambda ch: fira_jax.scale_by_galore(
        2, refresh=fira_jax.Refresh(update_proj_gap=2), axes=fira_jax.MatrixAxes(), chunk_bytes=ch
    ),
    "apollo": lambda ch: fira_jax.scale_by_apollo(
        2, refresh=fira_jax.Refresh(update_proj_gap=2), axes=fira_jax.MatrixAxes(), chunk_bytes=ch
    ),
}


@pytest.mark.parametrize("name", sorted(CHUNK_MAKERS))
# per chunk: 4 fit, but 3 divides the stack of 6; chunks of 2 and 4 with the slow tests (README's command stays short)
@pytest.mark.parametrize("matrices", [1, *(pytest.param(k, marks=pytest.mark.slow) for k in (2, 4))])
def test_chunked_update_equals_the_whole_stack(variant, name, matrices):
    """A stack compensated a chunk at a time gives the updates and the limiter's norms of the whole
    stack at once, over steps with and without a refresh; a (2, 3) stack, left and right sides."""
    rng = np.random.default_rng(1)
    params = {"tall": jnp.ones((2, 3, 8, 5)), "wide": jnp.ones((2, 3, 5, 8)), "b": jnp.zeros(3)}
    one = 8 * 5 * 4  # bytes of one float32 matrix
    whole, chunked = CHUNK_MAKERS[name](float("inf")), CHUNK_MAKERS[name](matrices * one)
    s_whole, s_chunked = whole.init(params), chunked.init(params)
    for step in range(4):
        grads = {k: jnp.asarray(rng.standard_normal(x.shape) * (1 + step), jnp.float32) for k, x in params.items()}
        u_whole, s_whole = jax.jit(whole.update)(grads, s_whole, params)
        u_chunked, s_chunked = variant(chunked.update)(grads, s_chunked, params)
        chex.assert_trees_all_close(u_chunked, u_whole, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(s_chunked, s_whole, rtol=1e-5, atol=1e-6)


def test_chunk_size_fits_the_budget_and_divides_the_stack():
    lay = fira_jax.Layout("w", (24, 8, 5), (0, 1, 2), 1, (24,), 8, 5, 2, "right")
    one = 8 * 5 * 4
    from fira_jax._src.subspace import chunk_size

    assert [chunk_size(lay, 4, b) for b in (one, 4 * one, 5 * one, 24 * one, float("inf"))] == [1, 4, 4, 24, 24]
    assert chunk_size(lay, 4, one // 2) == 1  # at least one matrix
    assert chunk_size(lay, 4, None) == 24  # the default budget (128 MiB) holds this stack


@pytest.mark.parametrize("name", ["fira", "apollo"])
def test_chunked_update_holds_one_chunks_temporaries(name):
    """The compiled update of a stack of 8 matrices (its gradient donated, as in a train step): a
    chunk at a time it holds at most 0.6 x the temporaries of the whole stack at once (measured:
    Fira 4.2 against 9.0 matrices, APOLLO 3.3 against 9.0; the SVD's workspace is part of both)."""
    params = {"w": jnp.ones((8, 256, 512)), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(0), a.shape), params)
    temps = {}
    for ch in (float("inf"), 256 * 512 * 4):
        tx = CHUNK_MAKERS[name](ch)
        compiled = jax.jit(tx.update, donate_argnums=(0,)).lower(grads, tx.init(params), params).compile()
        temps[ch] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[256 * 512 * 4] <= 0.6 * temps[float("inf")], temps


def test_chunk_bytes_is_checked_at_build():
    with pytest.raises(ValueError, match="chunk_bytes"):
        fira_jax.scale_by_fira(2, chunk_bytes=0)
    with pytest.raises(TypeError, match="chunk_bytes"):
        fira_jax.scale_by_galore(2, chunk_bytes=1.5)
