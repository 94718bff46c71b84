"""How each selected matrix's basis is computed at a refresh, and what the moments become.

The refresh methods of :class:`fira_jax.Refresh` as functions of arrays: the exact SVD's top
vectors (:func:`top_singular_bases`), the Gram matrix's (:func:`gram_top_vectors`), the randomized
range finder (:func:`randomized_svd`), the warm-started subspace iteration
(:func:`subspace_iteration`), APOLLO's Gaussian projection (:func:`random_projection`); when they
run (:func:`refresh_bases`, :func:`refresh_groups`); each matrix's random key
(:func:`matrix_keys`); and how Adam's moments are carried into a new basis (:func:`transition`,
:func:`carried`).
"""

from fira_jax._src.basis import (
    METHODS,
    SVD_METHODS,
    Basis,
    gram_top_vectors,
    random_projection,
    randomized_svd,
    subspace_iteration,
    top_singular_bases,
)
from fira_jax._src.moments import carried, transition
from fira_jax._src.projection import refresh_bases, refresh_groups
from fira_jax._src.subspace import matrix_keys

__all__ = [
    "METHODS",
    "SVD_METHODS",
    "Basis",
    "carried",
    "gram_top_vectors",
    "matrix_keys",
    "random_projection",
    "randomized_svd",
    "refresh_bases",
    "refresh_groups",
    "subspace_iteration",
    "top_singular_bases",
    "transition",
]
