"""Laplace posteriors over weights: HVPs against finite differences, curvature against the exact
diagonal, the geodesic solver against closed forms, and the Euclidean/Riemannian contrast."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq

from genmem.config import SamplerConfig
from genmem.generative import FlowMatching, VPDiffusion, generate
from genmem.models import MLP, UNet
from genmem.posterior import (
    GeodesicError,
    LaplacePosterior,
    PosteriorObjective,
    default_subset,
    diagonal_curvature,
    exponential_map,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: inter-op threading only adds overhead (and thrashes on a loaded 2-core box)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny(seed: int = 0, hidden: int = 16, depth: int = 1) -> MLP:
    torch.manual_seed(seed)
    return MLP((2,), hidden=hidden, depth=depth, time_dim=8)


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained by flow matching on 8 points of a 2-D toy, until it fits them."""
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    net = MLP((2,), hidden=32, depth=2, time_dim=16)
    fm = FlowMatching()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(400):
        x0, t, x1 = torch.randn(64, 2), torch.rand(64), x[torch.randint(0, 8, (64,))]
        loss = fm.loss(net, x0, x1, t).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, fm, x


# -- objective ---------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [FlowMatching(), VPDiffusion()], ids=["flow", "vp"])
def test_grad_and_hvp_match_finite_differences(process):
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    obj = PosteriorObjective(_tiny(), process, x, subset=["blocks.0.fc2.*", "out.*"], draws=3, chunk_size=4)
    gen = torch.Generator().manual_seed(2)
    theta = obj.theta_star + 0.1 * torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
    v = torch.randn(obj.num_params, generator=gen, dtype=torch.float64)
    eps = 1e-5
    fd_h = (obj.grad(theta + eps * v) - obj.grad(theta - eps * v)) / (2 * eps)
    hv = obj.hvp(theta, v)
    assert (hv - fd_h).norm() / hv.norm() < 1e-6
    fd_g = (obj.value(theta + eps * v) - obj.value(theta - eps * v)) / (2 * eps)
    assert obj.grad(theta).dot(v).item() == pytest.approx(fd_g, rel=1e-7)
    g, hv2 = obj.grad_and_hvp(theta, v)
    assert torch.allclose(hv2, hv) and torch.allclose(g, obj.grad(theta))
    # centring makes θ* stationary (METHODS.md), and the counters see every pass
    assert obj.grad(obj.theta_star).abs().max() < 1e-10
    assert (obj.n_grad, obj.n_hvp) == (6, 2)


def test_subset_selection_and_unknown_pattern():
    net = _tiny(depth=2)
    obj = PosteriorObjective(net, FlowMatching(), torch.randn(3, 2), draws=2)
    assert obj.names[0].startswith("blocks.1.") and obj.names[-1] == "out.bias" and "out_norm.weight" in obj.names
    unet = UNet((1, 8, 8), channels=8, channel_mults=[1, 2])
    pats = default_subset(unet)
    assert pats[0] == f"up.{len(unet.up) - 1}.*" and pats[1] == "out.*"
    with pytest.raises(ValueError, match=r"'head\.\*' matches no parameter.*blocks\.0\.fc1\.weight"):
        PosteriorObjective(net, FlowMatching(), torch.randn(3, 2), subset=["head.*"])


# -- curvature ---------------------------------------------------------------------------------
def test_curvature_backends_match_exact_references():
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    obj = PosteriorObjective(_tiny(), FlowMatching(), x, subset=["blocks.0.fc2.*", "out.*"], draws=3, chunk_size=5)
    th, d = obj.theta_star, 2

    # exact GGN: the full Jacobian of every output wrt the subset, diag(Jᵀ (2/D) J) / draws
    jac = torch.autograd.functional.jacobian(lambda t: obj.outputs(t, obj.inputs), th)
    exact = (2 / d) / obj.draws * jac.reshape(-1, th.numel()).pow(2).sum(0)
    assert torch.allclose(diagonal_curvature(obj, "ggn"), exact, rtol=1e-10, atol=1e-14)
    assert torch.allclose(diagonal_curvature(obj, "ggn", jacobian_budget=1), exact, rtol=1e-10, atol=1e-14)

    # empirical Fisher: Σ_i g_i² with g_i the gradient of training point i's loss, one at a time
    ef = torch.zeros_like(th)
    for i in range(len(x)):
        sl = slice(i * obj.draws, (i + 1) * obj.draws)
        t_ = th.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(obj.per_sample_loss(t_, tuple(a[sl] for a in obj.inputs), obj.targets[sl]).sum() / obj.draws, t_)
        ef += gi.pow(2)
    assert torch.allclose(diagonal_curvature(obj, "ef"), ef, rtol=1e-10, atol=1e-14)

    mc = diagonal_curvature(obj, "ggn_mc", mc_samples=400, generator=torch.Generator().manual_seed(0))
    assert (mc - exact).norm() / exact.norm() < 0.1
    with pytest.raises(ValueError, match="not one of ef, ggn, ggn_mc"):
        diagonal_curvature(obj, "kfac")


