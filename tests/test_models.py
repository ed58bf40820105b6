"""Every network honours model(x, t) -> tensor shaped like x, built from a typed config."""

from __future__ import annotations

import pytest
import torch

from genmem.config import ModelConfig
from genmem.models import build_model, count_parameters


@pytest.mark.parametrize(
    "shape, cfg",
    [
        ((2,), ModelConfig(kind="mlp", hidden=32, depth=2)),
        ((16,), ModelConfig(kind="mlp", hidden=32, depth=1)),
        ((1, 8, 8), ModelConfig(kind="unet", channels=16)),
        ((3, 16, 16), ModelConfig(kind="unet", channels=8, channel_mults=[1, 2, 2])),
        ((1, 28, 28), ModelConfig(kind="unet", channels=8, channel_mults=[1, 2, 2])),
        ((3, 32, 32), ModelConfig(kind="unet", channels=8, channel_mults=[1, 2, 2, 2])),
    ],
)
def test_model_contract(shape, cfg):
    net = build_model(cfg, shape)
    x = torch.randn(3, *shape)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0
    # the time input matters
    assert not torch.allclose(net(x, torch.zeros(3)), net(x, torch.ones(3)))


def test_unet_refuses_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model(ModelConfig(kind="unet", channel_mults=[1, 2, 2]), (1, 10, 10))
    with pytest.raises(ValueError, match="use model.kind=mlp"):
        build_model(ModelConfig(kind="unet"), (2,))
