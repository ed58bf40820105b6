"""VP diffusion with epsilon prediction (Ho et al. 2020; Song et al. 2021), in flow time.

genmem uses one time convention for every process: t = 0 is noise, t = 1 is data. In those terms
x_t = alpha(t) x1 + sigma(t) eps with alpha^2 + sigma^2 = 1, and the network predicts eps.
The probability-flow ODE gives the velocity the shared ODE solvers integrate:
    v(x, t) = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) eps_hat = (alpha'/alpha) (x - eps_hat / sigma),
and the reverse SDE (Song et al. 2021, eq. 6) in flow time has drift v - (alpha'/alpha) eps_hat / sigma
and diffusion coefficient sqrt(beta), beta = 2 alpha'/alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genmem.generative.process import PathSample, Process, per_sample_mse

_COSINE_OFFSET = 0.008  # Nichol & Dhariwal 2021, eq. 17
_BETA_MIN, _BETA_MAX = 0.1, 20.0  # Song et al. 2021, VP SDE


@dataclass(frozen=True)
class VPDiffusion(Process):
    """VP diffusion with a cosine (default) or linear schedule.

    >>> vp = VPDiffusion("cosine")
    >>> losses = vp.loss(model, torch.randn_like(x1), x1, torch.rand(len(x1)))  # (batch,): noise, data, time
    """

    schedule: str = "cosine"
    # Sampling starts where alpha = 0.01, not at alpha = 0 where alpha'/alpha is infinite; the
    # marginal there differs from N(0, I) by 1e-4 in variance.
    alpha_start: float = 0.01

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
        return PathSample(x_t=alpha.view(shape) * x1 + sigma.view(shape) * x0, target=x0)

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample ||eps_hat(x_t, t) - eps||^2 averaged over dimensions (x0 plays eps)."""
        ps = self.path(x0, x1, t)
        return per_sample_mse(model(ps.x_t, t), ps.target)

    def velocity(self, model):
        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # adaptive solvers probe past the end of the grid; hold t where sigma > 0
            t = t.clamp(max=self.t_end)
            _, sigma = self.alpha_sigma(t)
            shape = (-1, *([1] * (x.dim() - 1)))
            return self.dlog_alpha(t).view(shape) * (x - model(x, t) / sigma.view(shape))

        return v

    def sde_drift_diffusion(self, model):
        """(drift(x, t), g(t)) of the reverse-time SDE, integrated forward in flow time."""

        def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            _, sigma = self.alpha_sigma(t)
            shape = (-1, *([1] * (x.dim() - 1)))
            k = self.dlog_alpha(t).view(shape)
            return k * (x - 2.0 * model(x, t) / sigma.view(shape))

        def g(t: torch.Tensor) -> torch.Tensor:
            return (2.0 * self.dlog_alpha(t)).sqrt()

        return drift, g
