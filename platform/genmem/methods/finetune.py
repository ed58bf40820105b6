"""Reward fine-tuning with a KL or f-divergence regulariser, by adjoint matching (METHODS.md
§Regularised reward fine-tuning; Tang 2024; Domingo-Enrich et al., ICLR 2025). Pure torch.

The target is the maximiser of E_p[r] - α D_f(p || p_pre): p* ∝ p_pre exp(r/α) for KL, and
p* = p_pre (f')⁻¹((r - c)/α) for an f-divergence, reached by the KL machinery on the surrogate
reward r̃ = α log (f')⁻¹((r - c)/α) with c normalising p* on base samples.

**The memoryless SDE.** For a path x_t = α_t x1 + σ_t x0 (t = 0 noise, t = 1 data) the
memoryless SDE of a model (Domingo-Enrich et al., eq. 11: noise level sqrt(2 η_t), drift
2v - (α̇/α) x) makes X_0 independent of X_1, the condition under which a tilt of the terminal law
is an optimal control of the path. Flow matching: σ(t) = sqrt(2(1-t)/t), b = 2v - x/t, stepped by
Euler-Maruyama on t_k = (k+1)/(K+1): the first step's factor 1 - h/t_0 is 0, so it starts from
fresh noise just after t = 0 where b diverges (measured on a Gaussian: terminal variance 1.03 at
K = 20 and 1.00 at K = 40, where the ancestral form of the same chain gives 0.82 and 0.89). VP
diffusion: DDPM's ancestral transitions (η = 1). Every transition is stochastic:
N(m_k(x), c_k² I), c_k > 0; as h -> 0 the per-step control below is sqrt(h) u with the continuous
u = (2/σ)(v_ft - v_base).

**Adjoint matching.** Trajectories of the current model's chain without a graph; the lean
adjoint of the *base* chain backwards from ã_K = -∇_x r(x_K)/α, one
vector-Jacobian product of the base transition mean per step: ã_k = (∂m_base,k/∂x_k)ᵀ ã_{k+1}
(discretely, dã/dt = -(∂_x b_base)ᵀ ã); the loss on stop-gradient states
||u_k + c_k ã_{k+1}||², u_k = (m_ft,k - m_base,k)/c_k, with c_k the transition's standard deviation.
At the optimum m_ft = m_base - c² ã: the Gaussian transition tilted by exp(-ãᵀ x), exact when the
value function is linear (a linear reward on a Gaussian base). The path KL of the chain is
Σ_k ||u_k||²/2 (Girsanov, discretely exact). The fine-tuned network stays a velocity (or eps/v)
model of the same process, so every sampler, metric and job takes it.

Usage::

    chain = Memoryless(FlowMatching(), steps=32)
    objective = AdjointMatching(chain, base, reward=Linear(a), alpha=1.0)
    loss = objective.loss(model, noise0, noise)      # (batch,); minimise with any optimiser
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genmem.generative.process import Process
from genmem.generative.sampling import derive_seed

Reward = Callable[[Tensor], Tensor]  # r(x) -> (batch,), differentiable in x

_NOISE_STREAM, _STEPS_STREAM = 41, 42


class Memoryless:
    """The memoryless chain of ``process`` in ``steps`` transitions N(m_k(x), c_k² I), every one
    stochastic (c_k > 0: VP's path keeps σ > 0 at its last time, flow's EM step has c² = 2h²/(1-h)).

    >>> chain = Memoryless(FlowMatching(), steps=32)
    >>> states, x1 = chain.sample(model, torch.randn(n, 2), noise=lambda k: torch.randn(n, 2))
    """

    def __init__(self, process: Process, steps: int):
        if steps < 2:
            raise ValueError(f"the memoryless chain needs at least 2 steps, got {steps}")
        self.process, self.steps = process, steps
        coefficients = process.memoryless(steps)
        self.t, self.a, self.b, self.v, self.c = (coefficients.t, coefficients.a, coefficients.b, coefficients.v, coefficients.c)
        if (self.c <= 0).any():  # a control needs noise to act through (and would divide by c)
            raise ValueError(f"the chain of {type(process).__name__} has a deterministic step at {steps} steps: use fewer steps")

    def start(self, noise: Tensor) -> Tensor:
        """The chain's first state from standard normal ``noise`` (the path's marginal at t_0,
        up to its data term, which the first step forgets)."""
        return float(self.process.alpha_sigma(self.t[:1])[1]) * noise

    def mean(self, model: nn.Module, x: Tensor, k: int | Tensor) -> Tensor:
        """m_k(x): the transition mean of step ``k`` from x under ``model``; ``k`` may be one
        step per row (a LongTensor), so several steps' states go through the network at once."""
        k = torch.full((len(x),), k, dtype=torch.long) if isinstance(k, int) else k.cpu()
        shape = (-1, *([1] * (x.dim() - 1)))

        def coef(c: Tensor) -> Tensor:
            return c[k].to(x.device, x.dtype).view(shape)

        t = self.t[k].to(x.device, x.dtype)
        return self.process.chain_mean(model, x, t, coef(self.a), coef(self.b), coef(self.v))

    @torch.no_grad()
    def sample(self, model: nn.Module, noise0: Tensor, noise: Callable[[int], Tensor]) -> tuple[list[Tensor], Tensor]:
        """States x_0..x_{K-1} (x_0 from standard normal ``noise0``) and the sample x_K;
        ``noise(k)`` draws step k's standard normal."""
        x = self.start(noise0)
        states = [x]
        for k in range(self.steps):
            x = self.mean(model, x, k) + float(self.c[k]) * noise(k)
            states.append(x)
        return states[:-1], x


