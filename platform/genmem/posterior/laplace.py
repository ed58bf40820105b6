"""Euclidean and Riemannian Laplace posteriors over a weight subset (METHODS.md §Riemannian Laplace).

Lifecycle in the spirit of laplace-torch: construct → ``fit()`` → ``optimize_prior_precision()`` →
``sample(n, ...)`` → ``apply(sample)`` for a network to generate with.

>>> la = LaplacePosterior(ckpt.model, FlowMatching(), train_x, curvature="ggn", draws=8).fit()
>>> la.optimize_prior_precision()
>>> samples = la.sample(10, method="riemannian", scale=1e-2)   # each carries its seed and cost
>>> net = la.apply(samples[0])                                   # generate(net, ...) as for θ*
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from genmem.generative.process import Process
from genmem.generative.sampling import derive_seed
from genmem.posterior.curvature import diagonal_curvature
from genmem.posterior.geodesic import exponential_map
from genmem.posterior.objective import PosteriorObjective

METHODS = ("euclidean", "riemannian", "linearised")


class QuadraticModel:
    """The loss replaced by its Gauss–Newton model around θ*, with the posterior's diagonal
    curvature: L_c(θ) ≈ L(θ*) + ½ (θ − θ*)ᵀ diag(H + α) (θ − θ*) (centred, so θ* is stationary).
    Gradient and HVP are elementwise products, so a geodesic right-hand side needs no pass over
    the data (the linearised-manifold arm, after Bergamin et al.; with the diagonal GGN genmem fits
    rather than their full linearised network)."""

    def __init__(self, theta_star: torch.Tensor, precision: torch.Tensor):
        self.theta_star, self.precision = theta_star, precision

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.precision * (theta - self.theta_star)

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.precision * v


@dataclass
class WeightSample:
    """One posterior weight sample over the subset, with its seed and its cost."""

    theta: torch.Tensor
    seed: int
    method: str
    n_grad: int  # gradient evaluations (full passes over the data) spent on this sample
    n_hvp: int
    loss: float  # un-centred L(θ) at the sample
    loss_increase: float  # L(θ) − L(θ*)
    seconds: float


def with_weights(model: nn.Module, names: list[str], theta: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the parameters ``names`` (in order) set from the flat ``theta``."""
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    numels = [params[n].numel() for n in names]
    if sum(numels) != theta.numel():
        raise ValueError(f"theta has {theta.numel()} weights but the subset {names[:3]}... holds {sum(numels)}")
    with torch.no_grad():
        for name, piece in zip(names, torch.split(theta, numels)):
            params[name].copy_(piece.view_as(params[name]))
    return net


