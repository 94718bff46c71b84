"""benchmarks/hlo_bytes.py: the bytes a compiled step moves, its refresh branches apart."""

import doctest
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import fira_jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_bytes


def compiled_text(f, *args) -> str:
    return jax.jit(f).lower(*args).compile().as_text()


def test_docstring_example_runs():
    assert doctest.testmod(hlo_bytes).failed == 0


def test_type_bytes():
    assert hlo_bytes.type_bytes("f32[512,1376]{1,0}") == 4 * 512 * 1376
    assert hlo_bytes.type_bytes("(bf16[3,4]{1,0}, s32[], pred[2])") == 2 * 12 + 4 + 2
    assert hlo_bytes.type_bytes("f32[]") == 4


def test_a_conditional_counts_apart_and_a_loop_counts_per_trip():
    x = jnp.ones(1000)

    def branchy(x, flag):
        y = 2 * x + 1  # the plain part: one fusion, or none if fused with the sum below
        z = jax.lax.cond(flag, lambda v: jnp.sort(v), lambda v: v, y)
        return z + y

    got = hlo_bytes.plain_step_bytes(compiled_text(branchy, x, True))
    assert got.branches >= 2 * 4000  # the sort reads and writes the vector
    assert got.plain > 0 and not got.loops
    # a loop of known trip count: its body once per trip (squaring 1000 floats: at least 8 kB a trip)
    looped = hlo_bytes.plain_step_bytes(compiled_text(lambda v: jax.lax.fori_loop(0, 3, lambda i, a: a * a, v), x))
    once = hlo_bytes.plain_step_bytes(compiled_text(lambda v: jax.lax.fori_loop(0, 1, lambda i, a: a * a, v), x))
    assert not looped.loops and looped.plain >= 3 * 8000 and looped.plain > once.plain
    # a loop whose trip count depends on the data: flagged, not counted
    data = hlo_bytes.plain_step_bytes(
        compiled_text(lambda v: jax.lax.while_loop(lambda a: a.sum() < 1e6, lambda a: a * 2, v), x)
    )
    assert data.loops


def test_the_plain_step_does_not_depend_on_the_refresh_method():
    """Fira's refresh sits in the conditional's branches: the exact SVD and the Gram refresh give
    steps that move the same bytes outside them, and AdamW has no branch."""
    params = {"w": jnp.zeros((64, 96))}
    grads = {"w": jax.random.normal(jax.random.key(0), (64, 96))}
    moved = {}
    for method in ("exact", "gram"):
        tx = fira_jax.fira(1e-3, rank=8, refresh_method=method)
        moved[method] = hlo_bytes.plain_step_bytes(compiled_text(tx.update, grads, tx.init(params), params))
    assert moved["exact"].plain == moved["gram"].plain > 3 * 4 * 64 * 96  # G read twice, the update written
    assert moved["exact"].branches > 0 and moved["gram"].branches > 0
    adamw = optax.adamw(1e-3)
    plain = hlo_bytes.plain_step_bytes(compiled_text(adamw.update, grads, adamw.init(params), params))
    assert plain.branches == 0 and plain.plain >= 7 * 4 * 64 * 96  # reads G, W, m, v; writes m, v, the update
