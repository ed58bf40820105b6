"""How spread out a set of samples is: a mode-collapse and reward-hacking check beside
precision/recall."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pairwise_distance"]


def pairwise_distance(x: Tensor, max_points: int = 2000) -> float:
    """Mean pairwise Euclidean distance of up to ``max_points`` samples (a diversity measure)."""
    x = x[:max_points].flatten(1).double()
    n = len(x)
    return float(torch.pdist(x).mean()) if n > 1 else math.nan
