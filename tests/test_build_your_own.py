"""docs/build_your_own.md: its FRUGAL, against a NumPy transcription of FRUGAL's update; and the
public seam rebuilds GaLore, Fira and APOLLO update for update, bit for bit."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fira_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def page_namespace() -> dict:
    """The page's first python block, run: it defines frugal_update and frugal."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "build_your_own.md").read_text(), flags=re.S)[0]
    namespace: dict = {"__name__": "build_your_own"}
    exec(compile(code, "docs/build_your_own.md", "exec"), namespace)
    return namespace


def test_the_page_writes_frugal_in_at_most_25_lines():
    """The whole block (imports, the new member, one step), counted without blank lines, is what the
    page's heading says, and at most 25."""
    page = (ROOT / "docs" / "build_your_own.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, flags=re.S)[0]
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    said = int(re.search(r"## FRUGAL in (\d+) lines", page).group(1))
    assert len(lines) == said <= 25, (len(lines), said)


def numpy_frugal(grads, lr, rank, free_scale, b1=0.9, b2=0.999, eps=1e-6):
    """FRUGAL, transcribed: right side (m >= n), P = top-r right singular vectors of the first G
    (kept: 3 steps < the gap of 200, canonical signs: largest entry of each vector positive),
    torch-style Adam without bias correction on R = G P^T, U = -lr (N P + free sign(G - G P^T P))."""
    g0 = grads[0].astype(np.float64)
    vh = np.linalg.svd(g0, full_matrices=False)[2][:rank]
    vh = vh * np.sign(vh[np.arange(rank), np.abs(vh).argmax(axis=1)])[:, None]
    m = v = np.zeros((g0.shape[0], rank))
    outs = []
    for g in grads:
        g = g.astype(np.float64)
        r = g @ vh.T
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        n = m / (np.sqrt(v) + eps)
        outs.append(-lr * (n @ vh + free_scale * np.sign(g - r @ vh)))
    return outs


@pytest.mark.parametrize("jit", [False, True])
def test_frugal_from_the_page_matches_numpy(jit):
    frugal = page_namespace()["frugal"]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)]
    tx = frugal(1e-3, rank=3, free_scale=0.1)
    params = {"w": jnp.zeros((16, 8))}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g, expected in zip(grads, numpy_frugal(grads, 1e-3, 3, 0.1), strict=True):
        u, state = update({"w": jnp.asarray(g)}, state, params)
        np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=1e-4, atol=1e-7)


REFRESH = fira_jax.Refresh(update_proj_gap=2)
SEAM = {  # each family member, and the same member spelled with the public seam
    "galore": (
        lambda: fira_jax.scale_by_galore(2, 0.25, refresh=REFRESH),
        lambda: fira_jax.scale_by_subspace(fira_jax.galore_update(0.25), 2, refresh=REFRESH),
    ),
    "fira": (
        lambda: fira_jax.scale_by_fira(2, 0.25, refresh=REFRESH),
        lambda: fira_jax.scale_by_subspace(fira_jax.fira_residual(0.25), 2, refresh=REFRESH, gamma=1.01),
    ),
    "apollo": (
        lambda: fira_jax.scale_by_apollo(2, 1.0, refresh=REFRESH),
        lambda: fira_jax.scale_by_subspace(
            fira_jax.apollo_scaling(1.0, "column"),
            2,
            refresh=fira_jax.Refresh(update_proj_gap=2, method="random"),
            gamma=1.01,
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(SEAM))
def test_the_seam_rebuilds_each_member_bit_for_bit(name):
    named, seam = (make() for make in SEAM[name])
    rng = np.random.default_rng(1)
    shapes = {"w": (8, 5), "v": (4, 9), "b": (5,)}
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    states = [tx.init(params) for tx in (named, seam)]
    for _ in range(5):  # refreshes at 0, 2 and 4
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        (u1, states[0]), (u2, states[1]) = (
            jax.jit(tx.update)(g, s, params) for tx, s in zip((named, seam), states, strict=True)
        )
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), u1, u2))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), *states))
