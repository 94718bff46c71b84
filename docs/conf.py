"""Sphinx configuration: the API pages come from the docstrings (autodoc, Google-style sections via
napoleon), the guides are MyST Markdown. Built with warnings as errors in CI:

  sphinx-build -W -b html docs docs/_build/html
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fira_jax  # noqa: E402

project = "fira_jax"
author = "The fira_jax authors"
copyright = "2026, The fira_jax authors"
release = version = fira_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
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
# Types the docstrings name but whose packages publish no inventory here (nothing is downloaded).
nitpicky = False

# sphinx-book-theme: the theme of optax's and flax's own documentation, so the pages look like the
# libraries our users already read.
html_theme = "sphinx_book_theme"
html_title = f"fira_jax {release}"
html_theme_options = {"show_toc_level": 2}
