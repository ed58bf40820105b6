"""Local intrinsic dimension from a trained model's score: FLIPD and the score-Jacobian spectrum.

Noise convention here: the *Gaussian convolution* p_s = p * N(0, s I) of the data density p, with
variance s = ``t_noise`` (the convention of METHODS.md, §Memorisation vs training-set size, where
the exact score of the linear manifold y = F z is -(F F^T + s I)^{-1} x). genmem's processes use
flow time instead (t = 0 noise, t = 1 data, x_t = alpha_t x1 + sigma_t x0); :func:`convolution_score`
turns a trained model into the score of p_s, and :func:`flow_score` gives the score of p_t itself.

Usage::

    score = convolution_score(model, FlowMatching(), t_noise=1e-3)
    lid = flipd(score, x, t_noise=1e-3, generator=torch.Generator().manual_seed(0))   # (n,)
    dims = lid_spectral(score, x)                                                       # (n,) int
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genmem.generative.process import Process

ScoreFn = Callable[[Tensor], Tensor]


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Rademacher probes: the lowest-variance Hutchinson probe (Hutchinson 1990).
    device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randint(0, 2, like.shape, generator=generator, device=device, dtype=like.dtype)
    return (2 * v - 1).to(like.device)


def _jacobian_trace(s: Tensor, x: Tensor, samples: int | None, generator: torch.Generator | None) -> Tensor:
    """Per-sample tr(d s / d x) by vector-Jacobian products (reverse mode, works for any module).

    A score evaluated on a batch acts on each sample separately, so the Jacobian of the batch is
    block-diagonal and one vjp with a batch of probes gives every sample's v^T J v at once.
    ``samples=None`` is the exact trace (one vjp per dimension; for small D).
    """
    n, dim = x.shape[0], x[0].numel()
    total = torch.zeros(n, dtype=x.dtype, device=x.device)
    if samples is None:
        for i in range(dim):
            e = torch.zeros_like(x).flatten(1)
            e[:, i] = 1
            e = e.view_as(x)
            (g,) = torch.autograd.grad(s, x, e, retain_graph=True)
            total += g.flatten(1)[:, i]
        return total
    for _ in range(samples):
        v = _rademacher(x, generator)
        (g,) = torch.autograd.grad(s, x, v, retain_graph=True)
        total += (g * v).flatten(1).sum(1)
    return total / samples


def flipd(
    score_fn: ScoreFn,
    x: Tensor,
    t_noise: float,
    *,
    hutchinson_samples: int | None = 8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """FLIPD local intrinsic dimension estimate (Kamkari et al. 2024, "A Geometric View of Data
    Complexity", §3, the FLIPD estimator) at each point of ``x``, shape (n,).

    Implements, with s(., t_noise) = ``score_fn`` the score of p_s = p * N(0, s I), s = ``t_noise``:

        FLIPD(x, s) = D + s * [ tr(grad_x s(x)) + ||s(x)||^2 ]                      (*)

    Why: LIDL (Tempczyk et al. 2022) reads the dimension off the slope of the log density in the
    log noise scale, d log p_sigma(x) / d log sigma -> d - D as sigma -> 0 on a d-manifold; the heat
    (Fokker-Planck) equation d p_s / d s = 1/2 Laplacian p_s gives
    d log p_s / d s = 1/2 (tr grad s + ||s||^2), and d / d log sigma = 2 s d / d s gives (*).
    For a VP model x_t = alpha x1 + sigma x0 this is the paper's
    D + sigma_t^2 [tr grad s_t(alpha x) + ||s_t(alpha x)||^2] with s = sigma_t^2 / alpha_t^2; that is
    what ``flipd(convolution_score(model, process, s), x, s)`` computes.

    The trace is Hutchinson's estimator with ``hutchinson_samples`` Rademacher probes drawn from
    ``generator``, or exact (D vector-Jacobian products) when ``hutchinson_samples=None``.
    FLIPD is evaluated at clean points ``x``, with ``t_noise`` small (1e-3..1e-2 for data of unit scale).

    Usage::

        lid = flipd(lambda y: -y @ torch.linalg.inv(cov + s * eye), x, s, hutchinson_samples=None)
    """
    if t_noise <= 0:
        raise ValueError(f"t_noise is the variance of the added noise and must be > 0, got {t_noise}")
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        s = score_fn(x)
        trace = _jacobian_trace(s, x, hutchinson_samples, generator)
    sq_norm = s.detach().flatten(1).pow(2).sum(1)
    return x[0].numel() + t_noise * (trace.detach() + sq_norm)


def score_jacobian_spectrum(score_fn: ScoreFn, x: Tensor) -> Tensor:
    """Singular values of the score Jacobian at each point, descending; shape (n, D). Costs D vjps."""
    n, dim = x.shape[0], x[0].numel()
    x = x.detach().clone().requires_grad_(True)
    rows = []
    with torch.enable_grad():
        s = score_fn(x)
        for i in range(dim):
            e = torch.zeros(n, dim, dtype=x.dtype, device=x.device)
            e[:, i] = 1
            (g,) = torch.autograd.grad(s, x, e.view_as(x), retain_graph=True)
            rows.append(g.flatten(1))  # row i of each sample's Jacobian
    jac = torch.stack(rows, dim=1).detach()
    return torch.linalg.svdvals(jac)


def lid_spectral(score_fn: ScoreFn, x: Tensor) -> Tensor:
    """Dimension from the score-Jacobian spectrum (Stanczuk et al. 2024; METHODS.md, §Metrics):
    near a d-manifold at small noise the Jacobian has D - d singular values ~1/s (normal directions)
    and d small ones (tangent); the number below the largest gap between consecutive singular values
    is the estimate. Shape (n,), int64.

    Usage::

        dims = lid_spectral(convolution_score(model, process, 1e-3), x)
    """
    sv = score_jacobian_spectrum(score_fn, x)
    gaps = sv[:, :-1] - sv[:, 1:]
    above = gaps.argmax(dim=1) + 1  # singular values above the largest gap
    return sv.shape[1] - above


def flow_score(model, process: Process, t: float) -> ScoreFn:
    """The score of p_t at flow time ``t`` (genmem: t = 0 noise, t = 1 data) from a trained model,
    as the process computes it (:meth:`genmem.generative.process.Process.score`):

    - FlowMatching (x_t = (1 - t) x0 + t x1, v = E[x1 - x0 | x_t]): Tweedie gives
      E[x0 | x_t] = x - t v, and the score is -E[x0 | x_t] / (1 - t) = (t v - x) / (1 - t).
    - VPDiffusion (x_t = alpha x1 + sigma eps; the model predicts eps or v, either giving eps_hat):
      score = -eps_hat / sigma.

    Usage::

        score = flow_score(model, FlowMatching(), t=0.99)
        s = score(x_t)  # same shape as x_t
    """
    return process.score(model, t)


def _alpha_sigma(process: Process, t: float) -> tuple[float, float]:
    alpha, sigma = process.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    return alpha.item(), sigma.item()


def noise_to_time(process: Process, t_noise: float) -> float:
    """Flow time t at which p_t is the data convolved with N(0, t_noise I) and scaled by alpha_t,
    i.e. sigma_t^2 / alpha_t^2 = t_noise (bisection: sigma/alpha decreases in t)."""
    lo, hi = process.t_start, process.t_end
    a, s = _alpha_sigma(process, hi)
    if (s / a) ** 2 > t_noise:
        raise ValueError(f"{type(process).__name__} cannot reach noise variance {t_noise}: its smallest is {(s / a) ** 2:.3g}")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        a, s = _alpha_sigma(process, mid)
        lo, hi = (mid, hi) if a <= 0 or (s / a) ** 2 > t_noise else (lo, mid)
    return hi


def convolution_score(model, process: Process, t_noise: float) -> ScoreFn:
    """Score of the data density convolved with N(0, t_noise I), from a trained genmem model.

    p_t(y) = alpha^{-D} p_s(y / alpha) with s = sigma^2 / alpha^2, so
    grad log p_s(x) = alpha * score_t(alpha x), at the t from :func:`noise_to_time`.

    Usage::

        lid = flipd(convolution_score(model, process, 1e-3), x, 1e-3)
    """
    t = noise_to_time(process, t_noise)
    alpha, _ = _alpha_sigma(process, t)
    score_t = flow_score(model, process, t)

    def score(x: Tensor) -> Tensor:
        return alpha * score_t(alpha * x)

    return score
