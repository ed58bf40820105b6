"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020).

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest neighbour within that set. Precision: fraction of fake points inside the real manifold;
recall: real points inside the fake manifold; density (Naeem et al.): mean number of real balls
holding a fake point, divided by k; coverage: fraction of real points whose own ball holds a fake point.
Strict ``<`` throughout, as in the authors' ``prdc`` package.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genmem.metrics.neighbours import knn


def prdc(
    real: Tensor,
    fake: Tensor,
    *,
    k_pr: int = 3,
    k_dc: int = 5,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Precision, recall (k-NN radius ``k_pr``), density and coverage (``k_dc``) of ``fake`` against ``real``.

    Rows are flattened feature vectors. Radii come from exact :func:`knn`; real-fake distances are
    computed in float64 blocks of at most ``chunk_size`` × ``chunk_size``.

    Usage::

        prdc(real_features, fake_features)  # {"precision": .., "recall": .., "density": .., "coverage": ..}
    """
    real, fake = real.detach().flatten(1), fake.detach().flatten(1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions but fake ones {fake.shape[1]}: use the same extractor")
    for name, x in (("real", real), ("fake", fake)):
        for k in (k_pr, k_dc):
            if k < 1 or len(x) < k + 1:
                raise ValueError(f"k = {k} neighbours need N >= k + 1 {name} points, got N = {len(x)}: lower k or add points")
    dev = torch.device(device) if device else real.device
    real_r = _radii(real, (k_pr, k_dc), chunk_size, dev)
    fake_r = _radii(fake, (k_pr,), chunk_size, dev)[0]
    real, fake = real.to(dev, torch.float64), fake.to(dev, torch.float64)
    in_real = torch.zeros(len(fake), dtype=torch.bool, device=dev)  # precision
    balls = torch.zeros(len(fake), dtype=torch.float64, device=dev)  # density numerator
    in_fake = torch.zeros(len(real), dtype=torch.bool, device=dev)  # recall
    covered = torch.zeros(len(real), dtype=torch.bool, device=dev)  # coverage
    for rs in range(0, len(real), chunk_size):
        rc = real[rs : rs + chunk_size]
        r_pr, r_dc = real_r[0][rs : rs + chunk_size, None], real_r[1][rs : rs + chunk_size, None]
        for fs in range(0, len(fake), chunk_size):
            d = torch.cdist(rc, fake[fs : fs + chunk_size])  # (real, fake) block
            in_real[fs : fs + len(d[0])] |= (d < r_pr).any(0)
            balls[fs : fs + len(d[0])] += (d < r_dc).sum(0)
            in_fake[rs : rs + len(d)] |= (d < fake_r[fs : fs + chunk_size]).any(1)
            covered[rs : rs + len(d)] |= (d < r_dc).any(1)
    return {
        "precision": in_real.double().mean().item(),
        "recall": in_fake.double().mean().item(),
        "density": balls.mean().item() / k_dc,
        "coverage": covered.double().mean().item(),
    }


def _radii(x: Tensor, ks: tuple[int, ...], chunk_size: int, device: torch.device) -> list[Tensor]:
    """Distance from each point to its k-th nearest neighbour within ``x`` (self excluded), per k."""
    d, _ = knn(x, x, max(ks), chunk_size=chunk_size, device=device, exclude_self=True)
    d = d.to(device)
    return [d[:, k - 1] for k in ks]
