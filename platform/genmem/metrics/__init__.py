"""Metrics: pure torch/numpy, no Ray or MLflow.

Memorisation (nearest-neighbour ratio) and the copy tests beside it (Meehan et al.'s C_T,
authenticity, the size-matched held-out gap, with intervals and a null control: ``evidence``),
Fréchet distance and KID on pluggable features, precision/recall/density/coverage, intrinsic
dimension (MLE, TwoNN, FLIPD, score spectrum), and 2-D sample distances."""

from genmem.metrics.authenticity import authentic
from genmem.metrics.contrast import HeldoutGap, size_matched_gap
from genmem.metrics.copying import CopyTest, data_copying, mann_whitney_z
from genmem.metrics.evidence import CopyEvidence, CopyReference, CopySettings
from genmem.metrics.features import ClassifierFeatures, InceptionFeatures, PixelFeatures, get_extractor, reference_stats
from genmem.metrics.flipd import flipd, flow_score, lid_spectral
from genmem.metrics.frechet import GaussianStats, fd_interval, frechet_distance, gaussian_stats, kid, kid_interval, mmd_bounds
from genmem.metrics.kmeans import Cells, kmeans
from genmem.metrics.lid import lid_mle, lid_twonn
from genmem.metrics.memorisation import MemorisationReport, memorisation
from genmem.metrics.neighbours import knn
from genmem.metrics.prdc import prdc
from genmem.metrics.two_d import mmd_rbf, rbf_kernel, region_fraction, sliced_wasserstein

__all__ = [
    "Cells",
    "ClassifierFeatures",
    "CopyEvidence",
    "CopyReference",
    "CopySettings",
    "CopyTest",
    "GaussianStats",
    "HeldoutGap",
    "InceptionFeatures",
    "MemorisationReport",
    "PixelFeatures",
    "authentic",
    "data_copying",
    "fd_interval",
    "flipd",
    "flow_score",
    "frechet_distance",
    "gaussian_stats",
    "get_extractor",
    "kid",
    "kid_interval",
    "kmeans",
    "knn",
    "lid_mle",
    "lid_spectral",
    "lid_twonn",
    "mann_whitney_z",
    "memorisation",
    "mmd_bounds",
    "mmd_rbf",
    "prdc",
    "rbf_kernel",
    "reference_stats",
    "region_fraction",
    "size_matched_gap",
    "sliced_wasserstein",
]
