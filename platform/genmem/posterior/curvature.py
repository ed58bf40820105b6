"""Diagonal curvature of the data term of L at θ (METHODS.md §Riemannian Laplace, step 2).

Backends (string enum), all over the fixed (x0, t) draws of a ``PosteriorObjective``:

- ``"ef"``: empirical Fisher, Σ_i (∂ℓ_i/∂θ)² with ℓ_i = Σ_j ℓ(θ; x1_i, x0_ij, t_ij)/draws the loss
  of training point i (its log-likelihood term); per-point gradients by ``vmap(grad)``.
- ``"ggn"``: exact generalised Gauss–Newton diagonal for ℓ = ||f(θ) − y||²/D, whose output Hessian
  is (2/D) I: diag(Σ_ij Jᵀ (2/D) J)/draws = (2/D)/draws Σ_ij Σ_o (∂f_o/∂θ)²; per-sample Jacobians by
  ``vmap(jacrev)``, chunked so a chunk's Jacobian stays within ``jacobian_budget`` numbers.
- ``"ggn_mc"``: unbiased Monte Carlo GGN diagonal, E_r[(rᵀJ)²] = Σ_o J_o² for Rademacher r;
  one vector-Jacobian product per sample and draw instead of D.

>>> h = diagonal_curvature(obj, "ggn")            # shape (P,), prior not included
>>> h_mc = diagonal_curvature(obj, "ggn_mc", mc_samples=4, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math

import torch
from torch.func import grad, jacrev, vmap

from genmem.posterior.objective import PosteriorObjective

CURVATURES = ("ef", "ggn", "ggn_mc")


def diagonal_curvature(
    obj: PosteriorObjective,
    kind: str = "ef",
    *,
    theta: torch.Tensor | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    jacobian_budget: int = 2**24,
) -> torch.Tensor:
    """Diagonal of the ``kind`` curvature of Σ_i ℓ_i at ``theta`` (default θ*); the prior α is not added."""
    if kind not in CURVATURES:
        raise ValueError(f"curvature {kind!r} is not one of {', '.join(CURVATURES)}")
    theta = obj.theta_star if theta is None else theta
    reduce = getattr(obj, "reduce", lambda x: x)  # a sharded objective sums over its ranks
    if kind == "ef":
        return reduce(_empirical_fisher(obj, theta))
    d = math.prod(obj.targets.shape[1:])
    scale = 2.0 / d / obj.draws  # output Hessian of ||f − y||²/D, and the 1/draws weight

    def f(th, inputs):  # one sample's network output, flattened: (D,)
        return obj.outputs(th, tuple(a[None] for a in inputs))[0].reshape(-1)

    diag = torch.zeros_like(theta)
    if kind == "ggn":
        per_chunk = max(1, min(obj.chunk_size, jacobian_budget // (d * theta.numel())))
        jac = vmap(jacrev(f), in_dims=(None, 0))
        for lo in range(0, len(obj.targets), per_chunk):
            diag += jac(theta, tuple(a[lo : lo + per_chunk] for a in obj.inputs)).pow(2).sum(dim=(0, 1))
        return scale * reduce(diag)

    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, not {mc_samples}")
    projected = vmap(grad(lambda th, inputs, r: f(th, inputs).dot(r)), in_dims=(None, 0, 0))
    for _ in range(mc_samples):
        for inputs, target in obj.chunks():
            r = torch.randint(0, 2, (len(target), d), generator=generator).to(theta.dtype) * 2 - 1
            diag += projected(theta, inputs, r).pow(2).sum(dim=0)
    return scale * reduce(diag) / mc_samples


def _empirical_fisher(obj: PosteriorObjective, theta: torch.Tensor) -> torch.Tensor:
    def per_point(a: torch.Tensor) -> torch.Tensor:  # (points·draws, ...) → (points, draws, ...)
        return a.view(obj.n_points, obj.draws, *a.shape[1:])

    inputs, targets = tuple(per_point(a) for a in obj.inputs), per_point(obj.targets)
    point_grad = vmap(grad(lambda th, a, b: obj.per_sample_loss(th, a, b).sum() / obj.draws), in_dims=(None, 0, 0))
    per_chunk = max(1, obj.chunk_size // obj.draws)
    diag = torch.zeros_like(theta)
    for lo in range(0, obj.n_points, per_chunk):
        sl = slice(lo, lo + per_chunk)
        diag += point_grad(theta, tuple(a[sl] for a in inputs), targets[sl]).pow(2).sum(dim=0)
    return diag
