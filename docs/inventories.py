"""Intersphinx inventories of the outside names the API pages link to, written at build time.

The docs build downloads nothing, so Sphinx cannot fetch the published ``objects.inv`` of Python,
NumPy, JAX and optax. This module writes a small inventory for each from the table below (the
names our docstrings and type hints use, with their pages on the projects' sites), and
``conf.py`` points ``intersphinx_mapping`` at them. With ``nitpicky = True``, a new outside name
that is missing here fails the build, naming it.
"""

import pathlib
import zlib

# project: (base URL, [(name, role, page#anchor), ...]); "$" in a page is replaced by the name.
# Private paths (optax._src.base...) are where autodoc finds the classes; they link to the public name.
TABLE = {
    "python": ("https://docs.python.org/3/", [
        ("collections.abc.Callable", "py:class", "library/collections.abc.html#$"),
    ]),
    "numpy": ("https://numpy.org/doc/stable/", [
        ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html"),
        ("numpy.number", "py:class", "reference/arrays.scalars.html#$"),
        ("numpy.bool", "py:class", "reference/arrays.scalars.html#$"),
    ]),
    "jax": ("https://docs.jax.dev/en/latest/", [
        ("jax.Array", "py:class", "_autosummary/jax.Array.html"),
        ("jax.jaxlib._jax.Array", "py:class", "_autosummary/jax.Array.html"),
    ]),
    "optax": ("https://optax.readthedocs.io/en/latest/", [
        ("optax.GradientTransformation", "py:class", "api/transformations.html#$"),
        ("optax.GradientTransformationExtraArgs", "py:class", "api/transformations.html#$"),
        ("optax._src.base.GradientTransformation", "py:class",
         "api/transformations.html#optax.GradientTransformation"),
        ("optax._src.base.GradientTransformationExtraArgs", "py:class",
         "api/transformations.html#optax.GradientTransformationExtraArgs"),
        ("optax.ScalarOrSchedule", "py:class", "api/optimizer_schedules.html"),
        ("optax.adamw", "py:function", "api/optimizers.html#$"),
        ("optax.masked", "py:function", "api/transformations.html#$"),
        ("optax.scale_by_adam", "py:function", "api/transformations.html#$"),
        ("optax.scale_by_lion", "py:function", "api/transformations.html#$"),
        ("optax.scale_by_factored_rms", "py:function", "api/transformations.html#$"),
        ("optax.add_decayed_weights", "py:function", "api/transformations.html#$"),
        ("optax.clip_by_global_norm", "py:function", "api/transformations.html#$"),
    ]),
}  # fmt: skip


def write(folder: pathlib.Path) -> dict[str, tuple[str, str]]:
    """Writes ``folder/<project>.inv`` for each project; returns Sphinx's ``intersphinx_mapping``."""
    folder.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (base, entries) in TABLE.items():
        header = f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
        header += "# The remainder of this file is compressed using zlib.\n"
        lines = "".join(f"{name} {role} 1 {page.replace('$', name)} -\n" for name, role, page in entries)
        path = folder / f"{project}.inv"
        path.write_bytes(header.encode() + zlib.compress(lines.encode()))
        mapping[project] = (base, str(path))
    return mapping
