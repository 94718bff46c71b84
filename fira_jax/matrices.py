"""Which leaves of a parameter tree are projected, and as which matrices.

:func:`selection` is what ``init`` of every transformation runs (and logs through
:func:`describe`): each leaf's :class:`fira_jax.Layout` or why it stays full-rank;
:func:`structure` finds stacks of layers without a declaration; :func:`as_matrix_axes` reads
optax.contrib's Muon / GaLore dimension numbers; :func:`layout` and :func:`layouts` build the
layouts of one leaf or a tree; :func:`path_str` is the path string that masks and logs use.
"""

from fira_jax._src.layout import as_matrix_axes, describe, layout, layouts, selection, structure
from fira_jax._src.masks import path_str

__all__ = ["as_matrix_axes", "describe", "layout", "layouts", "path_str", "selection", "structure"]
