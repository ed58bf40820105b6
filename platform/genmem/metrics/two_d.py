"""Sample-to-sample distances for low-dimensional data (2-D toys, vectors)."""

from __future__ import annotations

import numpy as np
import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().flatten(1).double()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with an RBF kernel (Gretton et al. 2012, eq. 3).

    The bandwidth defaults to the median heuristic: the median pairwise distance of the pooled
    sample. Fine for the few thousand points of the 2-D checks (memory O((m + n)^2)).
    """
    x, y = _flat(x), _flat(y)
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        bandwidth = d2[torch.triu_indices(len(z), len(z), 1).unbind()].sqrt().median().item()
    k = torch.exp(-d2 / (2 * bandwidth**2))
    m, n = len(x), len(y)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean()).item()


def rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    """The RBF kernel matrix exp(-|x_i - y_j|^2 / (2 σ^2)) of two row sets, :func:`mmd_rbf`'s
    (for :func:`genmem.metrics.frechet.mmd_bounds`, e.g. ``partial(rbf_kernel, bandwidth=1.0)``)."""
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.exp(-np.clip(d2, 0.0, None) / (2 * bandwidth**2))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance over random directions (Bonneel et al. 2015).

    Samples of unequal size are compared through matched quantiles of each projection.
    """
    x, y = _flat(x), _flat(y)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(dim=0).values, (y @ dirs).sort(dim=0).values
    q = torch.linspace(0, 1, max(len(x), len(y)), dtype=torch.float64)
    qx = torch.quantile(px, q, dim=0) if len(x) != len(q) else px
    qy = torch.quantile(py, q, dim=0) if len(y) != len(q) else py
    return (qx - qy).pow(2).mean().sqrt().item()


def region_fraction(labels: torch.Tensor, region: int) -> float:
    """Fraction of samples whose ground-truth region label equals ``region``."""
    return (labels == region).double().mean().item() if len(labels) else float("nan")
