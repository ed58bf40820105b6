"""Local intrinsic dimension from samples: Levina–Bickel MLE and TwoNN (METHODS.md §Metrics)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genmem.metrics.neighbours import knn


def lid_mle(x: Tensor, k: int = 20, *, chunk_size: int = 4096) -> Tensor:
    """Per-point intrinsic dimension, Levina & Bickel (2004) MLE in its unbiased (k - 2) form.

    With T_j the distance to the j-th neighbour, S = Σ_{j<k} log(T_k / T_j) is Gamma(k - 1, m)
    for a locally uniform density in m dimensions, so the plain MLE
    (k - 1)/S of Levina & Bickel has mean m (k - 1)/(k - 2); we return m̂ = (k - 2)/S, which is
    unbiased per point, and so is its mean over points (the global estimate). A point with an
    exact duplicate among its neighbours gets 0.

    Usage::

        lid_mle(samples, k=20).mean()
    """
    if k < 3:
        raise ValueError(f"lid_mle needs k >= 3 neighbours for the (k - 2) normalisation, got k = {k}")
    if len(x) < k + 1:
        raise ValueError(f"k = {k} neighbours need N >= k + 1 points, got N = {len(x)}: lower k or add points")
    t, _ = knn(x, x, k, chunk_size=chunk_size, exclude_self=True)
    s = (t[:, -1:].log() - t[:, :-1].log()).sum(1)
    return (k - 2) / s


def lid_twonn(x: Tensor, *, discard_fraction: float = 0.1) -> float:
    """Global intrinsic dimension by TwoNN (Facco et al. 2017, Sci. Rep. 7:12140).

    μ = r2 / r1 is Pareto with F(μ) = 1 - μ^{-d}, so -log(1 - F) = d log μ: fit a line through the
    origin to the empirical F_i = i / N of the sorted μ, after discarding the largest
    ``discard_fraction`` of μ (the noisy tail, Facco et al. §Methods). Points with a duplicate
    (r1 = 0) are dropped.

    Usage::

        lid_twonn(samples)
    """
    if not 0 < discard_fraction < 1:
        raise ValueError(f"discard_fraction {discard_fraction} is outside (0, 1): use e.g. 0.1")
    if len(x) < 3:
        raise ValueError(f"TwoNN needs N >= 3 points, got N = {len(x)}")
    r, _ = knn(x, x, 2, exclude_self=True)
    r = r[r[:, 0] > 0]
    mu = (r[:, 1] / r[:, 0]).sort().values
    n = len(mu)
    keep = math.floor(n * (1 - discard_fraction))
    f = torch.arange(1, keep + 1, dtype=torch.float64) / n
    xs, ys = mu[:keep].log().cpu(), -torch.log1p(-f)
    return (xs @ ys / (xs @ xs)).item()
