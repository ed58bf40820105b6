"""Velocity fields known in closed form: bases with no training error, against which the
samplers and reward fine-tuning are checked (the exact tilt of a Gaussian by a linear reward is
again a Gaussian mixture)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GaussianMixtureFlow"]


class GaussianMixtureFlow(nn.Module):
    """The exact flow-matching velocity from N(0, I) noise to the mixture Σ_k w_k N(μ_k, Σ_k) on
    the straight path: v = Σ_k P(k | x_t) (μ_k + (t Σ_k - (1-t) I) C_k⁻¹ (x - t μ_k)), C_k =
    (1-t)² I + t² Σ_k (Cov(x1 - x0, x_t | k) C_k⁻¹ is the regression of x1 - x0 on x_t).
    A base with no training error, for checking fine-tuning against closed forms."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        super().__init__()
        self.register_buffer("log_w", torch.as_tensor(weights, dtype=torch.float64).log())
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("covs", torch.as_tensor(covs, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        xd, td = x.double(), t.double().view(-1, 1, 1, 1)  # (batch, mode, d, d)
        eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        C = (1 - td) ** 2 * eye + td**2 * self.covs  # (batch, mode, d, d)
        diff = xd[:, None, :] - td[..., 0, 0, None] * self.means  # (batch, mode, d)
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)
        v_k = self.means + ((td * self.covs - (1 - td) * eye) @ sol.unsqueeze(-1)).squeeze(-1)
        log_p = self.log_w - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(C)
        resp = torch.softmax(log_p, dim=1)
        return (resp.unsqueeze(-1) * v_k).sum(1).to(x.dtype)