# -- geodesic solver ---------------------------------------------------------------------------
class _Flat:
    def grad(self, theta):
        return torch.zeros_like(theta)

    def hvp(self, theta, v):
        return torch.zeros_like(v)


class _SinCos:
    """L(θ) = sin(θ1) cos(θ2): an explicit surface with closed-form gradient and Hessian."""

    def grad(self, th):
        a, b = th
        return torch.stack([a.cos() * b.cos(), -a.sin() * b.sin()])

    def hvp(self, th, v):
        a, b = th
        hess = torch.stack([torch.stack([-a.sin() * b.cos(), -a.cos() * b.sin()]), torch.stack([-a.cos() * b.sin(), -a.sin() * b.cos()])])
        return hess @ v


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_geodesic_of_a_flat_loss_is_a_straight_line(solver):
    theta0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    res = exponential_map(_Flat(), theta0, v, solver=solver, steps=4, grid=torch.linspace(0, 1, 5))
    expected = theta0 + res.grid[:, None] * v
    assert torch.allclose(res.path[:, :3], expected, atol=1e-12) and torch.allclose(res.velocity, v)


def test_geodesic_conserves_speed_on_a_graph_surface_and_solvers_agree():
    surf, theta0 = _SinCos(), torch.tensor([0.3, -0.2], dtype=torch.float64)
    v = torch.tensor([1.5, 0.7], dtype=torch.float64)

    def speed(state):  # θ'ᵀ G θ' = |θ'|² + (g·θ')², G = I + g gᵀ
        g = surf.grad(state[:2])
        return state[2:].dot(state[2:]) + g.dot(state[2:]) ** 2

    rk4 = exponential_map(surf, theta0, v, solver="rk4", steps=400)
    dp = exponential_map(surf, theta0, v, solver="dopri5", rtol=1e-10, atol=1e-12, grid=torch.linspace(0, 1, 11))
    for res in (rk4, dp):
        speeds = torch.stack([speed(s) for s in res.path])
        assert (speeds - speeds[0]).abs().max() / speeds[0] < 1e-8
    assert torch.allclose(rk4.theta, dp.theta, atol=1e-8)
    assert (rk4.theta - (theta0 + v)).norm() > 0.05  # the surface bends it away from the straight line
    assert 0 < dp.n_rhs < rk4.n_rhs == 1600


def test_geodesic_failures_name_the_step_reached():
    surf, theta0 = _SinCos(), torch.tensor([0.3, -0.2], dtype=torch.float64)
    with pytest.raises(GeodesicError, match=r"at s = .* after 5 gradient\+HVP evaluations \(more than max_evals = 5.*use solver='dopri5'"):
        exponential_map(surf, theta0, torch.tensor([1.5, 0.7], dtype=torch.float64), max_evals=5)

    class Blowup(_Flat):  # a curvature that explodes: RK4 with one huge step goes non-finite
        def grad(self, th):
            return th.exp()

        def hvp(self, th, v):
            return th.exp() * v

    with pytest.raises(GeodesicError, match=r"rk4 solve failed at step 1 of 1 .*non-finite.*lower the scale"):
        exponential_map(Blowup(), torch.zeros(2, dtype=torch.float64), torch.full((2,), 1e3, dtype=torch.float64), solver="rk4", steps=1)


# -- the posterior -----------------------------------------------------------------------------
def test_riemannian_samples_stay_on_the_low_loss_region(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, curvature="ggn", draws=8).fit()
    e = [la.sample_one(s, method="euclidean", scale=0.1) for s in range(3)]
    r = [la.sample_one(s, method="riemannian", scale=0.1) for s in range(3)]
    e_up = sum(s.loss_increase for s in e) / 3
    r_up = sum(s.loss_increase for s in r) / 3
    # at this scale Euclidean noise visibly raises the loss; the geodesic with the same v much less
    assert e_up > 0.5 * la.loss_star()
    assert r_up < 0.5 * e_up
    assert all(s.n_grad == s.n_hvp > 10 for s in r) and all(s.n_grad == s.n_hvp == 0 for s in e)
    assert torch.allclose(e[0].theta - la.theta_star, la.initial_velocity(e[0].seed, 0.1), atol=1e-12)


