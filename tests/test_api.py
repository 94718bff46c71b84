"""The public surface: fira_jax's names and its two namespaces' are exactly what docs/api.md
documents; everything else is under fira_jax._src; the 0.1 module paths still import, and warn."""

import importlib
import pathlib
import re
import warnings

import pytest

import fira_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMESPACES = ("fira_jax.projections", "fira_jax.matrices")
DEPRECATED = {"fira_jax.scale_by_adam"}  # documented in prose on the page, not with autodoc


def public() -> set[str]:
    names = {f"fira_jax.{n}" for n in fira_jax.__all__} - {"fira_jax.matrices", "fira_jax.projections"}
    for space in NAMESPACES:
        names |= {f"{space}.{n}" for n in importlib.import_module(space).__all__}
    return names - DEPRECATED - {"fira_jax.projections.Basis"}  # the same class as fira_jax.Basis


def test_api_page_documents_exactly_the_public_names():
    page = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|data):: (\S+)$", page, flags=re.M))
    assert documented == public(), (sorted(public() - documented), sorted(documented - public()))


def test_the_package_holds_only_the_public_modules_and_src():
    files = {p.name for p in (ROOT / "fira_jax").iterdir() if p.name != "__pycache__"}
    assert files == {"__init__.py", "_src", "matrices.py", "projections.py", "py.typed"}, files


@pytest.mark.parametrize("name", sorted(public()))
def test_every_public_name_resolves(name):
    module, _, attr = name.rpartition(".")
    assert getattr(importlib.import_module(module), attr) is not None


@pytest.mark.parametrize(
    ("statement", "names"),
    [
        ("from fira_jax.low_rank import matrix_keys, scale_by_fira", "fira_jax.projections.matrix_keys"),
        ("from fira_jax.layout import selection", "fira_jax.matrices.selection"),
        ("from fira_jax.basis import Basis", "fira_jax.Basis"),
    ],
)
def test_old_module_paths_import_with_a_deprecation_warning(statement, names):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(statement, {})
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(names in m for m in messages), messages


def test_the_residual_function_stays_the_function():
    assert callable(fira_jax.residual) and fira_jax.residual.__name__ == "residual"
