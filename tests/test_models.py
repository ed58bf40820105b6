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


@pytest.mark.parametrize("shape, cfg", [((6,), ModelConfig(kind="mlp", hidden=16, depth=3, time_dim=8)),
                                        ((1, 8, 8), ModelConfig(kind="unet", channels=8, channel_mults=[1, 2], time_dim=16))],
                         ids=["mlp", "unet"])
def test_every_split_point_recomposes_the_forward_pass(shape, cfg):
    """The posterior's trunk cache relies on forward(x, t) = head(k, *trunk(k, x, t)) at every k,
    and on the head holding exactly the parameters its prefixes name."""
    torch.manual_seed(0)
    net = build_model(cfg, shape).double()
    x, t = torch.randn(3, *shape, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    whole = net(x, t)
    names = [n for n, _ in net.named_parameters()]
    for k, prefixes in net.split_points():
        assert torch.allclose(net.head(k, *net.trunk(k, x, t)), whole, rtol=0, atol=1e-12), k
        # the head's parameters are the ones whose perturbation changes head(k, ·) on a fixed trunk state
        state = tuple(a.detach() for a in net.trunk(k, x, t))
        params = dict(net.named_parameters())
        grads = torch.autograd.grad(net.head(k, *state).sum(), list(params.values()), allow_unused=True)
        used = {n for n, g in zip(params, grads) if g is not None}
        assert used == {n for n in names if n.startswith(tuple(prefixes))}, k
