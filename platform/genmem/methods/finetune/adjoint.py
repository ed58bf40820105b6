"""The adjoint-matching loss (Domingo-Enrich et al., ICLR 2025, Algorithm 1 on the lean adjoint).

Trajectories of the current model's chain without a graph; the lean
adjoint of the *base* chain backwards from ã_K = -∇_x r(x_K)/α, one
vector-Jacobian product of the base transition mean per step: ã_k = (∂m_base,k/∂x_k)ᵀ ã_{k+1}
(discretely, dã/dt = -(∂_x b_base)ᵀ ã); the loss on stop-gradient states
||u_k + c_k ã_{k+1}||², u_k = (m_ft,k - m_base,k)/c_k, with c_k the transition's standard deviation.
At the optimum m_ft = m_base - c² ã: the Gaussian transition tilted by exp(-ãᵀ x), exact when the
value function is linear (a linear reward on a Gaussian base). The path KL of the chain is
Σ_k ||u_k||²/2 (Girsanov, discretely exact). The fine-tuned network stays a velocity (or eps/v)
model of the same process, so every sampler, metric and job takes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genmem.methods.finetune.chain import Memoryless
from genmem.methods.finetune.rewards import Reward

__all__ = ["AdjointMatching", "Trajectories"]


@dataclass
class Trajectories:
    """One batch of the current model's chain: states, the sample, rewards and the path KL."""

    states: list[Tensor]
    x1: Tensor
    reward: Tensor  # (batch,) of the reward being maximised (the surrogate's for an f-divergence)
    kl: Tensor  # (batch,) Σ_k ||u_k||²/2 (NaN when not computed)


class AdjointMatching:
    """The adjoint-matching loss of a fine-tuned model against a frozen ``base`` on ``chain``,
    for the terminal reward ``reward`` at regulariser weight ``alpha`` (KL; wrap the reward in
    :class:`Surrogate` for an f-divergence). ``loss_steps``: how many of the chain's
    steps enter each batch's loss (a random subset, as in the paper; None: all).

    >>> am = AdjointMatching(Memoryless(FlowMatching(), 32), base, Linear(a), alpha=1.0)
    >>> losses = am.loss(model, noise0, noise)  # (batch,)
    """

    def __init__(self, chain: Memoryless, base: nn.Module, reward: Reward, alpha: float, loss_steps: int | None = None):
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}: it weighs the divergence from the base")
        self.chain, self.base, self.reward, self.alpha = chain, base.eval().requires_grad_(False), reward, alpha
        self.loss_steps = loss_steps

    def rollout(self, model: nn.Module, noise0: Tensor, noise: Callable[[int], Tensor], *, kl: bool = True) -> Trajectories:
        """The current model's trajectories (no graph), their rewards and (``kl``) path KL."""
        with torch.no_grad():
            states, x1 = self.chain.sample(model, noise0, noise)
            path_kl = torch.zeros(len(x1), dtype=torch.float64, device=x1.device)
            for k in range(self.chain.steps if kl else 0):
                path_kl += 0.5 * self.control(model, states[k], k).flatten(1).double().pow(2).sum(1)
            reward = self.reward(x1)
        return Trajectories(states, x1, reward.detach(), path_kl if kl else torch.full_like(path_kl, math.nan))

    def control(self, model: nn.Module, x: Tensor, k: int) -> Tensor:
        """u_k = (m_ft,k - m_base,k)/c_k at x (the per-step control; with grad through ``model``)."""
        with torch.no_grad():
            m_base = self.chain.mean(self.base, x, k)
        return (self.chain.mean(model, x, k) - m_base) / float(self.chain.c[k])

    def lean_adjoint(self, states: list[Tensor], x1: Tensor) -> list[Tensor]:
        """[ã_1, ..., ã_K]: ã_K = -∇r(x_K)/α, and backwards ã_k = (∂m_base,k/∂x_k)ᵀ ã_{k+1}
        (one VJP of the base chain per step; entry j belongs to the state after step j)."""
        with torch.enable_grad():
            x = x1.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.reward(x).sum(), x)
            adj = [-grad / self.alpha]
            for k in range(self.chain.steps - 1, 0, -1):
                x = states[k].detach().requires_grad_(True)
                (vjp,) = torch.autograd.grad(self.chain.mean(self.base, x, k), x, adj[-1])
                adj.append(vjp)
        return adj[::-1]

    def loss(self, model: nn.Module, noise0: Tensor, noise: Callable[[int], Tensor], generator: torch.Generator | None = None,
             rollout: Trajectories | None = None) -> Tensor:
        """Per-sample mean over the chosen steps of ||u_k + c_k ã_{k+1}||² (summed over dimensions)."""
        return self.loss_and_kl(model, rollout or self.rollout(model, noise0, noise, kl=False), generator)[0]

    def loss_and_kl(self, model: nn.Module, traj: Trajectories, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The per-sample loss on ``traj``, and the path KL estimated from the same steps'
        controls (n/|steps| Σ ||u_k||²/2, unbiased; no extra network call). The chosen steps'
        states go through ``model`` in one call, so a DDP model sees one forward per backward."""
        adj = self.lean_adjoint(traj.states, traj.x1)
        n = self.chain.steps
        steps = list(range(n))
        if self.loss_steps is not None and self.loss_steps < n:
            steps = sorted(torch.randperm(n, generator=generator)[: self.loss_steps].tolist())
        batch = len(traj.x1)
        x = torch.cat([traj.states[k] for k in steps])
        ks = torch.tensor(steps).repeat_interleave(batch)
        c = self.chain.c[ks].to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            m_base = self.chain.mean(self.base, x, ks)
        u = (self.chain.mean(model, x, ks) - m_base) / c
        residual = u + c * torch.cat([adj[k] for k in steps])
        loss = residual.flatten(1).pow(2).sum(1).view(len(steps), batch).mean(0)
        kl = 0.5 * u.detach().flatten(1).double().pow(2).sum(1).view(len(steps), batch).sum(0) * (n / len(steps))
        return loss, kl
