"""The Laplace posterior split over training-set shards: the shards' sums are the whole set's, and
on a Ray Train worker group of 2 (all-reduce over gloo) the curvature, gradient, HVP and a
Riemannian weight sample equal those of one process."""

from __future__ import annotations

import pytest
import torch

from genmem.generative import FlowMatching
from genmem.models import MLP
from genmem.posterior import LaplacePosterior, PosteriorObjective, diagonal_curvature


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_shards_with_the_whole_sets_draws_sum_to_the_whole_objective(kind):
    torch.manual_seed(0)
    net, x = MLP((2,), hidden=16, depth=1, time_dim=8), torch.randn(11, 2, generator=torch.Generator().manual_seed(1))
    options = {"subset": ["blocks.0.fc2.*", "out.*"], "draws": 3, "chunk_size": 5, "prior_precision": 0.0, "centre": False}
    whole = PosteriorObjective(net, FlowMatching(), x, **options)
    shards = [PosteriorObjective(net, FlowMatching(), x, shard=(r, 3), **options) for r in range(3)]
    assert [s.n_points for s in shards] == [4, 4, 3]
    theta = whole.theta_star + 0.05 * torch.randn(whole.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = torch.randn(whole.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g, hv = whole.grad_and_hvp(theta, v)
    parts = [s.grad_and_hvp(theta, v) for s in shards]
    assert _rel(sum(p[0] for p in parts), g) < 1e-10 and _rel(sum(p[1] for p in parts), hv) < 1e-10
    assert sum(s.value(theta) for s in shards) == pytest.approx(whole.value(theta), rel=1e-12)
    h = diagonal_curvature(whole, kind)
    assert _rel(sum(diagonal_curvature(s, kind) for s in shards), h) < 1e-10
    with pytest.raises(ValueError, match=r"shard \(rank, world\) = \(3, 3\) needs 0 <= rank < world"):
        PosteriorObjective(net, FlowMatching(), x, shard=(3, 3), **options)


@pytest.mark.slow
def test_two_workers_give_the_posterior_of_one_process(tmp_path, storage, ray_local):
    from genmem.checkpoint import load_checkpoint
    from genmem.config import ScalingConfig, TrainConfig
    from genmem.data import load_dataset
    from genmem.distributed.posterior import posterior_on_workers
    from genmem.training import LocalReporter, train_loop

    cfg = TrainConfig.model_validate({"data": {"source": "moons", "n": 400, "train_size": 24}, "model": {"hidden": 32, "depth": 2},
                                      "batch_size": 24, "images": 24 * 300, "ema_halflife_images": 0, "log_every_images": 24 * 300})
    checkpoint = str(train_loop(cfg, load_dataset(cfg.data)[0], LocalReporter(tmp_path / "base", cfg.images, quiet=True)).checkpoint)
    request = {"seed": 5, "method": "riemannian", "scale": 0.05}
    options = {"samples": [request], "laplace": {"draws": 4, "curvature": "ggn"}}
    two = posterior_on_workers(checkpoint, scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.9), **options)
    # one process, as genmem did before worker groups (and as one worker does)
    loaded = load_checkpoint(checkpoint)
    la = LaplacePosterior(loaded.model, FlowMatching(), load_dataset(cfg.data)[0].x, **options["laplace"]).fit()
    probe = torch.randn(la.theta_star.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g, hv = la.objective.grad_and_hvp(la.theta_star + 1e-3 * probe, probe)
    one = la.sample_one(**request)
    assert two["workers"] == 2 and two["points"] == 24
    for key, ref in (("curvature", la.curvature), ("grad", g), ("hvp", hv)):
        assert _rel(two[key], ref) < 1e-10, key
    moved = (one.theta - la.theta_star).norm()
    assert moved > 0 and (two["thetas"][0] - one.theta).norm() / moved < 1e-5  # within the solver's tolerance
    assert two["samples"][0]["n_grad"] == one.n_grad  # the same adaptive steps on every rank
    assert two["samples"][0]["loss"] == pytest.approx(one.loss, rel=1e-10)
