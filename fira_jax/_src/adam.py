"""Adam with the reference implementations' conventions: the optimizer in the subspace (step 2).

:func:`scale_by_torch_adam` is Adam as ``transformers.AdamW``, copied into ``fira`` and
``galore-torch``, computes it: ``eps`` is added to the uncorrected ``sqrt(v)``, and the bias
correction (:func:`adam_bias_correction`) multiplies the whole step. :func:`fira_jax.fira` runs
it on the low-rank gradients and applies the correction after the residual, as the reference does.
"""

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fira_jax._src import masks
from fira_jax._src.options import B1, B2, EPS
from fira_jax._src.validation import check_float, is_traced


def moment_dtype(param_dtype: Any, dtype: Any = None) -> jnp.dtype:
    """A moment's dtype: ``dtype`` if given, else float32 for floats narrower than float32, else
    ``param_dtype``."""
    if dtype is not None:
        return jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype)
    if jnp.issubdtype(param_dtype, jnp.floating) and param_dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return param_dtype


def moment_zeros(p: Any, dtype: Any = None) -> jax.Array:
    """Zeros shaped (and, under explicit sharding, placed) like ``p``, in :func:`moment_dtype`."""
    return jnp.zeros_like(p, dtype=moment_dtype(jnp.result_type(p), dtype))


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_torch_adam`: step count and the two moments."""

    count: jax.Array
    mu: Any
    nu: Any


def adam_bias_correction(b1: float, b2: float) -> optax.Schedule:
    r"""The reference's bias correction as a schedule of the step count.

    .. math::
      c_t = \frac{\sqrt{1 - b_2^{t+1}}}{1 - b_1^{t+1}}, \quad t = 0, 1, \dots

    The reference multiplies the whole update by ``c_t`` (its ``step_size``);
    in :func:`fira_jax.fira` this is ``optax.scale_by_schedule`` of this
    schedule, placed after :func:`fira_jax.scale_by_fira` so that the Fira
    limiter measures uncorrected norms, as in the reference.

    Args:
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.

    Returns:
      A schedule ``count -> c_count``.

    Example:
      >>> import fira_jax
      >>> c = fira_jax.adam_bias_correction(0.9, 0.999)
      >>> round(float(c(0)), 4)  # sqrt(1 - 0.999) / (1 - 0.9)
      0.3162
    """

    def log(b: Any) -> Any:
        # 1 - b**t is computed as -expm1(t log b), with log b in double precision
        # when b is a Python number: float32 1 - 0.999 is off by 1.3e-5.
        if is_traced(b) or isinstance(b, jax.Array):
            return jnp.log(b)
        return math.log(b) if b > 0 else -math.inf

    log_b1, log_b2 = log(b1), log(b2)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32) + 1.0
        return jnp.sqrt(-jnp.expm1(t * log_b2)) / -jnp.expm1(t * log_b1)

    return schedule


def scale_by_torch_adam(
    b1: float = B1,
    b2: float = B2,
    eps: float = EPS,
    *,
    bias_correction: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam as PyTorch's ``AdamW`` computes it: the reference implementations' epsilon convention.

    (Formerly named ``scale_by_adam``, which shadowed :func:`optax.scale_by_adam`, whose ``eps``
    sits elsewhere; that name is kept, deprecated, for one release.)

    .. math::
      m_t = b_1 m_{t-1} + (1 - b_1) g_t, \qquad
      v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \qquad
      N_t = \frac{m_t}{\sqrt{v_t} + \epsilon}

    and, with ``bias_correction=True``, ``N_t`` is multiplied by
    :func:`adam_bias_correction` ``c_t``. ``eps`` is added to the uncorrected
    ``sqrt(v_t)``, as in PyTorch's and ``transformers``' AdamW; this differs
    from :func:`optax.scale_by_adam` (which adds ``eps`` to the corrected
    ``sqrt(v_hat)``), noticeably so for small gradients.

    Without bias correction (the default) this is the low-rank Adam of Fira's
    Algorithm 1, whose output ``N`` feeds the norm-based scaling; the
    correction is then applied to the whole update, as
    :func:`fira_jax.fira` does.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to ``sqrt(v)``, ≥ 0.
      bias_correction: multiply the output by ``c_t``.
      mu_dtype: dtype of the first moment; default float32 for parameters narrower than float32
        (bfloat16, float16), else the parameter's dtype.
      nu_dtype: dtype of the second moment, with the same default. In bfloat16, ``b2 = 0.999``
        rounds to 1: ``nu`` would never decay. Pass the parameter's dtype to opt out.

    Integer and boolean leaves are not trained: they keep no moments and get a
    zero update.

    Returns:
      An ``optax.GradientTransformation`` with :class:`ScaleByAdamState`.

    Example:
      >>> import jax.numpy as jnp, fira_jax
      >>> tx = fira_jax.scale_by_torch_adam(eps=0.0)
      >>> out, _ = tx.update({"w": jnp.array([2.0, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> out["w"]  # m / sqrt(v) = 0.1 g / sqrt(0.001 g^2)
      Array([ 3.16..., -3.16...], dtype=float32)

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    check_float("b1", b1, low=0.0, high=1.0)
    check_float("b2", b2, low=0.0, high=1.0)
    check_float("eps", eps, low=0.0, high=float("inf"), high_open=False)
    correction = adam_bias_correction(b1, b2)

    def init_fn(params: Any) -> ScaleByAdamState:
        # Integer and boolean leaves are not trained: no moments, and a zero update.
        mu = jax.tree.map(lambda p: moment_zeros(p, mu_dtype) if masks.is_float(p) else optax.MaskedNode(), params)
        nu = jax.tree.map(lambda p: moment_zeros(p, nu_dtype) if masks.is_float(p) else optax.MaskedNode(), params)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, ScaleByAdamState]:
        del params
        c = correction(state.count) if bias_correction else 1.0
        leaves, treedef = jax.tree.flatten(updates)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        out, new_mu, new_nu = [], [], []
        for g, m, v in zip(leaves, mus, nus, strict=True):
            if not masks.is_float(g) or not hasattr(m, "dtype"):
                out.append(jnp.zeros_like(g))
                new_mu.append(m)
                new_nu.append(v)
                continue
            gm, gv = g.astype(jnp.promote_types(g.dtype, m.dtype)), g.astype(jnp.promote_types(g.dtype, v.dtype))
            m = (b1 * m + (1 - b1) * gm).astype(m.dtype)
            v = (b2 * v + (1 - b2) * gv * gv).astype(v.dtype)
            out.append((c * m / (jnp.sqrt(v) + eps)).astype(g.dtype))
            new_mu.append(m)
            new_nu.append(v)
        new_state = ScaleByAdamState(
            count=optax.safe_int32_increment(state.count), mu=treedef.unflatten(new_mu), nu=treedef.unflatten(new_nu)
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adam(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
    """Deprecated name of :func:`scale_by_torch_adam` (kept for one release): it shadowed
    :func:`optax.scale_by_adam`, which places ``eps`` differently."""
    warnings.warn(
        "fira_jax.scale_by_adam is deprecated: use fira_jax.scale_by_torch_adam (PyTorch's eps placement), "
        "or optax.scale_by_adam (optax's)",
        DeprecationWarning,
        stacklevel=2,
    )
    return scale_by_torch_adam(*args, **kwargs)
