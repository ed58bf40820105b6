"""Residual MLP velocity network for vectors and 2-D data."""

from __future__ import annotations

import math

import torch
from torch import nn

from genmem.models.embedding import TimeEmbedding


class _Block(nn.Module):
    """Pre-norm residual block; the time embedding enters as a per-feature shift."""

    def __init__(self, width: int, time_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(time_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        z = nn.functional.silu(self.fc1(self.norm(h)) + self.time(temb))
        return h + self.fc2(self.drop(z))


class MLP(nn.Module):
    """v(x, t) for x of shape (batch, *shape); flattens, so any per-sample shape works.

    >>> net = MLP((2,), hidden=64, depth=2)
    >>> net(torch.zeros(5, 2), torch.rand(5)).shape
    torch.Size([5, 2])
    """

    def __init__(self, shape: tuple[int, ...], hidden: int = 256, depth: int = 3, time_dim: int = 64, dropout: float = 0.0):
        super().__init__()
        self.shape = tuple(shape)
        d = math.prod(self.shape)
        self.time = TimeEmbedding(time_dim)
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, time_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(0, *self.trunk(0, x, t))

    # A split of forward at block k (0 ≤ k ≤ depth): forward(x, t) = head(k, *trunk(k, x, t)). The
    # posterior's trunk cache computes trunk once when only head parameters are free.
    def split_points(self) -> list[tuple[int, list[str]]]:
        """Each split k with the parameter-name prefixes its head holds."""
        return [(k, [f"blocks.{i}." for i in range(k, len(self.blocks))] + ["out_norm.", "out."]) for k in range(len(self.blocks) + 1)]

    def trunk(self, k: int, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        temb = self.time(t)
        h = self.inp(x.flatten(1))
        for block in self.blocks[:k]:
            h = block(h, temb)
        return h, temb

    def head(self, k: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[k:]:
            h = block(h, temb)
        return self.out(nn.functional.silu(self.out_norm(h))).view(len(h), *self.shape)
