"""Diffusion parameterisations (eps, v), the DDPM/DDIM samplers, the EDM time grid and clipping
of the denoised estimate, checked against closed forms: a Gaussian data distribution has an exact
denoiser, and every sampler driven by it must return that Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from genmem.config import DataConfig, SamplerConfig, TrainConfig
from genmem.data import load_dataset
from genmem.generative import FlowMatching, VPDiffusion, data_clip, generate, odesolve, time_grid
from genmem.generative.diffusion import ddim_step, ddpm_step
from genmem.metrics.outliers import out_of_range_fraction, range_warning
from genmem.models import MLP
from genmem.training import resolve_sampler

MU, S = 2.0, 0.5  # data N(MU, S^2 I)


def _exact(vp: VPDiffusion):
    """The exact network of ``vp.prediction`` for data N(MU, S^2 I):
    E[eps | x_t] = sigma (x_t - alpha MU) / (alpha^2 S^2 + sigma^2), E[v] = alpha E[eps] - sigma E[x1]."""

    def net(x, t):
        a, sig = (v[:, None] for v in vp.alpha_sigma(t))
        eps = sig * (x - a * MU) / (a**2 * S**2 + sig**2)
        return eps if vp.prediction == "eps" else a * eps - sig * (x - sig * eps) / a

    return net


def test_v_loss_equals_hand_computation():
    vp = VPDiffusion("cosine", prediction="v")
    x1 = torch.tensor([[1.0, -1.0], [0.3, 0.2]])
    eps = torch.tensor([[0.1, 0.2], [-0.5, 1.5]])
    t = torch.tensor([0.3, 0.9])
    losses = vp.loss(lambda x, t: torch.zeros_like(x), eps, x1, t)
    for i in range(2):
        a = math.cos(0.5 * math.pi * (1 - t[i].item() + 0.008) / 1.008)
        v = a * eps[i] - math.sqrt(1 - a * a) * x1[i]
        assert losses[i].item() == pytest.approx((v**2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoise_inverts_the_path_for_both_parameterisations(prediction):
    vp = VPDiffusion("cosine", prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x1, eps, t = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g), torch.rand(64, generator=g) * 0.9 + 0.05
    target = vp.path(eps, x1, t).target  # what a perfect network outputs at this x_t
    x1_hat, eps_hat = vp.denoise(lambda x, tt: target, vp.path(eps, x1, t).x_t, t)
    torch.testing.assert_close(x1_hat, x1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("method, steps", [("ddpm", 1000), ("ddim", 256), ("heun", 32), ("sde", 128)])
def test_samplers_recover_a_gaussian_with_the_exact_network(prediction, method, steps):
    vp = VPDiffusion("cosine", prediction=prediction)
    x = generate(_exact(vp), vp, SamplerConfig(method=method, steps=steps), (2,), range(4000), seed=0)
    assert x.mean().item() == pytest.approx(MU, abs=0.03)
    assert x.std().item() == pytest.approx(S, abs=0.015)


def test_ddpm_variance_deficit_shrinks_with_the_step_count():
    """DDPM steps to the posterior of x1 = E[x1 | x_t], not a draw from it, so it loses variance
    at coarse grids (Bao et al. 2022); the deficit must fall as the grid refines."""
    vp = VPDiffusion("cosine", prediction="v")
    gaps = [S - generate(_exact(vp), vp, SamplerConfig(method="ddpm", steps=n), (2,), range(4000), seed=0).std().item()
            for n in (16, 64, 256)]
    assert gaps[0] > gaps[1] > gaps[2] > -0.01 and gaps[2] < 0.03, gaps


def test_ddim_with_eta_one_is_the_ddpm_posterior_and_eta_zero_is_deterministic():
    torch.manual_seed(0)
    net = MLP((2,), hidden=32, depth=2)
    vp = VPDiffusion("cosine", prediction="v")
    ddpm = generate(net, vp, SamplerConfig(method="ddpm", steps=16), (2,), range(256), seed=3)
    ddim1 = generate(net, vp, SamplerConfig(method="ddim", eta=1.0, steps=16), (2,), range(256), seed=3)
    torch.testing.assert_close(ddim1, ddpm, rtol=1e-4, atol=1e-4)  # two formulas, one transition
    ddim0 = generate(net, vp, SamplerConfig(method="ddim", eta=0.0, steps=16), (2,), range(256), seed=3)
    assert (ddim0 - ddpm).abs().max() > 1e-2  # eta = 0 is another sampler
    # One step checked by hand: the posterior mean and variance of q(x_b | x_a, x1_hat).
    x, z = torch.randn(5, 2), torch.randn(5, 2)
    ta, tb = torch.tensor(0.4), torch.tensor(0.6)
    (a_a, s_a), (a_b, s_b) = vp.alpha_sigma(ta), vp.alpha_sigma(tb)
    x1_hat, _ = vp.denoise(net, x, ta.expand(5))
    a_ab, var_ab = a_a / a_b, s_a**2 - (a_a / a_b) ** 2 * s_b**2
    expected = (a_b * var_ab / s_a**2) * x1_hat + (a_ab * s_b**2 / s_a**2) * x + (var_ab * s_b**2 / s_a**2).sqrt() * z
    with torch.no_grad():
        torch.testing.assert_close(ddpm_step(vp, net, x, ta, tb, z), expected)
        torch.testing.assert_close(ddim_step(vp, net, x, ta, tb, 1.0, z), expected, rtol=1e-4, atol=1e-5)


def test_edm_grid_spaces_steps_evenly_in_ratio_to_the_one_over_rho():
    vp = VPDiffusion("cosine")
    t = time_grid(vp, 10, "edm", rho=7.0)
    assert t[0] == vp.t_start and t[-1] == vp.t_end and bool((t[1:] > t[:-1]).all())
    r = vp.noise_ratio(t[1:-1]) ** (1 / 7)  # interior points: equal steps in ratio^(1/rho)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1:] - r[:-1]).mean().expand(len(r) - 1), rtol=1e-6, atol=1e-7)
    flow = time_grid(FlowMatching(), 10, "edm")
    assert flow[0] == 0.0 and flow[-1] == 1.0 and bool((flow[1:] > flow[:-1]).all())
    # More steps where alpha is small and the drift (alpha'/alpha) stiff than a uniform grid puts there.
    assert (t < 0.1).sum() >= (time_grid(vp, 10) < 0.1).sum() + 3


@pytest.mark.parametrize("method", ["ddim", "ddpm", "heun", "sde"])
def test_clipping_bounds_what_a_biased_eps_network_generates_and_off_reproduces_the_old_sampler(method):
    def wild(x, t):  # a constant eps error: the denoised estimate is off by 2 sigma / alpha, ~200 at the start
        return torch.full_like(x, 2.0)

    vp = VPDiffusion("cosine", prediction="eps")
    loose = generate(wild, vp, SamplerConfig(method=method, steps=32, clip_denoised=None), (2,), range(500), seed=0)
    held = generate(wild, vp, SamplerConfig(method=method, steps=32, clip_denoised=1.0), (2,), range(500), seed=0)
    assert loose.abs().max() > 100 and out_of_range_fraction(loose, -1, 1) > 0.9
    assert held.abs().max() <= 1.05 and out_of_range_fraction(held, -1, 1) == 0.0


def test_eps_on_a_uniform_grid_without_clipping_is_the_sampler_genmem_had():
    def wild(x, t):
        return 3.0 * torch.tanh(x) + 0.5

    vp = VPDiffusion("cosine", prediction="eps")
    old = SamplerConfig(method="heun", steps=16, grid="uniform", clip_denoised=None)
    x = generate(wild, vp, old, (2,), range(50), seed=1)

    def old_velocity(x, t):
        _, sigma = vp.alpha_sigma(t)
        return vp.dlog_alpha(t)[:, None] * (x - wild(x, t) / sigma[:, None])

    from genmem.generative.sampling import _draw, sample_generators

    x0 = _draw(sample_generators(1, range(50)), (2,))
    ref = odesolve(old_velocity, x0, torch.linspace(vp.t_start, vp.t_end, 17, dtype=torch.float64), "heun")
    torch.testing.assert_close(x, ref.float())


def test_clip_auto_resolves_from_the_data_and_old_checkpoints_keep_their_sampler(tmp_path, storage):
    digits, _ = load_dataset(DataConfig(source="digits"))
    moons, _ = load_dataset(DataConfig(source="moons", n=200))
    assert data_clip(digits.x) == 1.0 and data_clip(moons.x) is None
    cfg = TrainConfig.model_validate({"process": {"kind": "diffusion"}, "data": {"source": "digits"}})
    assert resolve_sampler(cfg, digits).sampler.clip_denoised == 1.0
    assert resolve_sampler(cfg, moons).sampler.clip_denoised is None
    flow = TrainConfig.model_validate({"data": {"source": "digits"}})
    assert resolve_sampler(flow, digits).sampler.clip_denoised is None  # flow matching never clips
    # A checkpoint written before these settings existed samples as it always did.
    old = {k: v for k, v in cfg.model_dump(mode="json").items()}
    old["process"] = {k: v for k, v in old["process"].items() if k != "prediction"}
    old["sampler"] = {k: v for k, v in old["sampler"].items() if k not in ("grid", "clip_denoised")}
    saved = TrainConfig.from_saved(old)
    assert (saved.process.prediction, saved.sampler.grid, saved.sampler.clip_denoised) == ("eps", "uniform", None)


def test_out_of_range_fraction_and_its_warning():
    x = torch.tensor([-1.6, -1.4, 0.0, 1.49, 1.51, 3.0, 0.2, 0.3])
    assert out_of_range_fraction(x, -1.0, 1.0) == pytest.approx(3 / 8)  # beyond +-1.5
    assert range_warning(0.005, -1.0, 1.0) is None
    line = range_warning(3 / 8, -1.0, 1.0)
    assert line is not None and "37.5% of generated values lie outside [-1.5, 1.5]" in line and "\n" not in line


def test_the_score_of_a_v_network_is_that_of_the_equivalent_eps_network():
    from genmem.metrics.flipd import flow_score

    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    eps_vp, v_vp = VPDiffusion("cosine", prediction="eps"), VPDiffusion("cosine", prediction="v")
    for t in (0.3, 0.9):
        with torch.no_grad():
            a = flow_score(_exact(eps_vp), eps_vp, t)(x)
            b = flow_score(_exact(v_vp), v_vp, t)(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        alpha, sigma = (float(v) for v in eps_vp.alpha_sigma(torch.tensor([t])))
        # the score of the Gaussian marginal N(alpha MU, alpha^2 S^2 + sigma^2) at t
        torch.testing.assert_close(a, -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2), rtol=1e-4, atol=1e-4)