# --- divergences: p*/p_pre = (f')⁻¹((r - c)/α) ----------------------------------------------


def _log_positive(z: Tensor, eps: float = 1e-2) -> Tensor:
    """log max(z, 0), smoothed below ``eps`` so its gradient pushes out of the region p* = 0."""
    u = z / eps
    # log softplus(u) -> u for u << 0, where softplus itself underflows to 0
    return math.log(eps) + torch.where(u < -20, u, torch.log(nn.functional.softplus(u.clamp(min=-20))))


@dataclass(frozen=True)
class Divergence:
    """An f-divergence by its density ratio g = (f')⁻¹: p* = p_pre g((r - c)/α); ``log_ratio``
    is log g (smoothed where g = 0), the surrogate reward's r̃/α. ``pole``: the y where g blows
    up (reverse KL, Hellinger); p* then exists only for a reward bounded above, with c chosen so
    that (sup r - c)/α stays below the pole."""

    name: str
    ratio: Callable[[Tensor], Tensor]
    log_ratio: Callable[[Tensor], Tensor]
    normalised: bool = True  # False for KL: any c gives the same tilt (p* ∝ p_pre exp(r/α))
    pole: float | None = None


DIVERGENCES = {
    # f(p) = p log p: f'(p) = log p + 1, g(y) = exp(y - 1)
    "kl": Divergence("kl", lambda y: torch.exp(y - 1), lambda y: y - 1, normalised=False),
    # f(p) = (p - 1)²: g(y) = 1 + y/2, zero where y < -2 (Tang 2024: p* = p_pre (1 + (r - c)/(2α))₊)
    "chi2": Divergence("chi2", lambda y: (1 + y / 2).clamp(min=0), lambda y: _log_positive(1 + y / 2)),
    # f(p) = -log p (reverse KL): f'(p) = -1/p, g(y) = -1/y for y < 0
    "reverse_kl": Divergence("reverse_kl", lambda y: 1 / (-y).clamp(min=1e-6), lambda y: -_log_positive(-y, 1e-3), pole=0.0),
    # f(p) = (sqrt p - 1)² (squared Hellinger): f'(p) = 1 - 1/sqrt p, g(y) = 1/(1 - y)² for y < 1
    "hellinger": Divergence("hellinger", lambda y: (1 - y).clamp(min=1e-3) ** -2, lambda y: -2 * _log_positive(1 - y, 1e-3), pole=1.0),
}


def divergence(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}': choose one of {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def check_bounded(div: Divergence, bound: float | None) -> None:
    """Refuse a divergence with a pole for a reward that is not bounded above (one sentence)."""
    if div.pole is not None and (bound is None or not math.isfinite(bound)):
        raise ValueError(f"the {div.name} divergence needs a reward bounded above (its p* = p_pre g((r - c)/α) has a pole at "
                         f"(r - c)/α = {div.pole:g}): use kl or chi2, or a bounded reward (class, region, quadratic)")


