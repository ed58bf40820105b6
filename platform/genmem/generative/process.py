"""What every generative process offers: a path, a per-sample loss, a sampling velocity, and the
coefficients and conversions that samplers, FLIPD and the memoryless chain read off it, so that
no code outside this package branches on the process's class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ChainCoefficients:
    """A memoryless chain's ``steps`` Gaussian transitions N(m_k(x), c_k² I) on times ``t``
    (steps + 1, float64): m_k(x) = a_k x1_hat(x) + b_k x + v_k model(x, t_k), each (steps,)."""

    t: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    v: torch.Tensor
    c: torch.Tensor


@dataclass(frozen=True)
class PathSample:
    """A point on the probability path and the network's regression target there."""

    x_t: torch.Tensor
    target: torch.Tensor


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every dimension but the batch: shape (batch,), unreduced."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


class Process:
    """Interface. ``path`` and ``loss`` take the noise ``x0`` first and the data ``x1`` second,
    as time runs (t = 0 noise, t = 1 data). ``loss`` is per-sample (the caller weights and
    reduces); ``velocity(model)`` returns v(x, t) whose flow from t = t_start (noise) to t = 1
    (data) generates samples.

    Usage::

        ps = process.path(x0, x1, t)            # x_t and the regression target
        losses = process.loss(model, x0, x1, t)  # (batch,)
    """

    t_start: float = 0.0
    t_end: float = 1.0
    default_grid = "uniform"  # the sampling time grid "auto" means
    stochastic = False  # whether the reverse-SDE, DDPM and DDIM samplers apply

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        raise NotImplementedError

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, model):
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of the path x_t = alpha_t x1 + sigma_t x0."""
        raise NotImplementedError

    def noise_ratio(self, t: torch.Tensor) -> torch.Tensor:
        """sigma / alpha: EDM's sigma for this path, decreasing in t."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha.clamp(min=1e-12)

    def for_sampling(self, clip: float | None) -> "Process":
        """The process as a sampler runs it, its denoised estimate clamped to ±``clip`` where it has one."""
        return self

    def score(self, model, t: float) -> ScoreFn:
        """x -> the score of p_t at flow time ``t`` from a trained ``model``."""
        raise TypeError(f"no score for process {type(self).__name__}")

    def memoryless(self, steps: int) -> ChainCoefficients:
        """The ``steps`` transitions of this process's memoryless chain (methods.finetune.Memoryless)."""
        raise TypeError(f"no memoryless chain for process {type(self).__name__}")

    def chain_mean(self, model, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """m(x) = a x1_hat + b x + v model(x, t), with coefficients already shaped against ``x``."""
        raise TypeError(f"no memoryless chain for process {type(self).__name__}")


def t_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    """The scalar time ``t`` as a (batch,) tensor matching ``x``."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
