"""Sinusoidal time embedding shared by every network."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """t in [0, 1], shape (batch,) -> features of shape (batch, dim).

    Sinusoids at geometrically spaced frequencies (Vaswani et al. 2017), then a two-layer MLP.
    t is scaled by 1000 so the low frequencies resolve the small t that matter near data.
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding width {dim} must be even")
        self.dim = dim
        out_dim = out_dim or dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)
