"""Hyperparameter checks shared by the transforms (skipped for traced values)."""

from typing import Any

import jax
import numpy as np


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_int(name: str, value: Any, minimum: int, *, static: bool = False) -> None:
    """Raises unless ``value`` is an int >= ``minimum`` (a concrete integer array is accepted unless ``static``)."""
    if is_traced(value):
        if static:
            raise TypeError(
                f"`{name}` must be a Python int, got a traced value. With "
                f"optax.inject_hyperparams, pass static_args=('{name}', ...)."
            )
        return
    integer_array = isinstance(value, jax.Array | np.ndarray | np.integer) and np.issubdtype(value.dtype, np.integer)
    if integer_array and not static and np.ndim(value) == 0:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " With optax.inject_hyperparams, list it in static_args." if static else ""
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.{hint}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_float(name: str, value: Any, *, low: float, high: float | None = None, high_open: bool = True) -> None:
    """Raises unless ``low <= value`` and ``value < high`` (``<=`` when not ``high_open``)."""
    if is_traced(value) or callable(value):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.") from None
    bad = not v >= low  # also catches NaN
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        interval = f"[{low}, {high})" if high is not None and high_open else f"[{low}, {high}]"
        where = interval if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be in {where}, got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