def normaliser(div: Divergence, rewards: Tensor, alpha: float, bound: float | None = None) -> float:
    """c with mean over base samples of g((r - c)/α) = 1 (bisection; g((r - c)/α) falls as c
    grows). KL: 0 (the tilt is normalised by its own constant). A divergence with a pole needs
    the reward's upper ``bound``: c stays above bound - α·pole, so p* is finite everywhere."""
    if not div.normalised:
        return 0.0
    check_bounded(div, bound)
    r = rewards.double()

    def mass(c: float) -> float:
        return div.ratio((r - c) / alpha).mean().item()

    lo, hi = r.min().item() - 1.0, r.max().item() + 1.0
    if div.pole is not None:
        floor = bound - alpha * div.pole
        lo = floor + 1e-9 * max(1.0, abs(floor))
        if mass(lo) < 1:
            raise ValueError(f"α={alpha:g} is too small for the {div.name} divergence with this reward: no normaliser c above "
                             f"{floor:.4g} gives p* mass 1 on the base's samples; raise α")
        hi = max(hi, lo + 1.0)
    while mass(lo) < 1:
        lo -= 2 * (hi - lo)
    while mass(hi) > 1:
        hi += 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return 0.5 * (lo + hi)


def tilt_weights(div: Divergence, rewards: Tensor, alpha: float, c: float | None = None, bound: float | None = None) -> Tensor:
    """Self-normalised weights that turn base samples into samples of p* (the exact target on
    what the base generates)."""
    c = normaliser(div, rewards, alpha, bound) if c is None else c
    w = torch.exp((rewards.double() - rewards.double().max()) / alpha) if not div.normalised else div.ratio((rewards.double() - c) / alpha)
    return w / w.sum()


class Surrogate(nn.Module):
    """r̃(x) = α log (f')⁻¹((r(x) - c)/α): KL fine-tuning on r̃ reaches the f-divergence's p*."""

    def __init__(self, reward: Reward, div: Divergence, alpha: float, c: float):
        super().__init__()
        self.reward, self.div, self.alpha, self.c = reward, div, alpha, c

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * self.div.log_ratio((self.reward(x) - self.c) / self.alpha)


# --- adjoint matching ---------------------------------------------------------------------


@dataclass
class Trajectories:
    """One batch of the current model's chain: states, the sample, rewards and the path KL."""

    states: list[Tensor]
    x1: Tensor
    reward: Tensor  # (batch,) of the reward being maximised (the surrogate's for an f-divergence)
    kl: Tensor  # (batch,) Σ_k ||u_k||²/2 (NaN when not computed)


