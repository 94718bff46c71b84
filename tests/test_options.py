"""fira_jax.options: the shared options objects (Refresh, Residual) are validated when made,
immutable, hashable, shared by the family, and equivalent to the optimizers' flat keywords."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fira_jax


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: fira_jax.Refresh(update_proj_gap=0), ValueError, "update_proj_gap"),
        (lambda: fira_jax.Refresh(update_proj_gap=2.5), TypeError, "update_proj_gap"),
        (lambda: fira_jax.Refresh(method="qr"), ValueError, "method"),
        (lambda: fira_jax.Refresh(oversample=-1), ValueError, "oversample"),
        (lambda: fira_jax.Refresh(power_iters=-1), ValueError, "power_iters"),
        (lambda: fira_jax.Residual(granularity="row"), ValueError, "granularity"),
        (lambda: fira_jax.Residual(gamma=0.5), ValueError, "gamma"),
        (lambda: fira_jax.Residual(residual_scale=-1.0), ValueError, "residual_scale"),
        (lambda: fira_jax.Refresh(200), TypeError, "positional"),
        (lambda: fira_jax.scale_by_fira(2, 0.25, refresh={"update_proj_gap": 5}), TypeError, "fira_jax.Refresh"),
        (lambda: fira_jax.scale_by_fira(2, 0.25, residual={"gamma": 1.5}), TypeError, "fira_jax.Residual"),
    ],
)
def test_bad_options_raise_when_made(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_options_are_frozen_hashable_and_replaceable():
    refresh = fira_jax.Refresh(update_proj_gap=50, method="subspace")
    with pytest.raises(dataclasses.FrozenInstanceError):
        refresh.svd = "exact"  # type: ignore[misc]
    assert hash(refresh) == hash(fira_jax.Refresh(update_proj_gap=50, method="subspace"))
    assert dataclasses.replace(refresh, method="gram").method == "gram" and refresh.iterations == 1
    assert fira_jax.Refresh(method="randomized").iterations == 2
    assert fira_jax.Refresh(method="randomized", power_iters=0).iterations == 0


def test_flat_keywords_build_the_same_objects():
    """fira(..., update_proj_gap=, refresh_method=, gamma=, ...) equals the chain with scale_by_fira given the
    objects: the flat keywords generate nothing of their own."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)} for _ in range(4)]
    flat = fira_jax.fira(1e-2, rank=2, update_proj_gap=2, refresh_method="subspace", gamma=1.5, granularity="matrix")
    refresh = fira_jax.Refresh(update_proj_gap=2, method="subspace")
    residual = fira_jax.Residual(gamma=1.5, granularity="matrix")
    import optax

    objects = optax.chain(
        fira_jax.scale_by_fira(
            2, 0.25, refresh=refresh, residual=residual, base_optimizer=fira_jax.scale_by_torch_adam()
        ),
        optax.scale_by_schedule(fira_jax.adam_bias_correction(0.9, 0.999)),
        optax.scale_by_learning_rate(1e-2),
    )
    outs = []
    for tx in (flat, objects):
        state, us = tx.init(params), []
        for g in grads:
            u, state = jax.jit(tx.update)(g, state, params)
            us.append(u["w"])
        outs.append(us)
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_refresh_serves_the_family():
    refresh = fira_jax.Refresh(update_proj_gap=3, seed=1)
    params = {"w": jnp.ones((12, 8))}
    for make in (fira_jax.scale_by_galore, fira_jax.scale_by_fira, fira_jax.scale_by_apollo):
        state = make(2, refresh=refresh).init(params)
        assert state.right["w"].shape == (2, 8)


def test_deprecated_names_still_work_and_warn():
    """One meaning per name: the old names (kept for one release) warn and build the same objects."""
    with pytest.warns(DeprecationWarning, match="method"):
        old = fira_jax.Refresh(svd="gram")
    assert old == fira_jax.Refresh(method="gram")
    with pytest.warns(DeprecationWarning, match="method"):
        assert old.svd == "gram"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        fira_jax.Refresh(svd="gram", method="subspace")
    with pytest.warns(DeprecationWarning, match="refresh_method"):
        flat = fira_jax.fira(1e-2, rank=2, svd="gram")
    params = {"w": jnp.ones((6, 4))}
    new = fira_jax.fira(1e-2, rank=2, refresh_method="gram")
    jax.tree.map(np.testing.assert_array_equal, flat.init(params), new.init(params))
    with pytest.warns(DeprecationWarning, match="scale_by_torch_adam"):
        adam = fira_jax.scale_by_adam(eps=0.0)
    g = {"w": jnp.array([2.0, -3.0])}
    out, _ = adam.update(g, adam.init(g))
    want, _ = fira_jax.scale_by_torch_adam(eps=0.0).update(g, adam.init(g))
    np.testing.assert_array_equal(out["w"], want["w"])


SHARED_OPTIONS = {"rank", "scale", "b1", "b2", "eps", "gamma", "update_proj_gap", "weight_decay", "proj_type",
                  "granularity", "seed", "scale_type", "proj", "moments", "canonical_signs", "stagger",
                  "refresh_method", "refresh_by_shape", "residual_scale"}  # fmt: skip


def test_each_default_is_written_once():
    """No public function under fira_jax/_src writes a shared option's default as a literal: each
    takes it from fira_jax/_src/options.py (a constant, or Refresh's / Residual's field)."""
    import ast
    import pathlib

    literal = []
    for path in sorted((pathlib.Path(fira_jax.__file__).parent / "_src").glob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            args = node.args.posonlyargs + node.args.args
            pairs = list(zip(args[len(args) - len(node.args.defaults) :], node.args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if arg.arg in SHARED_OPTIONS and isinstance(default, ast.Constant) and default.value is not None:
                    literal.append(f"{path.name}:{node.lineno} {node.name}({arg.arg}={default.value!r})")
    assert not literal, literal
