"""The deterministic posterior loss over a named parameter subset (METHODS.md §Riemannian Laplace, step 1).

L(θ) = Σ_i Σ_j ℓ(θ; x0_ij, x1_i, t_ij) / draws + (α/2)||θ||²  over the subset θ, the rest frozen at θ*,
with the (x0, t) draws fixed once per training point (common random numbers), so L is a plain
deterministic function. ℓ is the process's squared error ||f(x_t, t) − target||²/D evaluated in the
objective's dtype. Centring, L_c(θ) = L(θ) − g0·(θ − θ*) with g0 = ∇L(θ*), makes θ* stationary
(METHODS.md: with fixed draws |∇L(θ*)| is large and the geodesic otherwise diverges).

>>> obj = PosteriorObjective(model, FlowMatching(), train_x, subset=["out.*"], draws=8)
>>> value, g = obj.value_and_grad(obj.theta_star)
>>> hv = obj.hvp(obj.theta_star, torch.randn_like(g))

Sharded (a Ray Train worker group, one rank per shard): ``shard=(rank, world)`` keeps training
points rank, rank + world, ... with the draws the whole set would give them, and ``reduce`` (an
all-reduce sum) adds every data sum over the ranks, so each rank holds the whole objective's
values and a solver run on every rank takes the same steps.

Trunk cache (``trunk_cache=True``, the default): with the draws fixed and only the subset free,
everything upstream of the first free block is a constant. For a network with ``split_points``,
``trunk`` and ``head`` (the MLP and U-Net), the objective computes the trunk once per training
point and draw and runs every loss, gradient, HVP and curvature through the head alone. Other
networks, or a subset reaching into the first layers, run the whole network (``split is None``).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from genmem.errors import ConfigError
from genmem.generative.process import Process
from genmem.generative.sampling import derive_seed


def default_subset(model: nn.Module) -> list[str]:
    """Name patterns of the last blocks: MLP → last residual block + output head; U-Net → last up block + head."""
    blocks, up = getattr(model, "blocks", None), getattr(model, "up", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return [f"blocks.{len(blocks) - 1}.*", "out_norm.*", "out.*"]
    if isinstance(up, nn.ModuleList):
        last = max(i for i, m in enumerate(up) if any(True for _ in m.parameters()))
        return [f"up.{last}.*", "out.*"]
    # any other network: the parameters of its last top-level module that has some
    name = [n for n, m in model.named_children() if any(True for _ in m.parameters())][-1]
    return [f"{name}.*"]


def select_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of ``model``'s parameters matched by any fnmatch pattern, in ``named_parameters`` order.

    A pattern that matches nothing raises :class:`ConfigError` listing the names that exist.
    """
    names = [n for n, _ in model.named_parameters()]
    if not patterns:
        raise ConfigError(f"the posterior subset is empty, which leaves no weight of {type(model).__name__} free: "
                          "name parameters such as 'out.*', or leave subset unset for the last blocks")
    for pat in patterns:
        if not any(n == pat or fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
            raise ConfigError(f"subset pattern {pat!r} matches no parameter of {type(model).__name__}; the parameters are: {shown}")
    return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]


def trunk_split(model: nn.Module, free: list[str]) -> int | None:
    """The latest split of ``model`` whose head holds every free parameter; None when the model
    has no ``split_points`` or no split leaves all of ``free`` in its head."""
    if not all(hasattr(model, a) for a in ("split_points", "trunk", "head")):
        return None
    fits = [k for k, prefixes in model.split_points() if all(n.startswith(tuple(prefixes)) for n in free)]
    return max(fits) if fits else None


def _draws(train_x: torch.Tensor, draws: int, seed: int, dtype: torch.dtype, shard: tuple[int, int] | None):
    """Common random numbers (METHODS.md step 1): (x0, t) fixed per training point from the
    point's own seed, so a rank draws only its shard's points, with the values the whole set gives
    them. Returns x0 (points, draws, ...), x1 (points, ...) and t (points, draws)."""
    points = range(len(train_x)) if shard is None else range(shard[0], len(train_x), shard[1])
    x1 = train_x[points.start :: points.step].to(dtype)
    x0 = torch.empty((len(points), draws, *x1.shape[1:]), dtype=dtype)
    t = torch.empty((len(points), draws), dtype=dtype)
    for j, i in enumerate(points):
        gen = torch.Generator().manual_seed(derive_seed(seed, i))
        x0[j] = torch.randn(x0.shape[1:], generator=gen, dtype=dtype)
        t[j] = torch.rand(draws, generator=gen, dtype=dtype)
    return x0, x1, t


class _Head(nn.Module):
    """``net.head(k, ...)`` as a module, so ``functional_call`` can swap its (``net.``-prefixed) parameters."""

    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, *state: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.k, *state)