class AdjointMatching:
    """The adjoint-matching loss of a fine-tuned model against a frozen ``base`` on ``chain``,
    for the terminal reward ``reward`` at regulariser weight ``alpha`` (KL; wrap the reward in
    :class:`Surrogate` for an f-divergence). ``loss_steps``: how many of the chain's
    steps enter each batch's loss (a random subset, as in the paper; None: all).

    >>> am = AdjointMatching(Memoryless(FlowMatching(), 32), base, Linear(a), alpha=1.0)
    >>> losses = am.loss(model, noise0, noise)  # (batch,)
    """

    def __init__(self, chain: Memoryless, base: nn.Module, reward: Reward, alpha: float, loss_steps: int | None = None):
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}: it weighs the divergence from the base")
        self.chain, self.base, self.reward, self.alpha = chain, base.eval().requires_grad_(False), reward, alpha
        self.loss_steps = loss_steps

    def rollout(self, model: nn.Module, noise0: Tensor, noise: Callable[[int], Tensor], *, kl: bool = True) -> Trajectories:
        """The current model's trajectories (no graph), their rewards and (``kl``) path KL."""
        with torch.no_grad():
            states, x1 = self.chain.sample(model, noise0, noise)
            path_kl = torch.zeros(len(x1), dtype=torch.float64, device=x1.device)
            for k in range(self.chain.steps if kl else 0):
                path_kl += 0.5 * self.control(model, states[k], k).flatten(1).double().pow(2).sum(1)
            reward = self.reward(x1)
        return Trajectories(states, x1, reward.detach(), path_kl if kl else torch.full_like(path_kl, math.nan))

    def control(self, model: nn.Module, x: Tensor, k: int) -> Tensor:
        """u_k = (m_ft,k - m_base,k)/c_k at x (the per-step control; with grad through ``model``)."""
        with torch.no_grad():
            m_base = self.chain.mean(self.base, x, k)
        return (self.chain.mean(model, x, k) - m_base) / float(self.chain.c[k])

    def lean_adjoint(self, states: list[Tensor], x1: Tensor) -> list[Tensor]:
        """[ã_1, ..., ã_K]: ã_K = -∇r(x_K)/α, and backwards ã_k = (∂m_base,k/∂x_k)ᵀ ã_{k+1}
        (one VJP of the base chain per step; entry j belongs to the state after step j)."""
        with torch.enable_grad():
            x = x1.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.reward(x).sum(), x)
            adj = [-grad / self.alpha]
            for k in range(self.chain.steps - 1, 0, -1):
                x = states[k].detach().requires_grad_(True)
                (vjp,) = torch.autograd.grad(self.chain.mean(self.base, x, k), x, adj[-1])
                adj.append(vjp)
        return adj[::-1]

    def loss(self, model: nn.Module, noise0: Tensor, noise: Callable[[int], Tensor], generator: torch.Generator | None = None,
             rollout: Trajectories | None = None) -> Tensor:
        """Per-sample mean over the chosen steps of ||u_k + c_k ã_{k+1}||² (summed over dimensions)."""
        return self.loss_and_kl(model, rollout or self.rollout(model, noise0, noise, kl=False), generator)[0]

    def loss_and_kl(self, model: nn.Module, traj: Trajectories, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The per-sample loss on ``traj``, and the path KL estimated from the same steps'
        controls (n/|steps| Σ ||u_k||²/2, unbiased; no extra network call). The chosen steps'
        states go through ``model`` in one call, so a DDP model sees one forward per backward."""
        adj = self.lean_adjoint(traj.states, traj.x1)
        n = self.chain.steps
        steps = list(range(n))
        if self.loss_steps is not None and self.loss_steps < n:
            steps = sorted(torch.randperm(n, generator=generator)[: self.loss_steps].tolist())
        batch = len(traj.x1)
        x = torch.cat([traj.states[k] for k in steps])
        ks = torch.tensor(steps).repeat_interleave(batch)
        c = self.chain.c[ks].to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            m_base = self.chain.mean(self.base, x, ks)
        u = (self.chain.mean(model, x, ks) - m_base) / c
        residual = u + c * torch.cat([adj[k] for k in steps])
        loss = residual.flatten(1).pow(2).sum(1).view(len(steps), batch).mean(0)
        kl = 0.5 * u.detach().flatten(1).double().pow(2).sum(1).view(len(steps), batch).sum(0) * (n / len(steps))
        return loss, kl


class FinetuneObjective:
    """Adjoint matching as an objective of genmem's training loop: each step's batch is a batch
    of trajectories of the current model (the data rows are ignored; ``batch.x0`` is the start
    noise). Every step's noise is drawn for the global batch from (seed, step), each rank taking
    its slice, so a run is the same whatever the worker count. ``read_metrics`` gives the mean
    reward (the reward itself, also for an f-divergence's surrogate), path KL and diversity of
    the trajectories since the last log."""

    def __init__(self, chain: Memoryless, base: nn.Module, reward: Reward, alpha: float, batch_size: int, seed: int,
                 loss_steps: int | None = None, surrogate: Surrogate | None = None):
        self.am = AdjointMatching(chain, base, surrogate if surrogate is not None else reward, alpha, loss_steps)
        self.reward, self.batch_size, self.seed = reward, batch_size, seed
        self.device = torch.device("cpu")
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def to(self, device: torch.device) -> "FinetuneObjective":
        self.device = torch.device(device)
        self.am.base.to(self.device)
        for module in (self.reward, self.am.reward):
            if isinstance(module, nn.Module):
                module.to(self.device)
        return self

    def __call__(self, model: nn.Module, batch) -> Tensor:
        n, lo, shape = len(batch.x0), batch.offset, tuple(batch.x0.shape[1:])

        def noise(k: int) -> Tensor:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _NOISE_STREAM, batch.step, k))
            return torch.randn((self.batch_size, *shape), generator=g)[lo : lo + n].to(self.device)

        traj = self.am.rollout(model, batch.x0, noise, kl=False)
        steps = torch.Generator().manual_seed(derive_seed(self.seed, _STEPS_STREAM, batch.step))  # the same on every rank
        loss, kl = self.am.loss_and_kl(model, traj, generator=steps)
        with torch.no_grad():
            reward = traj.reward if self.am.reward is self.reward else self.reward(traj.x1)
            self._add({"finetune/reward": reward.double().mean(), "finetune/path_kl": kl.mean(),
                       "finetune/diversity": torch.pdist(traj.x1.flatten(1).double()).mean() if n > 1 else torch.zeros((), dtype=torch.float64)})
        return loss

    def _add(self, values: dict[str, Tensor]) -> None:
        for name, v in values.items():
            self._sums[name] = self._sums.get(name, 0) + v.to(self.device)
        self._count += 1

    def read_metrics(self) -> dict[str, Tensor]:
        out = {name: (v / self._count).float() for name, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out


# --- analytic bases and rewards -------------------------------------------------------------


class GaussianMixtureFlow(nn.Module):
    """The exact flow-matching velocity from N(0, I) noise to the mixture Σ_k w_k N(μ_k, Σ_k) on
    the straight path: v = Σ_k P(k | x_t) (μ_k + (t Σ_k - (1-t) I) C_k⁻¹ (x - t μ_k)), C_k =
    (1-t)² I + t² Σ_k (Cov(x1 - x0, x_t | k) C_k⁻¹ is the regression of x1 - x0 on x_t).
    A base with no training error, for checking fine-tuning against closed forms."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        super().__init__()
        self.register_buffer("log_w", torch.as_tensor(weights, dtype=torch.float64).log())
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("covs", torch.as_tensor(covs, dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        xd, td = x.double(), t.double().view(-1, 1, 1, 1)  # (batch, mode, d, d)
        eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        C = (1 - td) ** 2 * eye + td**2 * self.covs  # (batch, mode, d, d)
        diff = xd[:, None, :] - td[..., 0, 0, None] * self.means  # (batch, mode, d)
        sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)
        v_k = self.means + ((td * self.covs - (1 - td) * eye) @ sol.unsqueeze(-1)).squeeze(-1)
        log_p = self.log_w - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(C)
        resp = torch.softmax(log_p, dim=1)
        return (resp.unsqueeze(-1) * v_k).sum(1).to(x.dtype)


class Linear(nn.Module):
    """r(x) = aᵀx (unbounded: KL and χ² only)."""

    upper_bound = math.inf

    def __init__(self, a: Tensor):
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.a.to(x.dtype)


class Quadratic(nn.Module):
    """r(x) = -(x - m)ᵀ A (x - m)/2 (A symmetric positive semi-definite): with a Gaussian base
    N(μ, Σ) and KL, p* is Gaussian with precision Σ⁻¹ + A/α. Bounded above by 0."""

    upper_bound = 0.0

    def __init__(self, A: Tensor, m: Tensor):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float32))
        self.register_buffer("m", torch.as_tensor(m, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        d = x.flatten(1) - self.m.to(x.dtype)
        return -0.5 * ((d @ self.A.to(x.dtype)) * d).sum(1)


class Region(nn.Module):
    """A smoothed indicator of the box lo <= x <= hi: Π_i sigmoid((x_i - lo_i)/s) sigmoid((hi_i - x_i)/s)."""

    upper_bound = 1.0

    def __init__(self, lo: Tensor, hi: Tensor, smoothness: float = 0.1):
        super().__init__()
        self.register_buffer("lo", torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("hi", torch.as_tensor(hi, dtype=torch.float32))
        self.s = smoothness

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        inside = torch.sigmoid((x - self.lo.to(x.dtype)) / self.s) * torch.sigmoid((self.hi.to(x.dtype) - x) / self.s)
        return inside.prod(1)


class ClassLogProb(nn.Module):
    """r(x) = log p(y = target | x) under a classifier returning logits (bounded above by 0)."""

    upper_bound = 0.0

    def __init__(self, classifier: nn.Module, target: int):
        super().__init__()
        self.classifier, self.target = classifier.eval().requires_grad_(False), target

    def forward(self, x: Tensor) -> Tensor:
        return torch.log_softmax(self.classifier(x), dim=1)[:, self.target]


def check_reward(reward: Reward, example: Tensor) -> None:
    """Refuse a reward that breaks the contract r(x) -> (batch,), differentiable in x (one sentence)."""
    x = example[:4].detach().clone().requires_grad_(True)
    r = reward(x)
    if not isinstance(r, Tensor) or r.shape != (len(x),):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"the reward must return one value per sample, shape ({len(x)},), but returned {shape}")
    if not r.requires_grad:
        raise ValueError("the reward has no gradient with respect to x: adjoint matching needs a differentiable reward")
    (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None or not torch.isfinite(g).all():
        raise ValueError("the reward's gradient with respect to x is missing or not finite: adjoint matching needs a differentiable reward")


def pairwise_distance(x: Tensor, max_points: int = 2000) -> float:
    """Mean pairwise Euclidean distance of up to ``max_points`` samples (a diversity measure)."""
    x = x[:max_points].flatten(1).double()
    n = len(x)
    return float(torch.pdist(x).mean()) if n > 1 else math.nan