class LaplacePosterior:
    """Diagonal Laplace approximation N(θ*, (H + α)⁻¹) over a parameter subset, sampled in the
    Euclidean way (θ* + v) or along the loss surface (θ = Exp_θ*(v) under G = I + g gᵀ).

    ``subset`` is a list of fnmatch patterns over ``model.named_parameters()`` names (default: the
    last blocks, see ``default_subset``); ``curvature`` is "ef", "ggn" or "ggn_mc".
    """

    def __init__(
        self,
        model: nn.Module,
        process: Process,
        train_x: torch.Tensor,
        *,
        subset: list[str] | None = None,
        prior_precision: float = 1.0,
        curvature: str = "ef",
        draws: int = 8,
        seed: int = 0,
        centre: bool = True,
        dtype: torch.dtype = torch.float64,
        chunk_size: int = 256,
        shard: tuple[int, int] | None = None,
        reduce=None,
        trunk_cache: bool = True,
    ):
        if prior_precision <= 0:
            raise ValueError(f"prior_precision must be positive, not {prior_precision}")
        self.model, self.curvature_kind, self.seed = model, curvature, seed
        self.objective = PosteriorObjective(
            model, process, train_x, subset=subset, prior_precision=prior_precision,
            draws=draws, seed=seed, centre=centre, dtype=dtype, chunk_size=chunk_size, shard=shard, reduce=reduce,
            trunk_cache=trunk_cache,
        )
        self.curvature: torch.Tensor | None = None
        self._loss_star: tuple[float, float] | None = None  # (α, L(θ*)) cache

    @property
    def subset(self) -> list[str]:
        return self.objective.names

    @property
    def theta_star(self) -> torch.Tensor:
        return self.objective.theta_star

    @property
    def prior_precision(self) -> float:
        return self.objective.prior_precision

    @prior_precision.setter
    def prior_precision(self, alpha: float) -> None:
        self.objective.prior_precision = float(alpha)

    @property
    def posterior_precision(self) -> torch.Tensor:
        """Diagonal of H + α (METHODS.md step 2)."""
        if self.curvature is None:
            raise RuntimeError("the posterior is not fitted: call fit() first")
        return self.curvature + self.prior_precision

    def fit(self) -> "LaplacePosterior":
        """Diagonal curvature H of the data term at θ*."""
        self.curvature = diagonal_curvature(self.objective, self.curvature_kind, generator=torch.Generator().manual_seed(self.seed))
        return self

    def loss_star(self) -> float:
        """Un-centred L(θ*) at the current prior precision."""
        if self._loss_star is None or self._loss_star[0] != self.prior_precision:
            self._loss_star = (self.prior_precision, self.objective.value(self.theta_star, centred=False))
        return self._loss_star[1]

    def log_marginal_likelihood(self, alpha: float) -> float:
        """Laplace evidence log p(D|α) ≈ −L(θ*; α) + (P/2) log α − ½ Σ log(H + α), constants dropped."""
        h = self.posterior_precision - self.prior_precision
        sq = float(self.theta_star.dot(self.theta_star))
        data = self.loss_star() - 0.5 * self.prior_precision * sq
        return -(data + 0.5 * alpha * sq) + 0.5 * h.numel() * math.log(alpha) - 0.5 * float(torch.log(h + alpha).sum())

    def optimize_prior_precision(self, grid: torch.Tensor | list[float] | None = None) -> float:
        """Set α to the grid point (default 10^-4 ... 10^4, 81 log-spaced) of largest evidence; return it."""
        grid = torch.logspace(-4, 4, 81, dtype=torch.float64) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
        scores = [self.log_marginal_likelihood(float(a)) for a in grid]
        self.prior_precision = float(grid[int(torch.tensor(scores).argmax())])
        return self.prior_precision

    def initial_velocity(self, seed: int, scale: float) -> torch.Tensor:
        """v ~ N(0, scale · (H + α)⁻¹) from the sample's own seed: the same v for both methods."""
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(self.theta_star.numel(), generator=gen, dtype=self.theta_star.dtype)
        return z * (scale / self.posterior_precision).sqrt()

    def sample_one(self, seed: int, *, method: str = "riemannian", scale: float = 1.0, solver: str = "dopri5",
                   steps: int = 20, rtol: float = 1e-4, atol: float = 1e-6, max_evals: int = 5000,
                   second_derivative: str = "hvp") -> WeightSample:
        """The weight sample of a given seed (METHODS.md steps 3 and 4)."""
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, not {scale}")
        obj, start = self.objective, time.perf_counter()
        v = self.initial_velocity(seed, scale)
        n_grad, n_hvp = obj.n_grad, obj.n_hvp
        if method == "euclidean":
            theta = self.theta_star + v
        else:
            surface = obj if method == "riemannian" else QuadraticModel(self.theta_star, self.posterior_precision)
            theta = exponential_map(surface, self.theta_star, v, solver=solver, steps=steps, rtol=rtol, atol=atol, max_evals=max_evals,
                                    second_derivative=second_derivative).theta
        loss = obj.value(theta, centred=False)
        return WeightSample(
            theta=theta, seed=seed, method=method, n_grad=obj.n_grad - n_grad, n_hvp=obj.n_hvp - n_hvp,
            loss=loss, loss_increase=loss - self.loss_star(), seconds=time.perf_counter() - start,
        )

    def sample(self, n: int, *, method: str = "riemannian", scale: float = 1.0, generator: torch.Generator | None = None,
               solver: str = "dopri5", steps: int = 20, rtol: float = 1e-4, atol: float = 1e-6, max_evals: int = 5000) -> list[WeightSample]:
        """``n`` weight samples; sample k has seed derive_seed(base, k), base = the posterior's seed or one
        drawn from ``generator``. The same base gives the same v for both methods."""
        base = self.seed if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        return [
            self.sample_one(derive_seed(base, k), method=method, scale=scale, solver=solver, steps=steps,
                            rtol=rtol, atol=atol, max_evals=max_evals)
            for k in range(n)
        ]

    def apply(self, sample: WeightSample) -> nn.Module:
        """A copy of the model with the subset set to the sample's weights; other parameters untouched."""
        return with_weights(self.model, self.subset, sample.theta)

    def state_dict(self) -> dict:
        return {
            "class": type(self).__name__,
            "subset": list(self.subset),
            "theta_star": self.theta_star.clone(),
            "curvature_kind": self.curvature_kind,
            "curvature": None if self.curvature is None else self.curvature.clone(),
            "prior_precision": self.prior_precision,
            "draws": self.objective.draws,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore curvature and prior precision; refuse another class, subset or weight shape."""
        if state.get("class") != type(self).__name__:
            raise ValueError(f"state of class {state.get('class')!r} cannot be loaded into {type(self).__name__}")
        if list(state["subset"]) != self.subset:
            raise ValueError(f"state was fitted on subset {state['subset']} but this posterior's subset is {self.subset}")
        if state["theta_star"].shape != self.theta_star.shape:
            raise ValueError(f"state has {state['theta_star'].numel()} subset weights but this model has {self.theta_star.numel()}")
        self.curvature_kind = state["curvature_kind"]
        curv = state["curvature"]
        self.curvature = None if curv is None else curv.to(self.theta_star.dtype)
        self.prior_precision = state["prior_precision"]
