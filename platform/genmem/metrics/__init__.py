"""Metrics: pure torch/numpy, no Ray or MLflow."""

from genmem.metrics.two_d import mmd_rbf, region_fraction, sliced_wasserstein

__all__ = ["mmd_rbf", "region_fraction", "sliced_wasserstein"]
