"""The frozen-trunk cache changes nothing but cost: with the draws fixed and only the last blocks
free, the objective runs through the head alone on a cached trunk state, and every value,
gradient, HVP, curvature and Riemannian endpoint equals the whole network's, on the MLP and the
U-Net."""

from __future__ import annotations

import pytest
import torch

from genmem.errors import ConfigError
from genmem.generative import FlowMatching, build_process
from genmem.config import ProcessConfig
from genmem.models import MLP, UNet
from genmem.posterior import LaplacePosterior, PosteriorObjective, diagonal_curvature
from genmem.posterior.objective import default_subset, trunk_split


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _mlp():
    torch.manual_seed(0)
    return MLP((2,), hidden=16, depth=3, time_dim=8), torch.randn(12, 2, generator=torch.Generator().manual_seed(1))


def _unet():
    torch.manual_seed(0)
    return UNet((1, 8, 8), channels=8, channel_mults=[1, 2], time_dim=16), torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("net_and_x, process", [(_mlp, FlowMatching()), (_unet, build_process(ProcessConfig(kind="diffusion")))],
                         ids=["mlp-flow", "unet-diffusion"])
def test_the_trunk_cache_changes_nothing_but_cost(net_and_x, process):
    net, x = net_and_x()
    options = {"draws": 2, "chunk_size": 8, "prior_precision": 0.5, "seed": 4}
    cached = LaplacePosterior(net, process, x, curvature="ggn", **options)
    whole = LaplacePosterior(net, process, x, curvature="ggn", **options, trunk_cache=False)
    assert whole.objective.split is None
    # the default subset is the last block and head: the split is the latest one (nothing before it runs)
    assert cached.objective.split == max(k for k, _ in net.split_points()) - 1
    obj, ref = cached.objective, whole.objective
    gen = torch.Generator().manual_seed(2)
    theta = obj.theta_star + 0.02 * torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
    v = torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
    assert obj.value(theta) == pytest.approx(ref.value(theta), rel=1e-12)
    for a, b in zip(obj.grad_and_hvp(theta, v), ref.grad_and_hvp(theta, v)):
        assert _rel(a, b) < 1e-10
    for kind in ("ef", "ggn"):
        assert _rel(diagonal_curvature(obj, kind), diagonal_curvature(ref, kind)) < 1e-10, kind
    cached.fit(), whole.fit()
    a = cached.sample_one(9, method="riemannian", scale=0.05, rtol=1e-4, atol=1e-6)
    b = whole.sample_one(9, method="riemannian", scale=0.05, rtol=1e-4, atol=1e-6)
    step = (b.theta - whole.theta_star).norm()
    assert step > 1e-2  # the sample moved, so agreement is not trivial
    assert (a.theta - b.theta).norm() < 1e-4 * step
    assert a.n_grad == b.n_grad  # the same adaptive steps


def test_the_split_is_the_latest_that_holds_every_free_weight():
    net, _ = _mlp()
    assert trunk_split(net, ["out.weight", "out.bias"]) == 3
    assert trunk_split(net, ["blocks.1.fc1.weight", "out.bias"]) == 1
    assert trunk_split(net, ["inp.weight", "out.bias"]) is None  # the first layer is free: nothing to cache
    assert trunk_split(torch.nn.Linear(2, 2), ["weight"]) is None  # a network without split points
    unet, _ = _unet()
    assert trunk_split(unet, [n for n, _ in unet.named_parameters() if n.startswith(("up.", "out."))]) == 0
    # a subset reaching into the network's first layers: the whole network runs, with the same result
    obj = PosteriorObjective(net, FlowMatching(), torch.randn(4, 2), subset=["inp.*"] + default_subset(net), draws=2)
    assert obj.split is None and len(obj.inputs) == 2


def test_a_subset_that_leaves_nothing_free_is_refused():
    net, x = _mlp()
    with pytest.raises(ConfigError, match="the posterior subset is empty, which leaves no weight of MLP free"):
        PosteriorObjective(net, FlowMatching(), x, subset=[])