class PosteriorObjective:
    """L(θ) (or its centred version) with value, gradient and Hessian-vector product, summed over data chunks.

    ``theta`` is always a flat 1-D tensor over the subset (``names`` order). Counters ``n_grad`` and
    ``n_hvp`` count full passes over the data (a joint gradient+HVP pass counts one of each).
    """

    def __init__(
        self,
        model: nn.Module,
        process: Process,
        train_x: torch.Tensor,
        *,
        subset: list[str] | None = None,
        prior_precision: float = 1.0,
        draws: int = 8,
        seed: int = 0,
        centre: bool = True,
        dtype: torch.dtype = torch.float64,
        chunk_size: int = 256,
        shard: tuple[int, int] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        trunk_cache: bool = True,
    ):
        if draws < 1 or chunk_size < 1:
            raise ValueError(f"draws ({draws}) and chunk_size ({chunk_size}) must be positive")
        if shard is not None and not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard (rank, world) = {shard} needs 0 <= rank < world")
        self.reduce = reduce or (lambda x: x)
        self.process, self.draws, self.dtype, self.chunk_size = process, draws, dtype, chunk_size
        self.net = copy.deepcopy(model).to(dtype).eval()
        self.names = select_parameters(self.net, subset if subset is not None else default_subset(self.net))
        params = dict(self.net.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [math.prod(s) for s in self.shapes]
        self.theta_star = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        self.frozen = {n: p.detach() for n, p in params.items() if n not in self.names}
        self.frozen.update({n: b for n, b in self.net.named_buffers()})

        x0, x1, t = _draws(train_x, draws, seed, dtype, shard)
        self.n_points = len(x1)
        t = t.flatten()
        ps = process.path(x0.flatten(0, 1), x1.repeat_interleave(draws, dim=0), t)
        self.targets = ps.target  # constants: the draws fix x_t and the regression target
        self.split = trunk_split(self.net, self.names) if trunk_cache else None
        if self.split is None:
            self.inputs: tuple[torch.Tensor, ...] = (ps.x_t, t)
            self._module, self._prefix = self.net, ""
        else:
            with torch.no_grad():
                parts = [self.net.trunk(self.split, ps.x_t[lo : lo + chunk_size], t[lo : lo + chunk_size])
                         for lo in range(0, len(t), chunk_size)]
            self.inputs = tuple(torch.cat(p) for p in zip(*parts))
            self._module, self._prefix = _Head(self.net, self.split), "net."

        self.n_grad = self.n_hvp = 0
        self.prior_precision = float(prior_precision)
        self.centre = centre
        self.g0_data = self._data_grad(self.theta_star) if centre else None

    @property
    def num_params(self) -> int:
        return self.theta_star.numel()

    # -- model pieces ---------------------------------------------------------------------
    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The full parameter dict for ``functional_call``: subset from θ, the rest frozen."""
        out = dict(self.frozen)
        for n, piece, shape in zip(self.names, torch.split(theta, self.numels), self.shapes):
            out[n] = piece.view(shape)
        return out

    def outputs(self, theta: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The network output f(θ) on a slice of ``self.inputs`` ((x_t, t), or the cached trunk state)."""
        params = {self._prefix + n: p for n, p in self.params(theta).items()}
        return functional_call(self._module, params, inputs)

    def per_sample_loss(self, theta: torch.Tensor, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """ℓ = ||f − target||²/D per sample, shape (batch,), in the objective's dtype.

        Equals ``process.loss`` without its float32 cast (kept out so float64 HVPs are exact) and
        without minibatch-OT re-pairing (the fixed draws are the coupling).
        """
        return (self.outputs(theta, inputs) - target).pow(2).flatten(1).mean(dim=1)

    def chunks(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        """(inputs, target) slices of at most ``chunk_size`` samples, in the order of ``per_sample_loss``."""
        for lo in range(0, len(self.targets), self.chunk_size):
            hi = lo + self.chunk_size
            yield tuple(a[lo:hi] for a in self.inputs), self.targets[lo:hi]

    def _chunk_loss(self, theta, inputs, target) -> torch.Tensor:
        return self.per_sample_loss(theta, inputs, target).sum() / self.draws

    def _data_grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.reduce(sum((grad(self._chunk_loss)(theta, *c) for c in self.chunks()), torch.zeros_like(theta)))

    # -- the objective --------------------------------------------------------------------
    def g0(self) -> torch.Tensor:
        """∇L(θ*) of the un-centred loss at the current prior precision."""
        return self.g0_data + self.prior_precision * self.theta_star

    @torch.no_grad()
    def value(self, theta: torch.Tensor, *, centred: bool | None = None) -> float:
        """L(θ), or L_c(θ) = L(θ) − g0·(θ − θ*) when centred (default: the objective's ``centre``)."""
        centred = self.centre if centred is None else centred
        data = self.reduce(sum((self._chunk_loss(theta, *c) for c in self.chunks()), theta.new_zeros(())))
        out = data + 0.5 * self.prior_precision * theta.dot(theta)
        if centred:
            out = out - self.g0().dot(theta - self.theta_star)
        return float(out)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇L_c(θ) (∇L(θ) when not centred)."""
        self.n_grad += 1
        g = self._data_grad(theta) + self.prior_precision * theta
        return g - self.g0() if self.centre else g

    def value_and_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        return self.value(theta), self.grad(theta)

    def _jvp_of_grad(self, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, hv = torch.zeros_like(theta), torch.zeros_like(theta)
        for c in self.chunks():
            gc, hc = jvp(lambda th: grad(self._chunk_loss)(th, *c), (theta,), (v,))
            g, hv = g + gc, hv + hc
        g, hv = self.reduce(torch.cat([g, hv])).split(len(theta))  # one all-reduce for both
        g = g + self.prior_precision * theta
        return (g - self.g0() if self.centre else g), hv + self.prior_precision * v

    def grad_and_hvp(self, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∇L_c(θ), ∇²L(θ) v) in one forward-over-reverse pass per chunk (jvp of grad)."""
        self.n_grad += 1
        self.n_hvp += 1
        return self._jvp_of_grad(theta, v)

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²L(θ) v (centring is linear, so it leaves the Hessian unchanged)."""
        self.n_hvp += 1
        return self._jvp_of_grad(theta, v)[1]
