"""Laplace posteriors over generative-model weights, Euclidean and Riemannian (METHODS.md §Riemannian Laplace).

>>> from genmem.posterior import LaplacePosterior
>>> la = LaplacePosterior(model, FlowMatching(), train_x).fit()
>>> samples = la.sample(4, method="riemannian", scale=1e-2)
"""

from __future__ import annotations

from genmem.posterior.curvature import CURVATURES, diagonal_curvature
from genmem.posterior.geodesic import GeodesicError, GeodesicResult, exponential_map
from genmem.posterior.laplace import LaplacePosterior, WeightSample, with_weights
from genmem.posterior.objective import PosteriorObjective, default_subset, select_parameters

__all__ = [
    "CURVATURES",
    "GeodesicError",
    "GeodesicResult",
    "LaplacePosterior",
    "PosteriorObjective",
    "WeightSample",
    "default_subset",
    "diagonal_curvature",
    "exponential_map",
    "select_parameters",
    "with_weights",
]
