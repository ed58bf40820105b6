"""A small U-Net for 1-3 channel images of 8-32 pixels (DDPM-style, without attention)."""

from __future__ import annotations

import torch
from torch import nn

from genmem.errors import ConfigError
from genmem.models.embedding import TimeEmbedding


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return h + self.skip(x)


class UNet(nn.Module):
    """v(x, t) for images x of shape (batch, C, H, W); H and W divisible by 2**(levels-1).

    >>> net = UNet((1, 8, 8), channels=16, channel_mults=[1, 2])
    >>> net(torch.zeros(3, 1, 8, 8), torch.rand(3)).shape
    torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        channels: int = 32,
        channel_mults: list[int] | tuple[int, ...] = (1, 2),
        blocks_per_level: int = 1,
        time_dim: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(shape) != 3 or shape[0] not in (1, 2, 3):
            raise ConfigError(f"the U-Net takes images of shape (C, H, W) with 1-3 channels, not {tuple(shape)}: use model.kind=mlp")
        c_in, h, w = shape
        factor = 2 ** (len(channel_mults) - 1)
        if h % factor or w % factor:
            raise ConfigError(f"image size {h}x{w} must be divisible by {factor} for {len(channel_mults)} U-Net levels: shorten model.channel_mults")
        self.shape = tuple(shape)
        self.time = TimeEmbedding(time_dim)
        self.inp = nn.Conv2d(c_in, channels, 3, padding=1)
        widths = [channels * m for m in channel_mults]

        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, width in enumerate(widths):
            for _ in range(blocks_per_level):
                self.down.append(_ResBlock(ch, width, time_dim, dropout))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([_ResBlock(ch, ch, time_dim, dropout), _ResBlock(ch, ch, time_dim, dropout)])

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(blocks_per_level + 1):
                self.up.append(_ResBlock(ch + skips.pop(), width, time_dim, dropout))
                ch = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, c_in, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(0, *self.trunk(0, x, t))

    # A split of forward before up-path layer k (0 ≤ k ≤ len(up)): forward(x, t) = head(k, *trunk(k, x, t)).
    # The trunk returns (h, temb, skips), where skips are only those the head's blocks concatenate.
    def split_points(self) -> list[tuple[int, list[str]]]:
        """Each split k with the parameter-name prefixes its head holds."""
        return [(k, [f"up.{i}." for i in range(k, len(self.up))] + ["out."]) for k in range(len(self.up) + 1)]

    def trunk(self, k: int, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        temb = self.time(t)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, _ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up[:k]:
            h = layer(torch.cat([h, hs.pop()], dim=1), temb) if isinstance(layer, _ResBlock) else layer(h)
        needed = sum(isinstance(layer, _ResBlock) for layer in self.up[k:])
        return (h, temb, *hs[len(hs) - needed :])

    def head(self, k: int, h: torch.Tensor, temb: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        for layer in self.up[k:]:
            h = layer(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(layer, _ResBlock) else layer(h)
        return self.out(h)