def test_a_forward_difference_of_gradients_gives_the_geodesic_of_the_hvp(trained):
    """θ'ᵀ∇²L θ' from two gradients instead of a gradient and an HVP: the same endpoint to the
    solver's tolerance, with no HVP spent."""
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, curvature="ggn", draws=4).fit()
    exact = la.sample_one(1, method="riemannian", scale=0.1, rtol=1e-6, atol=1e-8)
    fd = la.sample_one(1, method="riemannian", scale=0.1, rtol=1e-6, atol=1e-8, second_derivative="fd")
    step = (exact.theta - la.theta_star).norm()
    assert (fd.theta - exact.theta).norm() < 1e-4 * step
    assert fd.n_hvp == 0 and fd.n_grad % 2 == 0 and abs(fd.n_grad // 2 - exact.n_grad) <= 0.1 * exact.n_grad
    with pytest.raises(ValueError, match="second_derivative 'bfgs' is not one of hvp, fd"):
        la.sample_one(1, method="riemannian", scale=0.1, second_derivative="bfgs")


def test_the_linearised_arm_bends_on_the_gauss_newton_model_without_a_data_pass(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, curvature="ggn", draws=8).fit()
    prec, star = la.posterior_precision, la.theta_star
    e = [la.sample_one(s, method="euclidean", scale=0.1) for s in range(3)]
    lin = [la.sample_one(s, method="linearised", scale=0.1) for s in range(3)]
    assert all(s.n_grad == s.n_hvp == 0 for s in lin)
    for a, b in zip(lin, e):
        # the geodesic of the quadratic model keeps its speed in G but ends lower on the model than θ* + v
        assert 0.5 * (prec * (a.theta - star) ** 2).sum() < 0.7 * 0.5 * (prec * (b.theta - star) ** 2).sum()
    # and lower on the true loss too
    assert sum(s.loss_increase for s in lin) < 0.7 * sum(s.loss_increase for s in e)


def test_prior_precision_maximises_the_laplace_evidence(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, curvature="ef", draws=4).fit()
    grid = torch.logspace(-3, 3, 601, dtype=torch.float64)
    alpha = la.optimize_prior_precision(grid)
    # closed-form stationarity: d/dα log p(D|α) = −||θ*||²/2 + P/(2α) − ½ Σ 1/(H + α) = 0
    h, sq, p = la.curvature, float(la.theta_star.dot(la.theta_star)), la.theta_star.numel()
    root = brentq(lambda a: -sq / 2 + p / (2 * a) - 0.5 * float((1 / (h + a)).sum()), 1e-3, 1e3)
    assert math.log(alpha) == pytest.approx(math.log(root), abs=0.02)
    assert la.prior_precision == alpha and torch.allclose(la.posterior_precision, h + alpha)


def test_samples_are_seeded_and_apply_generates_reproducibly(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, draws=4).fit()
    a = la.sample(2, method="euclidean", scale=0.1, generator=torch.Generator().manual_seed(5))
    b = la.sample(2, method="euclidean", scale=0.1, generator=torch.Generator().manual_seed(5))
    assert [s.seed for s in a] == [s.seed for s in b] and all(torch.equal(s.theta, t.theta) for s, t in zip(a, b))
    assert not torch.equal(a[0].theta, a[1].theta)
    r1, r2 = la.sample_one(a[0].seed, scale=0.1), la.sample_one(a[0].seed, scale=0.1)
    assert torch.equal(r1.theta, r2.theta) and r1.method == "riemannian"

    sampler = SamplerConfig(method="euler", steps=8)
    imgs = [generate(la.apply(r), fm, sampler, (2,), range(16), seed=3) for r in (r1, r2)]
    assert torch.equal(imgs[0], imgs[1])
    assert not torch.equal(imgs[0], generate(net, fm, sampler, (2,), range(16), seed=3))
    applied, original = dict(la.apply(r1).named_parameters()), dict(net.named_parameters())
    for name, p in original.items():
        assert torch.equal(applied[name], p) == (name not in la.subset)


def test_state_dict_round_trip_and_mismatch(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, draws=2, prior_precision=3.0).fit()
    other = LaplacePosterior(net, fm, x, draws=2)
    other.load_state_dict(la.state_dict())
    assert other.prior_precision == 3.0 and torch.equal(other.posterior_precision, la.posterior_precision)
    with pytest.raises(ValueError, match="fitted on subset"):
        LaplacePosterior(net, fm, x, draws=2, subset=["out.*"]).load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="class 'KFACLaplace' cannot be loaded"):
        other.load_state_dict({**la.state_dict(), "class": "KFACLaplace"})


def test_bad_scale_and_unfitted_posterior(trained):
    net, fm, x = trained
    la = LaplacePosterior(net, fm, x, draws=2)
    with pytest.raises(RuntimeError, match="call fit"):
        la.sample(1, scale=0.1)
    la.fit()
    for scale in (0.0, -1.0):
        with pytest.raises(ValueError, match="scale must be positive"):
            la.sample(1, scale=scale)
    with pytest.raises(GeodesicError, match="more than max_evals = 3"):
        la.sample(1, scale=0.1, max_evals=3)
