"""Reward fine-tuning by adjoint matching, checked against closed forms: an analytic base (the
exact flow from N(0, I) to a Gaussian or a Gaussian mixture, so no training error hides
anything), a linear reward, and the exact tilted targets of METHODS.md."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genmem.config import SamplerConfig
from genmem.generative import FlowMatching, VPDiffusion, generate
from genmem.generative.analytic import GaussianMixtureFlow
from genmem.methods.finetune import (
    DIVERGENCES,
    AdjointMatching,
    FinetuneObjective,
    Linear,
    Memoryless,
    Surrogate,
    check_reward,
    divergence,
    normaliser,
    tilt_weights,
)
from genmem.training import Batch

MU = torch.tensor([[0.0, 0.0]])
SIGMA = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]])
A = torch.tensor([1.0, 0.0])


def gaussian(shift: torch.Tensor | None = None) -> GaussianMixtureFlow:
    return GaussianMixtureFlow(torch.tensor([1.0]), MU + (0 if shift is None else shift), SIGMA)


def _noise(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), lambda k: torch.randn(n, 2, generator=g)


class Residual(nn.Module):
    """The fine-tuned model: the analytic base plus a small network whose output starts at 0."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.delta = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
        nn.init.zeros_(self.delta[-1].weight)
        nn.init.zeros_(self.delta[-1].bias)

    def forward(self, x, t):
        return self.base(x, t) + self.delta(torch.cat([x, t[:, None].to(x.dtype)], 1))


