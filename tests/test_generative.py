"""Paths, per-sample losses, solvers and seeded sampling, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from genmem.config import SamplerConfig
from genmem.generative import FlowMatching, VPDiffusion, generate, odesolve
from genmem.models import MLP


def _rotation_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # dx/dt = A x with A = [[0, 1], [-1, 0]] (plus a time-dependent scale): x(1) is known exactly.
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=x.dtype)
    return (1.0 + t[:, None]) * (x @ a.T)


def _exact(x0: torch.Tensor) -> torch.Tensor:
    # With scale (1 + t) the rotation angle is the integral of (1 + t) over [0, 1] = 1.5 radians.
    theta = 1.5
    rot = torch.tensor([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]], dtype=x0.dtype)
    return x0 @ rot.T


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for steps in (16, 32, 64):
        x1 = odesolve(_rotation_field, x0, torch.linspace(0, 1, steps + 1, dtype=torch.float64), method)
        errs.append((x1 - _exact(x0)).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    for r in ratios:  # halving the step divides the error by 2**order
        assert 2**order * 0.8 < r < 2**order * 1.25, (method, errs, ratios)


def test_dopri5_matches_the_closed_form_to_its_tolerance():
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x1 = odesolve(_rotation_field, x0, [0.0, 1.0], "dopri5", rtol=1e-9, atol=1e-9)
    assert (x1 - _exact(x0)).abs().max().item() < 1e-7


def _scaled_identity(x, t):
    return x * 2.0


def test_flow_matching_loss_equals_hand_computation():
    x1 = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]])
    x0 = torch.tensor([[0.5, -1.0], [2.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([0.25, 0.5, 1.0])
    losses = FlowMatching().loss(_scaled_identity, x0, x1, t)
    expected = []
    for i in range(3):
        xt = (1 - t[i]) * x0[i] + t[i] * x1[i]
        expected.append(((2.0 * xt - (x1[i] - x0[i])) ** 2).mean())
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.stack(expected))
    # Weights multiply per sample: the weighted mean is a dot product with the per-sample losses.
    w = torch.tensor([1.0, 0.0, 3.0])
    torch.testing.assert_close((w * losses).sum(), w[0] * expected[0] + w[2] * expected[2])


def test_diffusion_loss_equals_hand_computation():
    vp = VPDiffusion("cosine")
    x1 = torch.tensor([[1.0, -1.0], [0.3, 0.2]])
    eps = torch.tensor([[0.1, 0.2], [-0.5, 1.5]])
    t = torch.tensor([0.3, 0.9])
    losses = vp.loss(_scaled_identity, eps, x1, t)
    alpha, sigma = vp.alpha_sigma(t)
    for i in range(2):
        s = 1 - t[i].item()
        a = math.cos(0.5 * math.pi * (s + 0.008) / 1.008)
        assert alpha[i].item() == pytest.approx(a, rel=1e-6)
        assert sigma[i].item() == pytest.approx(math.sqrt(1 - a * a), rel=1e-6)
        xt = a * x1[i] + math.sqrt(1 - a * a) * eps[i]
        assert losses[i].item() == pytest.approx(((2.0 * xt - eps[i]) ** 2).mean().item(), rel=1e-5)


def test_ot_coupling_pairs_noise_with_nearest_data():
    fm = FlowMatching(ot_coupling=True)
    x1 = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])
    x0 = torch.tensor([[-9.0, 0.0], [9.0, 0.0]])
    torch.testing.assert_close(fm.couple(x0, x1), torch.tensor([[9.0, 0.0], [-9.0, 0.0]]))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5", "sde"])
def test_diffusion_samplers_recover_a_gaussian_with_the_exact_noise_predictor(schedule, method):
    # Data N(mu, s^2 I): E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2) exactly.
    mu, s = 2.0, 0.5
    vp = VPDiffusion(schedule)

    def eps_hat(x, t):
        a, sig = vp.alpha_sigma(t)
        return sig[:, None] * (x - a[:, None] * mu) / (a[:, None] ** 2 * s**2 + sig[:, None] ** 2)

    x = generate(eps_hat, vp, SamplerConfig(method=method, steps=128), (2,), range(4000), seed=0)
    assert x.mean().item() == pytest.approx(mu, abs=0.04)
    assert x.std().item() == pytest.approx(s, abs=0.03)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_sample_k_depends_only_on_seed_and_k(method):
    torch.manual_seed(0)
    net = MLP((3,), hidden=32, depth=2)
    cfg = SamplerConfig(method=method, steps=8)
    a = generate(net, FlowMatching(), cfg, (3,), range(64), seed=5, batch_size=7)
    b = generate(net, FlowMatching(), cfg, (3,), range(64), seed=5, batch_size=64)
    # Equal up to float reassociation in batch-size-dependent GEMM kernels.
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A subset of indices reproduces the same samples; another seed gives other ones.
    c = generate(net, FlowMatching(), cfg, (3,), [10, 40], seed=5, batch_size=2)
    torch.testing.assert_close(c, a[[10, 40]], rtol=0, atol=1e-5)
    d = generate(net, FlowMatching(), cfg, (3,), range(64), seed=6, batch_size=64)
    assert (d - b).abs().max() > 0.1


def test_sde_sampling_is_seeded_per_sample():
    torch.manual_seed(0)
    net = MLP((2,), hidden=16, depth=1)
    cfg = SamplerConfig(method="sde", steps=8)
    a = generate(net, VPDiffusion(), cfg, (2,), range(20), seed=1, batch_size=3)
    b = generate(net, VPDiffusion(), cfg, (2,), range(20), seed=1, batch_size=20)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)



def test_step_noise_of_a_sample_is_its_own_across_batches_and_blocks():
    """Each sample's step noise comes from its own generator in blocks of steps sized by the
    sample alone: the same values in any batch, across block ends, standard normal, in order."""
    from genmem.generative.sampling import StepNoise, sample_generators

    shape = (1024,)  # 64 steps per block: 150 steps cross two block ends
    whole = StepNoise(sample_generators(3, range(6)), shape, "cpu")
    assert whole.block == 64
    parts = [StepNoise(sample_generators(3, range(a, a + 2)), shape, "cpu") for a in (0, 2, 4)]
    steps = [whole(i) for i in range(150)]
    for i in range(150):
        assert torch.equal(steps[i], torch.cat([p(i) for p in parts]))
    z = torch.stack(steps)  # (150, 6, 1024)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1].item()) < 0.01  # steps independent
    with pytest.raises(ValueError, match="drawn in order"):
        whole(10)


class _Recorder(torch.nn.Module):
    """A network that records whether any of its modules was training while it was called."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Dropout(0.5)
        self.fail = fail
        self.training_during_call: list[bool] = []

    def forward(self, x, t):
        self.training_during_call.append(any(m.training for m in self.modules()))
        if self.fail:
            raise RuntimeError("boom")
        return self.frozen(self.inner(x))


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_generate_samples_in_eval_mode_and_gives_each_module_its_flag_back(fail):
    # Sampling inside a training loop must not leave the network in eval mode (dropout and norm
    # layers would silently stop training), nor switch on a part deliberately kept in eval.
    net = _Recorder(fail).train()
    net.frozen.eval()
    cfg = SamplerConfig(method="euler", steps=2)
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            generate(net, FlowMatching(), cfg, (2,), range(4), seed=0)
    else:
        generate(net, FlowMatching(), cfg, (2,), range(4), seed=0)
    assert net.training_during_call and not any(net.training_during_call)
    assert net.training and net.inner.training and not net.frozen.training
