"""The dimension a model has learned, read off the spectrum of its score Jacobian at small noise
(Stanczuk et al. 2024, "Diffusion models encode the intrinsic dimension of data manifolds";
Achilli et al. 2024, "Losing dimensions"; METHODS.md §Memorisation vs training-set size).

At a point x on a d-dimensional data manifold, the score of the data smoothed by N(0, s I) has a
Jacobian J with D - d singular values near 1/s (normal directions: the density falls off at the
noise scale) and d of order 1/(λ + s) (tangent directions of variance λ). A model that has lost
a tangent direction (it has collapsed towards its training points along it) shows ~1/s there
too. So the scaled spectrum s σ_i lies between 0 (a kept tangent direction) and 1 (normal or
lost), and the learned dimension is the number of values below the largest gap in
[max(1, sσ_1), sσ_1, ..., sσ_D, 0]: the two end points make a model that has collapsed
entirely (every value ~1) read 0 and a model with no normal direction read D, where a plain
largest gap would pick one at random among values that are all alike.

Usage::

    score = convolution_score(model, FlowMatching(), t_noise=1e-3)
    report = learned_dimension(score, x, t_noise=1e-3)           # report.dims: (n,) int
    kept = tangent_kept(report.jacobians, F, t_noise=1e-3)         # (n, d) bool, linear manifold
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor], Tensor]


def score_jacobians(score_fn: ScoreFn, x: Tensor, *, chunk: int = 32) -> Tensor:
    """Each point's Jacobian of ``score_fn`` (applied to a batch) in flattened coordinates,
    shape (n, D, D); ``chunk`` points at a time through ``torch.func.vmap(jacrev)``, so a chunk
    costs one batched backward pass of chunk x D rows."""

    def one(xi: Tensor) -> Tensor:
        return score_fn(xi.view(1, *x.shape[1:])).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(one))
    flat = x.detach().reshape(len(x), -1)
    out = [jac(flat[i : i + chunk]) for i in range(0, len(flat), chunk)]
    return torch.cat(out).detach() if out else flat.new_zeros(0, flat.shape[1], flat.shape[1])


def dimension_from_spectrum(scaled: Tensor) -> Tensor:
    """The learned dimension from each row of s σ (descending singular values times the noise
    variance), shape (n,) int64: the values below the largest gap, the spectrum framed by
    max(1, sσ_1) above and 0 below."""
    top = scaled[:, :1].clamp(min=1.0)
    framed = torch.cat([top, scaled, torch.zeros_like(top)], dim=1)
    cut = (framed[:, :-1] - framed[:, 1:]).argmax(dim=1)  # values above the gap: cut of them
    return scaled.shape[1] - cut


@dataclass
class DimensionReport:
    dims: Tensor  # (n,) learned dimension per point
    scaled_spectrum: Tensor  # (n, D) s σ_i, descending
    jacobians: Tensor  # (n, D, D)

    def summary(self, prefix: str) -> dict[str, float]:
        d = self.dims.double()
        return {f"{prefix}_q50": d.median().item(), f"{prefix}_q10": d.quantile(0.1).item(), f"{prefix}_q90": d.quantile(0.9).item(),
                f"{prefix}_mean": d.mean().item()}


def learned_dimension(score_fn: ScoreFn, x: Tensor, t_noise: float, *, chunk: int = 32) -> DimensionReport:
    """The learned dimension at each point of ``x`` from the score of the data smoothed by
    N(0, ``t_noise`` I) (e.g. :func:`genmem.metrics.flipd.convolution_score`)."""
    if not 0 < t_noise < 1:
        raise ValueError(f"t_noise is the variance of the smoothing noise and must lie in (0, 1), got {t_noise}")
    jac = score_jacobians(score_fn, x, chunk=chunk)
    scaled = t_noise * torch.linalg.svdvals(jac.double())
    return DimensionReport(dimension_from_spectrum(scaled), scaled, jac)


def tangent_kept(jacobians: Tensor, tangent: Tensor, t_noise: float) -> Tensor:
    """Which of the true tangent directions (``tangent``: (D, d), orthonormal columns, e.g. a
    linear manifold's F) each point's model keeps, shape (n, d) bool: s ||J f_i|| below 1/2,
    halfway between a kept direction (s / (λ + s) ≈ 0) and a lost one (≈ 1)."""
    return t_noise * (jacobians.double() @ tangent.double()).norm(dim=1) < 0.5
