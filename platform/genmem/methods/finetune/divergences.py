"""The f-divergences of regularised reward fine-tuning (Tang 2024), by their density ratio
p*/p_pre = (f')⁻¹((r - c)/α): the normaliser c, the exact tilt on base samples, and the
surrogate reward r̃ = α log (f')⁻¹((r - c)/α) through which the KL machinery reaches p*."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from genmem.methods.finetune.rewards import Reward

__all__ = ["DIVERGENCES", "Divergence", "DivergenceName", "Surrogate", "check_bounded", "divergence", "normaliser", "tilt_weights"]

DivergenceName = Literal["kl", "chi2", "reverse_kl", "hellinger"]


def _log_positive(z: Tensor, eps: float = 1e-2) -> Tensor:
    """log max(z, 0), smoothed below ``eps`` so its gradient pushes out of the region p* = 0."""
    u = z / eps
    # log softplus(u) -> u for u << 0, where softplus itself underflows to 0
    return math.log(eps) + torch.where(u < -20, u, torch.log(nn.functional.softplus(u.clamp(min=-20))))


@dataclass(frozen=True)
class Divergence:
    """An f-divergence by its density ratio g = (f')⁻¹: p* = p_pre g((r - c)/α); ``log_ratio``
    is log g (smoothed where g = 0), the surrogate reward's r̃/α. ``pole``: the y where g blows
    up (reverse KL, Hellinger); p* then exists only for a reward bounded above, with c chosen so
    that (sup r - c)/α stays below the pole."""

    name: str
    ratio: Callable[[Tensor], Tensor]
    log_ratio: Callable[[Tensor], Tensor]
    normalised: bool = True  # False for KL: any c gives the same tilt (p* ∝ p_pre exp(r/α))
    pole: float | None = None


DIVERGENCES = {
    # f(p) = p log p: f'(p) = log p + 1, g(y) = exp(y - 1)
    "kl": Divergence("kl", lambda y: torch.exp(y - 1), lambda y: y - 1, normalised=False),
    # f(p) = (p - 1)²: g(y) = 1 + y/2, zero where y < -2 (Tang 2024: p* = p_pre (1 + (r - c)/(2α))₊)
    "chi2": Divergence("chi2", lambda y: (1 + y / 2).clamp(min=0), lambda y: _log_positive(1 + y / 2)),
    # f(p) = -log p (reverse KL): f'(p) = -1/p, g(y) = -1/y for y < 0
    "reverse_kl": Divergence("reverse_kl", lambda y: 1 / (-y).clamp(min=1e-6), lambda y: -_log_positive(-y, 1e-3), pole=0.0),
    # f(p) = (sqrt p - 1)² (squared Hellinger): f'(p) = 1 - 1/sqrt p, g(y) = 1/(1 - y)² for y < 1
    "hellinger": Divergence("hellinger", lambda y: (1 - y).clamp(min=1e-3) ** -2, lambda y: -2 * _log_positive(1 - y, 1e-3), pole=1.0),
}


def divergence(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}': choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def check_bounded(div: Divergence, bound: float | None) -> None:
    """Refuse a divergence with a pole for a reward that is not bounded above (one sentence)."""
    if div.pole is not None and (bound is None or not math.isfinite(bound)):
        raise ValueError(f"the {div.name} divergence needs a reward bounded above (its p* = p_pre g((r - c)/α) has a pole at "
                         f"(r - c)/α = {div.pole:g}): use kl or chi2, or a bounded reward (class, region, quadratic)")


def normaliser(div: Divergence, rewards: Tensor, alpha: float, bound: float | None = None) -> float:
    """c with mean over base samples of g((r - c)/α) = 1 (bisection; g((r - c)/α) falls as c
    grows). KL: 0 (the tilt is normalised by its own constant). A divergence with a pole needs
    the reward's upper ``bound``: c stays above bound - α·pole, so p* is finite everywhere."""
    if not div.normalised:
        return 0.0
    check_bounded(div, bound)
    r = rewards.double()

    def mass(c: float) -> float:
        return div.ratio((r - c) / alpha).mean().item()

    lo, hi = r.min().item() - 1.0, r.max().item() + 1.0
    if div.pole is not None:
        floor = bound - alpha * div.pole
        lo = floor + 1e-9 * max(1.0, abs(floor))
        if mass(lo) < 1:
            raise ValueError(f"α={alpha:g} is too small for the {div.name} divergence with this reward: no normaliser c above "
                             f"{floor:.4g} gives p* mass 1 on the base's samples; raise α")
        hi = max(hi, lo + 1.0)
    while mass(lo) < 1:
        lo -= 2 * (hi - lo)
    while mass(hi) > 1:
        hi += 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return 0.5 * (lo + hi)


def tilt_weights(div: Divergence, rewards: Tensor, alpha: float, c: float | None = None, bound: float | None = None) -> Tensor:
    """Self-normalised weights that turn base samples into samples of p* (the exact target on
    what the base generates)."""
    c = normaliser(div, rewards, alpha, bound) if c is None else c
    w = torch.exp((rewards.double() - rewards.double().max()) / alpha) if not div.normalised else div.ratio((rewards.double() - c) / alpha)
    return w / w.sum()


class Surrogate(nn.Module):
    """r̃(x) = α log (f')⁻¹((r(x) - c)/α): KL fine-tuning on r̃ reaches the f-divergence's p*."""

    def __init__(self, reward: Reward, div: Divergence, alpha: float, c: float):
        super().__init__()
        self.reward, self.div, self.alpha, self.c = reward, div, alpha, c

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * self.div.log_ratio((self.reward(x) - self.c) / self.alpha)
