"""VP diffusion (Ho et al. 2020; Song et al. 2021), in flow time, with eps- or v-prediction.

genmem uses one time convention for every process: t = 0 is noise, t = 1 is data. In those terms
x_t = alpha(t) x1 + sigma(t) eps with alpha^2 + sigma^2 = 1. The network predicts eps, or
v = alpha eps - sigma x1 (Salimans & Ho 2022); either gives the denoised estimate
x1_hat = (x - sigma eps_hat) / alpha = alpha x - sigma v_hat, which sampling may clip to the data
range (then eps_hat = (x - alpha x1_hat) / sigma). The eps form divides an eps error by alpha,
which is 0.01 where sampling starts; the v form does not.

The probability-flow ODE gives the velocity the shared ODE solvers integrate:
    v(x, t) = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat = (alpha'/alpha) (x - eps_hat / sigma),
the reverse SDE (Song et al. 2021, eq. 6) in flow time has drift v - (alpha'/alpha) eps_hat / sigma
and diffusion coefficient sqrt(beta), beta = 2 alpha'/alpha; and between two grid times a < b the
exact Gaussian transitions of DDPM (the posterior q(x_b | x_a, x1_hat)) and DDIM (eta) step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from genmem.generative.process import ChainCoefficients, PathSample, Process, ScoreFn, per_sample_mse, t_batch

_COSINE_OFFSET = 0.008  # Nichol & Dhariwal 2021, eq. 17
_BETA_MIN, _BETA_MAX = 0.1, 20.0  # Song et al. 2021, VP SDE


@dataclass(frozen=True)
class VPDiffusion(Process):
    """VP diffusion with a cosine (default) or linear schedule.

    >>> vp = VPDiffusion("cosine")
    >>> losses = vp.loss(model, torch.randn_like(x1), x1, torch.rand(len(x1)))  # (batch,): noise, data, time
    """

    schedule: str = "cosine"
    prediction: str = "eps"  # or "v"
    clip: float | None = None  # clamp the denoised estimate to [-clip, clip] when sampling
    # Sampling starts where alpha = 0.01, not at alpha = 0 where alpha'/alpha is infinite; the
    # marginal there differs from N(0, I) by 1e-4 in variance.
    alpha_start: float = 0.01
    default_grid = "edm"
    stochastic = True

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = 1.0 - t.double()  # diffusion time: 0 data, 1 noise
        if self.schedule == "cosine":
            alpha = torch.cos(0.5 * math.pi * (s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET))
        else:
            alpha = torch.exp(-0.5 * (_BETA_MIN * s + 0.5 * (_BETA_MAX - _BETA_MIN) * s**2))
        alpha = alpha.clamp(min=0.0, max=1.0)
        return alpha.to(t.dtype), (1 - alpha**2).clamp(min=0).sqrt().to(t.dtype)

    def dlog_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha'(t)/alpha(t) = beta/2 in flow time."""
        s = 1.0 - t.double()
        if self.schedule == "cosine":
            k = 0.5 * math.pi / (1 + _COSINE_OFFSET)
            out = k * torch.tan(k * (s + _COSINE_OFFSET))
        else:
            out = 0.5 * (_BETA_MIN + (_BETA_MAX - _BETA_MIN) * s)
        return out.to(t.dtype)

    @property
    def t_end(self) -> float:
        # The linear schedule reaches sigma = 0 at t = 1, where eps_hat / sigma is undefined:
        # stop at diffusion time 1e-3 as Song et al. (2021) do.
        return 1.0 if self.schedule == "cosine" else 1.0 - 1e-3

    @property
    def t_start(self) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):  # bisection: alpha is increasing in t
            mid = 0.5 * (lo + hi)
            a, _ = self.alpha_sigma(torch.tensor([mid], dtype=torch.float64))
            lo, hi = (mid, hi) if a.item() < self.alpha_start else (lo, mid)
        return hi

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1, *([1] * (x1.dim() - 1)))
        a, s = alpha.view(shape), sigma.view(shape)
        target = x0 if self.prediction == "eps" else a * x0 - s * x1
        return PathSample(x_t=a * x1 + s * x0, target=target)

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample ||eps_hat - eps||^2 (or ||v_hat - v||^2) averaged over dimensions (x0 plays eps)."""
        ps = self.path(x0, x1, t)
        return per_sample_mse(model(ps.x_t, t), ps.target)

    def denoise(self, model, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1_hat, eps_hat) at (x, t), the denoised estimate clipped to [-clip, clip] if set."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1, *([1] * (x.dim() - 1)))
        a, s = alpha.view(shape), sigma.view(shape)
        out = model(x, t)
        if self.prediction == "eps":
            x1_hat, eps_hat = (x - s * out) / a, out
        else:
            x1_hat, eps_hat = a * x - s * out, s * x + a * out
        if self.clip is not None:
            x1_hat = x1_hat.clamp(-self.clip, self.clip)
            eps_hat = (x - a * x1_hat) / s.clamp(min=1e-12)
        return x1_hat, eps_hat

    def velocity(self, model):
        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # adaptive solvers probe past the end of the grid; hold t where sigma > 0
            t = t.clamp(max=self.t_end)
            _, sigma = self.alpha_sigma(t)
            shape = (-1, *([1] * (x.dim() - 1)))
            _, eps_hat = self.denoise(model, x, t)
            return self.dlog_alpha(t).view(shape) * (x - eps_hat / sigma.view(shape))

        return v

    def sde_drift_diffusion(self, model):
        """(drift(x, t), g(t)) of the reverse-time SDE, integrated forward in flow time."""

        def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _, sigma = self.alpha_sigma(t)
            shape = (-1, *([1] * (x.dim() - 1)))
            k = self.dlog_alpha(t).view(shape)
            _, eps_hat = self.denoise(model, x, t)
            return k * (x - 2.0 * eps_hat / sigma.view(shape))

        def g(t: torch.Tensor) -> torch.Tensor:
            return (2.0 * self.dlog_alpha(t)).sqrt()

        return drift, g

    def for_sampling(self, clip: float | None) -> VPDiffusion:
        return dataclasses.replace(self, clip=clip)

    def score(self, model, t: float) -> ScoreFn:
        """score = -eps_hat / sigma (the model predicts eps or v, either giving eps_hat)."""
        sigma = self.alpha_sigma(torch.tensor([t], dtype=torch.float64))[1].item()
        if not sigma > 0:
            raise ValueError(f"the VP score needs sigma(t) > 0, got sigma({t}) = {sigma}")

        def score(x: torch.Tensor) -> torch.Tensor:
            return -self.denoise(model, x, t_batch(t, x))[1] / sigma

        return score

    def memoryless(self, steps: int) -> ChainCoefficients:
        """DDPM's posterior between any two times (Kingma et al. 2021): the forward
        x_a = (α_a/α_b) x_b + N(0, σ_ab²), σ_ab² = σ_a² - (α_a/α_b)² σ_b²; m = a x1_hat + b x."""
        t = torch.linspace(self.t_start, self.t_end, steps + 1, dtype=torch.float64)
        alpha, sigma = self.alpha_sigma(t)
        a_a, s_a, a_b, s_b = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
        a_ab = a_a / a_b
        var_ab = (s_a**2 - a_ab**2 * s_b**2).clamp(min=0)
        return ChainCoefficients(t=t, a=a_b * var_ab / s_a**2, b=a_ab * s_b**2 / s_a**2, v=torch.zeros(steps, dtype=torch.float64),
                                 c=(var_ab * s_b**2 / s_a**2).sqrt())

    def chain_mean(self, model, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return a * self.denoise(model, x, t)[0] + b * x


def ddim_step(process: VPDiffusion, model, x: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor, eta: float,
              z: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step (Song, Meng & Ermon 2021, eq. 12) from time ``ta`` to the less noisy ``tb``:
    x_b = alpha_b x1_hat + sqrt(sigma_b^2 - s^2) eps_hat + s z with
    s = eta (sigma_b / sigma_a) sqrt(1 - alpha_a^2 / alpha_b^2); ``z=None`` takes the mean."""
    (a_a, s_a), (a_b, s_b) = process.alpha_sigma(ta), process.alpha_sigma(tb)
    x1_hat, eps_hat = process.denoise(model, x, ta.expand(len(x)))
    s = eta * (s_b / s_a) * (1 - a_a**2 / a_b**2).clamp(min=0).sqrt()
    x_b = a_b * x1_hat + (s_b**2 - s**2).clamp(min=0).sqrt() * eps_hat
    return x_b if z is None else x_b + s * z


def ddpm_step(process: VPDiffusion, model, x: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor,
              z: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step (Ho et al. 2020, eqs. 6-7, between any two times as in Kingma et al.
    2021): a draw from the posterior q(x_b | x_a, x1 = x1_hat), whose mean is
    (alpha_b sigma_ab^2 / sigma_a^2) x1_hat + (alpha_ab sigma_b^2 / sigma_a^2) x_a and variance
    sigma_ab^2 sigma_b^2 / sigma_a^2, with alpha_ab = alpha_a / alpha_b and
    sigma_ab^2 = sigma_a^2 - alpha_ab^2 sigma_b^2; ``z=None`` takes the mean."""
    (a_a, s_a), (a_b, s_b) = process.alpha_sigma(ta), process.alpha_sigma(tb)
    x1_hat, _ = process.denoise(model, x, ta.expand(len(x)))
    a_ab = a_a / a_b
    var_ab = (s_a**2 - a_ab**2 * s_b**2).clamp(min=0)
    mean = (a_b * var_ab / s_a**2) * x1_hat + (a_ab * s_b**2 / s_a**2) * x
    return mean if z is None else mean + (var_ab * s_b**2 / s_a**2).sqrt() * z