def finetune(reward, alpha: float, *, steps: int = 20, iters: int = 250, seed: int = 0) -> tuple[Residual, AdjointMatching]:
    torch.manual_seed(seed)
    base = gaussian()
    model, chain = Residual(base), Memoryless(FlowMatching(), steps)
    am = AdjointMatching(chain, base, reward, alpha)
    opt = torch.optim.Adam(model.delta.parameters(), lr=2e-3)
    for i in range(iters):
        noise0, noise = _noise(256, 1000 * seed + i)
        loss = am.loss(model, noise0, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, am


def chain_samples(am: AdjointMatching, model: nn.Module, n: int = 20_000, seed: int = 99) -> torch.Tensor:
    noise0, noise = _noise(n, seed)
    return am.chain.sample(model, noise0, noise)[1]


def test_the_analytic_base_carries_noise_to_its_gaussian_mixture():
    weights, means, covs = torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.stack([0.2 * torch.eye(2), SIGMA[0] * 0.3])
    x = generate(GaussianMixtureFlow(weights, means, covs), FlowMatching(), SamplerConfig(method="heun", steps=16), (2,), range(5000), seed=0)
    right = x[:, 0] > 0
    assert right.float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert torch.allclose(x[right].mean(0), means[1], atol=0.04)
    assert torch.allclose(torch.cov(x[right].T), covs[1], atol=0.04)
    assert torch.allclose(torch.cov(x[~right].T), covs[0], atol=0.04)


def test_the_memoryless_chain_ends_at_the_base_distribution():
    am = AdjointMatching(Memoryless(FlowMatching(), 40), gaussian(), Linear(A), 1.0)
    x = chain_samples(am, am.base)
    assert torch.allclose(x.mean(0), MU[0], atol=0.03)
    assert torch.allclose(torch.cov(x.T), SIGMA[0], atol=0.04)
    vp = Memoryless(VPDiffusion(), 16)  # DDPM's ancestral steps, every one stochastic (σ > 0 at t = 1)
    assert (vp.c > 0).all()


def test_lean_adjoint_gives_the_transitions_of_the_exactly_tilted_flow():
    """Linear reward on a Gaussian base: the target m_base - c² ã of every step equals the step
    of the exact flow to N(μ + Σa/α, Σ) up to discretisation (the sign convention's check: the
    opposite sign misses by twice the shift)."""
    alpha = 0.5
    chain = Memoryless(FlowMatching(), 200)
    am = AdjointMatching(chain, gaussian(), Linear(A), alpha)
    noise0, noise = _noise(300, 0)
    states, x1 = chain.sample(am.base, noise0, noise)
    adj = am.lean_adjoint(states, x1)
    tilted = gaussian((SIGMA[0] @ A / alpha)[None])
    for k in (0, 50, 100, 150, 199):
        base_step, exact = chain.mean(am.base, states[k], k), chain.mean(tilted, states[k], k)
        shift = (exact - base_step).norm(dim=1).mean()
        error = (base_step - chain.c[k].item() ** 2 * adj[k] - exact).norm(dim=1).mean()
        assert error < 0.06 * shift, (k, error, shift)


class GaussianEps(nn.Module):
    """The exact eps-prediction of VP diffusion for data N(m, S): E[x0 | x_t] = σ_t C⁻¹ (x - α_t m),
    C = α_t² S + σ_t² I."""

    def __init__(self, m: torch.Tensor, S: torch.Tensor):
        super().__init__()
        self.m, self.S, self.vp = m.double(), S.double(), VPDiffusion()

    def forward(self, x, t):
        alpha, sigma = self.vp.alpha_sigma(t.double())
        C = alpha[:, None, None] ** 2 * self.S + sigma[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64)
        r = torch.linalg.solve(C, (x.double() - alpha[:, None] * self.m).unsqueeze(-1)).squeeze(-1)
        return (sigma[:, None] * r).to(x.dtype)


def test_the_vp_chain_is_ddpm_and_its_lean_adjoint_tilts_it_exactly():
    """VP diffusion's memoryless chain (DDPM, η = 1) with the exact eps network of a Gaussian:
    it ends at the Gaussian, and the adjoint-matching targets are the steps of the exactly
    tilted network's chain."""
    alpha = 1.0
    chain = Memoryless(VPDiffusion(), 100)
    base, tilted = GaussianEps(MU[0], SIGMA[0]), GaussianEps(SIGMA[0] @ A / alpha, SIGMA[0])
    am = AdjointMatching(chain, base, Linear(A), alpha)
    noise0, noise = _noise(20_000, 0)
    states, x1 = chain.sample(base, noise0, noise)
    # DDPM plugs in the posterior mean of x1: 100 steps leave the variance ~5% short (0.96, 0.94 measured)
    assert torch.allclose(x1.mean(0), MU[0], atol=0.03) and torch.allclose(torch.cov(x1.T), SIGMA[0], atol=0.08)
    adj = am.lean_adjoint([s[:300] for s in states], x1[:300])
    # relative error measured 0.001, 0.02, 0.043, 0.17 at these steps; 4x the steps divide it by ~4
    for k, tolerance in ((0, 0.02), (30, 0.05), (60, 0.1), (90, 0.25)):
        x = states[k][:300]
        base_step, exact = chain.mean(base, x, k), chain.mean(tilted, x, k)
        shift = (exact - base_step).norm(dim=1).mean()
        error = (base_step - chain.c[k].item() ** 2 * adj[k] - exact).norm(dim=1).mean()
        assert error < tolerance * shift, (k, error, shift)


def test_the_optimal_control_reaches_the_exact_tilt():
    """Steering the base chain by u = -c ã (the adjoint is the same for every path here) gives
    samples of p* = N(μ + Σa/α, Σ) and a path KL of aᵀΣa/(2α²)."""
    alpha, n = 1.0, 20_000
    chain = Memoryless(FlowMatching(), 50)
    am = AdjointMatching(chain, gaussian(), Linear(A), alpha)
    noise0, noise = _noise(n, 3)
    states, x1 = chain.sample(am.base, noise0, noise)
    adj = [a[0] for a in am.lean_adjoint(states, x1)]
    g = torch.Generator().manual_seed(4)
    x, kl = chain.start(torch.randn(n, 2, generator=g)), 0.0
    for k in range(chain.steps):
        c = chain.c[k].item()
        x = chain.mean(am.base, x, k) - c**2 * adj[k] + c * torch.randn(n, 2, generator=g)
        kl += 0.5 * (c * adj[k]).pow(2).sum().item()
    assert torch.allclose(x.mean(0), SIGMA[0] @ A / alpha, atol=0.03)
    assert torch.allclose(torch.cov(x.T), SIGMA[0], atol=0.04)
    assert kl == pytest.approx(0.5 * (A @ SIGMA[0] @ A).item() / alpha**2, rel=0.05)


def test_on_a_mixture_base_the_exact_tilt_is_the_fixed_point_of_adjoint_matching():
    """Base Σ w_k N(μ_k, Σ_k), reward aᵀx: p* is the mixture with weights ∝ w_k exp(aᵀμ_k/α +
    aᵀΣ_k a/(2α²)) and means μ_k + Σ_k a/α, and, the chain being memoryless, the optimal
    fine-tuned velocity is p*'s own flow velocity. Its chain samples p*'s mode weights, and the
    adjoint-matching target on its own trajectories is its control: the residual u + c ã has
    mean ~0 at every step and no correlation with u. The base drift is not linear here, so this
    checks the lean adjoint's VJPs; flipping its sign or dropping them fails by far."""
    alpha, n, steps = 1.0, 20_000, 32
    weights, means = torch.tensor([0.5, 0.5]), torch.tensor([[-1.5, 0.0], [1.5, 0.5]])
    covs, a = torch.stack([0.25 * torch.eye(2), torch.tensor([[0.3, 0.1], [0.1, 0.2]])]), torch.tensor([0.5, 0.25])
    b = a / alpha
    tilted = torch.softmax(weights.log() + means @ b + torch.einsum("i,kij,j->k", b, covs, b) / 2, 0)
    optimum = GaussianMixtureFlow(tilted, means + covs @ b, covs)
    am = AdjointMatching(Memoryless(FlowMatching(), steps), GaussianMixtureFlow(weights, means, covs), Linear(a), alpha)
    traj = am.rollout(optimum, *_noise(n, 5), kl=False)
    right = traj.x1[:, 0] > 0
    assert tilted[1].item() == pytest.approx(0.838, abs=0.001)  # from 0.5: the closed form moves mass
    assert right.float().mean().item() == pytest.approx(tilted[1].item(), abs=0.015)
    assert torch.allclose(traj.x1[right].mean(0), means[1] + covs[1] @ b, atol=0.03)

    def residual_stats(adj: list[torch.Tensor]) -> tuple[float, float]:
        worst, cross, norm = 0.0, 0.0, 0.0
        for k in range(steps):
            u = am.control(optimum, traj.states[k], k).double()
            r = u + float(am.chain.c[k]) * adj[k].double()
            worst = max(worst, (r.mean(0).norm() / u.pow(2).sum(1).mean().sqrt()).item())
            cross, norm = cross + (r * u).sum(1).mean().item(), norm + u.pow(2).sum(1).mean().item()
        return worst, cross / norm

    adj = am.lean_adjoint(traj.states, traj.x1)
    worst, correlation = residual_stats(adj)
    assert worst < 0.15 and abs(correlation) < 0.15, (worst, correlation)  # measured 0.078, 0.038
    assert residual_stats([-x for x in adj])[1] > 1.5  # the sign convention public code disagrees on
    assert residual_stats([adj[-1]] * steps)[0] > 2  # no VJP: the terminal adjoint at every step


@pytest.mark.slow
def test_adjoint_matching_fine_tunes_the_gaussian_to_the_kl_target():
    alpha = 1.0
    model, am = finetune(Linear(A), alpha)
    x = chain_samples(am, model)
    assert torch.allclose(x.mean(0), SIGMA[0] @ A / alpha, atol=0.06), x.mean(0)
    assert torch.allclose(torch.cov(x.T), SIGMA[0], atol=0.08), torch.cov(x.T)
    noise0, noise = _noise(4000, 7)
    kl = am.rollout(model, noise0, noise).kl.mean().item()
    assert kl == pytest.approx(0.5 * (A @ SIGMA[0] @ A).item() / alpha**2, abs=0.08)
    # the fine-tuned network is a velocity model: the ODE sampler goes to the tilted law too
    ode = generate(model, FlowMatching(), SamplerConfig(method="heun", steps=32), (2,), range(20_000), seed=1)
    assert torch.allclose(ode.mean(0), SIGMA[0] @ A / alpha, atol=0.1), ode.mean(0)


@pytest.mark.slow
def test_large_alpha_keeps_the_base_and_smaller_alpha_moves_further_toward_the_reward():
    from genmem.metrics.two_d import mmd_rbf

    means = {}
    for alpha in (10.0, 0.5):
        model, am = finetune(Linear(A), alpha)
        x = chain_samples(am, model, n=4000)
        means[alpha] = x.mean(0)
        if alpha == 10.0:
            assert mmd_rbf(x, chain_samples(am, am.base, n=4000, seed=98), bandwidth=1.0) < 0.01
    assert torch.allclose(means[0.5], SIGMA[0] @ A / 0.5, atol=0.15), means  # the exact tilt: (2, 1)
    assert torch.allclose(means[10.0], SIGMA[0] @ A / 10.0, atol=0.05), means
    assert (means[0.5] @ A) > (means[10.0] @ A) + 1.5


@pytest.mark.slow
def test_a_class_reward_on_digits_trades_diversity_for_reward_as_alpha_falls(tmp_path, trained_base):
    """Digits, r = log p(3 | x) under the dataset's classifier, fixed seeds: the mean reward rises
    and the samples' diversity falls as α falls (α = 1 is the class-conditional p(x | 3))."""
    from genmem.checkpoint import load_checkpoint
    from genmem.config import TrainConfig
    from genmem.data import load_dataset
    from genmem.generative import build_process
    from genmem.methods.finetune import ClassLogProb
    from genmem.metrics.diversity import pairwise_distance
    from genmem.metrics.features import ClassifierFeatures
    from genmem.training import LocalReporter, train_loop

    torch.set_num_threads(2)
    tree = {"data": {"source": "digits"}, "model": {"kind": "mlp", "hidden": 256, "depth": 3}, "sampler": {"method": "heun", "steps": 16},
            "optim": {"lr": 0.002, "warmup_images": 5000}, "batch_size": 128, "images": 100_000, "ema_halflife_images": 10_000,
            "log_every_images": 100_000, "seed": 0}
    cfg = TrainConfig.model_validate(tree)
    train, _ = load_dataset(cfg.data)
    base_path = trained_base(tree)  # the unlearning tests' digits base too
    clf = ClassifierFeatures.fit(train.x, train.labels, seed=0)
    reward = ClassLogProb(nn.Sequential(clf.net.body, clf.net.head), 3)
    # 3,200 images a fine-tune, measured: reward -4.23 < -0.88 < -0.28 and diversity 5.19 > 4.73 > 4.39 at α = 4, 1, 1/4
    # (6,400 images gave -3.76 < -0.60 < -0.15 and 5.14 > 4.65 > 4.49: the same order, at twice the time).
    tuned = TrainConfig.model_validate({**tree, "images": 3200, "batch_size": 64, "optim": {"lr": 3e-4, "warmup_images": 0},
                                        "ema_halflife_images": 0, "log_every_images": 3200})
    out = {}
    for alpha in (4.0, 1.0, 0.25):
        base = load_checkpoint(base_path)
        objective = FinetuneObjective(Memoryless(build_process(cfg.process), 20), base.model, reward, alpha, 64, seed=0, loss_steps=6)
        result = train_loop(tuned, train, LocalReporter(tmp_path / f"a{alpha}", tuned.images, quiet=True), objective=objective,
                            init=load_checkpoint(base_path, use_ema=False))
        x = generate(load_checkpoint(result.checkpoint).model, build_process(cfg.process), cfg.sampler, (1, 8, 8), range(500), seed=1)
        out[alpha] = (reward(x).mean().item(), pairwise_distance(x))
    rewards, diversity = [out[a][0] for a in (4.0, 1.0, 0.25)], [out[a][1] for a in (4.0, 1.0, 0.25)]
    assert rewards[0] < rewards[1] < rewards[2], out
    assert diversity[0] > diversity[1] > diversity[2], out


@pytest.mark.slow
def test_chi2_fine_tuning_reaches_its_own_target_not_the_kl_one():
    """χ²: p* = p_pre (1 + (r - c)/(2α))₊, truncated where the reward is low; through the
    surrogate reward the fine-tuned samples match it (by reweighted base samples) and not the
    KL target at the same α, whose mean is much further out."""
    alpha = 0.5
    base = gaussian()
    div = divergence("chi2")
    chain = Memoryless(FlowMatching(), 20)
    noise0, noise = _noise(20_000, 5)
    base_x = chain.sample(base, noise0, noise)[1]
    reward = Linear(A)
    c = normaliser(div, reward(base_x), alpha)
    model, am = finetune(Surrogate(reward, div, alpha, c), alpha)
    x = chain_samples(am, model)
    edges = torch.linspace(-3, 5, 33)

    def histogram(values, weights=None):
        h = torch.histogram(values.double(), bins=edges.double(), weight=weights).hist
        return h / h.sum()

    fine = histogram(reward(x))
    chi2_target = histogram(reward(base_x), tilt_weights(div, reward(base_x), alpha, c) * len(base_x))
    kl_target = histogram(reward(base_x), tilt_weights(divergence("kl"), reward(base_x), alpha) * len(base_x))
    d_chi2, d_kl = (fine - chi2_target).abs().sum().item(), (fine - kl_target).abs().sum().item()
    assert d_chi2 < 0.15 and d_chi2 < 0.3 * d_kl, (d_chi2, d_kl)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_each_divergence_ratio_inverts_its_f_prime(name):
    """g = (f')⁻¹ for each f (closed forms of f'), c normalises p* on base samples, and the
    self-normalised tilt weights are g((r - c)/α)/n."""
    f_prime = {"kl": lambda p: torch.log(p) + 1, "chi2": lambda p: 2 * (p - 1), "reverse_kl": lambda p: -1 / p,
               "hellinger": lambda p: 1 - p.rsqrt()}[name]
    div = divergence(name)
    p = torch.linspace(0.2, 3.0, 15, dtype=torch.float64)
    assert torch.allclose(div.ratio(f_prime(p)), p, atol=1e-9)
    assert torch.allclose(div.log_ratio(f_prime(p)), p.log(), atol=1e-3)
    r = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bound = r.max().item()  # a reward bounded above, as reverse KL and Hellinger need
    c = normaliser(div, r, 2.0, bound)
    w = tilt_weights(div, r, 2.0, c)
    if div.pole is not None:
        assert ((bound - c) / 2.0) < div.pole  # p* finite everywhere the reward reaches
        with pytest.raises(ValueError, match=f"the {name} divergence needs a reward bounded above"):
            normaliser(div, r, 2.0, math.inf)
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
    if div.normalised:
        assert div.ratio((r - c) / 2.0).mean().item() == pytest.approx(1.0, abs=1e-6)
    else:
        assert torch.allclose(w, torch.softmax(r / 2.0, 0))
    with pytest.raises(ValueError, match="unknown divergence 'tv': choose one of"):
        divergence("tv")


def test_a_reward_of_the_wrong_shape_or_without_gradient_is_refused():
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(4,\), but returned \(4, 2\)"):
        check_reward(lambda x: x, x)
    with pytest.raises(ValueError, match="no gradient"):
        check_reward(lambda x: (x.detach() ** 2).sum(1), x)
    check_reward(Linear(A), x)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        AdjointMatching(Memoryless(FlowMatching(), 4), gaussian(), Linear(A), 0.0)


def test_the_objective_is_the_same_split_across_ranks():
    """Two ranks' halves of a global batch give the losses the whole batch gives on one rank:
    every step's noise is drawn for the global batch from (seed, step)."""
    base = gaussian()
    model = Residual(base)
    with torch.no_grad():
        model.delta[-1].weight.normal_(0, 0.1)
    chain = Memoryless(FlowMatching(), 8)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def losses(lo: int, hi: int, objective: FinetuneObjective) -> torch.Tensor:
        batch = Batch(x1=x0[lo:hi], x0=x0[lo:hi], t=torch.zeros(hi - lo), rows=torch.arange(lo, hi), step=3, offset=lo)
        return objective(model, batch)

    one = FinetuneObjective(chain, base, Linear(A), 1.0, batch_size=8, seed=0, loss_steps=4)
    two = FinetuneObjective(chain, base, Linear(A), 1.0, batch_size=8, seed=0, loss_steps=4)
    whole = losses(0, 8, one)
    halves = torch.cat([losses(0, 4, two), losses(4, 8, two)])
    assert torch.allclose(whole, halves, atol=1e-6)
    metrics = one.read_metrics()
    assert set(metrics) == {"finetune/reward", "finetune/path_kl", "finetune/diversity"} and metrics["finetune/path_kl"] > 0
    assert one.read_metrics() == {}  # the window restarts after each read
    assert math.isfinite(whole.sum().item())


# --- the job, on a real Ray cluster and MLflow server --------------------------------------

TOY_BASE = {"model": {"kind": "mlp", "hidden": 128, "depth": 3}, "process": {"kind": "flow"}, "sampler": {"method": "heun", "steps": 16},
            "batch_size": 256, "images": 60_000, "ema_halflife_images": 10_000, "optim": {"lr": 0.002, "warmup_images": 5000},
            "data": {"source": "6gaussians", "n": 4000}}
JOB = {"reward": {"kind": "linear", "a": [1.0, 0.0]}, "steps": 32, "loss_steps": 8, "batch_size": 128, "lr": 1e-3, "eval_n": 1000,
       "scaling": {"num_workers": 1, "cpus_per_worker": 2}}


def _finetune_job(base: str, **cfg) -> dict:
    from genmem.jobs.base import Context
    from genmem.jobs.finetune import FinetuneConfig
    from genmem.jobs.finetune import run as finetune_job

    return finetune_job(FinetuneConfig.model_validate({**JOB, "base": base, **cfg}), Context())


@pytest.mark.slow
def test_the_job_tilts_six_gaussians_toward_the_exact_kl_target(storage, tracking, ray_local, trained_base):
    from mlflow import MlflowClient

    torch.set_num_threads(2)
    base = trained_base(TOY_BASE)
    result = _finetune_job(base, alpha=1.0, images=16_000, eval_every_images=8_000, probe_n=400)
    m = result["metrics"]
    assert m["reward"] > m["reward_before"] + 0.5, m  # the exact tilt moves the mean reward by Var(r)/α ≈ 2.3 (measured 2.34)
    assert m["mmd_target"] < 0.5 * m["mmd_target_before"], m  # closer to p* than the base is
    assert 0.1 < m["path_kl"] < 5, m
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["finetune/reward"] == pytest.approx(m["reward"])
    assert run.data.tags["mlflow.note.content"].startswith(f"finetune: reward {m['reward_before']:.3g} → {m['reward']:.3g}, ")
    assert {"before_after.png", "curves.png", "density.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    history = client.get_metric_history(result["train_run_id"], "finetune/reward")
    assert len(history) >= 10 and history[-1].value > history[0].value  # logged by step, rising
    probes = {key: [p.value for p in client.get_metric_history(result["train_run_id"], f"eval/{key}")]
              for key in ("reward", "mmd_target", "memorised_fraction", "mmd_data")}
    assert all(len(v) == 2 for v in probes.values()), probes  # quality and copying probed during training too
    assert probes["reward"][-1] > m["reward_before"] + 0.5 and probes["mmd_target"][-1] < m["mmd_target_before"], probes


@pytest.mark.before_ray
def test_the_job_refuses_bad_input_before_any_ray_work(tmp_path, storage, tracking, trained_base):
    import ray

    from genmem.errors import CheckpointError, ConfigError
    from genmem.jobs.finetune import FinetuneConfig

    ray.shutdown()
    base = trained_base({**TOY_BASE, "images": 2560})
    with pytest.raises(ValueError, match="alpha"):
        FinetuneConfig.model_validate({**JOB, "base": base, "alpha": 0})
    with pytest.raises(ValueError, match="unknown divergence 'tv': choose one of kl, chi2"):
        FinetuneConfig.model_validate({**JOB, "base": base, "divergence": "tv"})
    with pytest.raises(ConfigError, match=r"one value per sample, shape \(4,\), but returned \(\)"):
        _finetune_job(base, reward={"kind": "function", "function": "torch:sum"})
    with pytest.raises(ConfigError, match="no gradient with respect to x"):
        _finetune_job(base, reward={"kind": "function", "function": "test_finetune:detached_reward"})
    with pytest.raises(ConfigError, match="'mode9', which is not a class of the base's data: choose among mode0"):
        _finetune_job(base, reward={"kind": "class", "target": "mode9"})
    with pytest.raises(ConfigError, match="the reverse_kl divergence needs a reward bounded above"):
        _finetune_job(base, divergence="reverse_kl")
    with pytest.raises(ConfigError, match="reward.a has 3 entries but the base's samples have 2 dimensions"):
        _finetune_job(base, reward={"kind": "linear", "a": [1, 2, 3]})
    with pytest.raises(CheckpointError):
        _finetune_job(str(tmp_path / "nowhere"))
    assert not ray.is_initialized()


def detached_reward(x: torch.Tensor) -> torch.Tensor:
    """A reward without a gradient (the job refuses it): importable as test_finetune:detached_reward."""
    return x.detach().flatten(1).sum(1)
