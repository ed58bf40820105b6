"""Metrics: pure torch/numpy, no Ray or MLflow.

Memorisation (nearest-neighbour ratio), Fréchet distance and KID on pluggable features,
precision/recall/density/coverage, intrinsic dimension (MLE, TwoNN, FLIPD, score spectrum),
and 2-D sample distances."""

from genmem.metrics.features import ClassifierFeatures, InceptionFeatures, PixelFeatures, get_extractor, reference_stats
from genmem.metrics.flipd import flipd, flow_score, lid_spectral
from genmem.metrics.frechet import GaussianStats, frechet_distance, gaussian_stats, kid
from genmem.metrics.lid import lid_mle, lid_twonn
from genmem.metrics.memorisation import MemorisationReport, memorisation
from genmem.metrics.neighbours import knn
from genmem.metrics.prdc import prdc
from genmem.metrics.two_d import mmd_rbf, region_fraction, sliced_wasserstein

__all__ = [
    "ClassifierFeatures",
    "GaussianStats",
    "InceptionFeatures",
    "MemorisationReport",
    "PixelFeatures",
    "flipd",
    "flow_score",
    "frechet_distance",
    "gaussian_stats",
    "get_extractor",
    "kid",
    "knn",
    "lid_mle",
    "lid_spectral",
    "lid_twonn",
    "memorisation",
    "mmd_rbf",
    "prdc",
    "reference_stats",
    "region_fraction",
    "sliced_wasserstein",
]
