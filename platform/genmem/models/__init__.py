"""Networks with one contract: ``model(x, t)`` with t of shape (batch,) -> tensor shaped like x."""

from __future__ import annotations

from torch import nn

from genmem.config import ModelConfig
from genmem.models.mlp import MLP
from genmem.models.unet import UNet

__all__ = ["MLP", "UNet", "build_model", "count_parameters"]


def build_model(cfg: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    """The network described by ``cfg`` for samples of per-sample ``shape``."""
    if cfg.kind == "mlp":
        return MLP(shape, hidden=cfg.hidden, depth=cfg.depth, time_dim=cfg.time_dim, dropout=cfg.dropout)
    return UNet(
        shape,
        channels=cfg.channels,
        channel_mults=cfg.channel_mults,
        blocks_per_level=cfg.blocks_per_level,
        time_dim=cfg.time_dim,
        dropout=cfg.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
