"""The module paths before fira_jax._src (``fira_jax.low_rank``, ``fira_jax.layout``, ...), kept for one release."""

import importlib
import sys
import types
import warnings
from typing import Any

OLD_MODULES = {  # old public module -> where its code lives now
    "adam": "adam",
    "alias": "alias",
    "basis": "basis",
    "layout": "layout",
    "limiter": "limiter",
    "low_rank": "subspace",
    "masks": "masks",
    "moments": "moments",
    "options": "options",
    "projection": "projection",
    "residual": "residual",
    "weight_decay": "weight_decay",
}
MOVED = {"low_rank": ("family", ("scale_by_galore", "scale_by_fira", "scale_by_apollo", "ScaleType", "Projection"))}


class _OldModule(types.ModuleType):
    """``fira_jax.<old>``: each attribute read warns and returns the private one."""

    def __init__(self, package: str, old: str) -> None:
        super().__init__(f"{package}.{old}")
        self._package, self._old = package, old

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        where = OLD_MODULES[self._old]
        moved, names = MOVED.get(self._old, ("", ()))
        if name in names:
            where = moved
        target = importlib.import_module(f"{self._package}._src.{where}")
        value = getattr(target, name)  # AttributeError for a name the module never had
        homes = [self._package, f"{self._package}.projections", f"{self._package}.matrices"]
        now = next((f"{h}.{name}" for h in homes if name in importlib.import_module(h).__all__), None)
        warnings.warn(
            f"{self.__name__} is deprecated (fira_jax's modules are private now): "
            + (f"use {now}" if now else f"{name} is no longer public"),
            DeprecationWarning,
            stacklevel=2,
        )
        return value


def alias_old_modules(package: str) -> None:
    """Registers ``package.<old>`` for each old module path, so that ``from fira_jax.low_rank import x``
    still imports (with a DeprecationWarning); ``fira_jax.residual`` stays the function it always was."""
    for old in OLD_MODULES:
        sys.modules.setdefault(f"{package}.{old}", _OldModule(package, old))
