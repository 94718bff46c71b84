"""How exact ``fira_jax.residual_norm`` is, against float64, where its shortcut would cancel.

G = a rank-32 512 x 256 matrix (entries of variance 1) plus Gaussian noise of standard deviation
``noise``, in float32; P its exact top-32 right singular vectors (float64, stored in float32);
phi a positive factor per row. Prints ``||S||`` of ``phi ⊙ (G - s G P^T P)`` in float64 and the
relative error of the jitted float32 ``residual_norm``, for s in {0.25, 0.9, 1.0}.

  python benchmarks/residual_norm_accuracy.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import fira_jax
from fira_jax.projections import Basis

M, N, R = 512, 256, 32


def main() -> list[dict]:
    rng = np.random.default_rng(0)
    layout = fira_jax.Layout("w", (M, N), (0, 1), 1, (), M, N, R, "right")
    phi = rng.uniform(0.5, 2.0, (M, 1)).astype(np.float32)
    norm = jax.jit(fira_jax.residual_norm)
    rows = []
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    print("| noise | s | ||S|| (float64) | ||S|| / ||phi G|| | relative error |")
    print("|---|---|---|---|---|")
    for noise in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 0.0):
        signal = rng.standard_normal((M, R)) @ rng.standard_normal((R, N)) / np.sqrt(R)
        g = (signal + noise * rng.standard_normal((M, N))).astype(np.float32)
        vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)[2][:R].astype(np.float32)
        basis = Basis(None, jnp.asarray(vh), layout)
        low = basis.project(jnp.asarray(g))
        g64, p64, phi64 = g.astype(np.float64), vh.astype(np.float64), phi.astype(np.float64)
        for s in (0.25, 0.9, 1.0):
            true = float(np.linalg.norm(phi64 * (g64 - s * (g64 @ p64.T) @ p64)))
            got = float(norm(jnp.asarray(g), low, basis, jnp.asarray(phi), s))
            share = true / float(np.linalg.norm(phi64 * g64))
            rows.append({"noise": noise, "s": s, "true": true, "share": share, "error": abs(got - true) / true})
            print(f"| {noise:g} | {s} | {true:.4g} | {share:.1e} | {rows[-1]['error']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
