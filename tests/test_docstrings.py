"""Every docstring example in fira_jax runs (doctest, with ELLIPSIS and NORMALIZE_WHITESPACE)."""

import doctest
import importlib
import pkgutil

import pytest

from fira_jax import _src

# The code under fira_jax._src, and the public modules (whose objects it defines).
PUBLIC = ["fira_jax", "fira_jax.matrices", "fira_jax.projections"]
MODULES = [*sorted(m.name for m in pkgutil.iter_modules(_src.__path__, "fira_jax._src.")), *PUBLIC]


def test_there_are_examples():
    count = sum(
        len(t.examples) for name in MODULES for t in doctest.DocTestFinder().find(importlib.import_module(name))
    )
    assert count >= 10, count


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
