"""What every generative process offers: a path, a per-sample loss, and a sampling velocity."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        raise NotImplementedError

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, model):
        raise NotImplementedError
