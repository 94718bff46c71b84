"""Sphinx configuration: the API pages come from the docstrings (autodoc, Google-style sections via
napoleon), the guides are MyST Markdown. Built with warnings as errors in CI:

  sphinx-build -W -b html docs docs/_build/html
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

import inventories  # noqa: E402  (docs/inventories.py)

import fira_jax  # noqa: E402

project = "fira_jax"
author = "The fira_jax authors"
copyright = "2026, The fira_jax authors"
release = version = fira_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax copied into _static: the maths renders offline
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Every cross-reference must resolve: ours to the API page, outside names (Python, NumPy, JAX,
# optax) through small inventories written at build time (docs/inventories.py; nothing is downloaded).
nitpicky = True
intersphinx_mapping = inventories.write(ROOT / "docs" / "_build" / "inventories")
# optax's learning-rate type by its name, not as the union it stands for.
autodoc_type_aliases = {"optax.ScalarOrSchedule": "optax.ScalarOrSchedule"}

# sphinx-book-theme: the theme of optax's and flax's own documentation, so the pages look like the
# libraries our users already read.
html_theme = "sphinx_book_theme"
html_title = f"fira_jax {release}"
html_theme_options = {"show_toc_level": 2}
