"""The memoryless chain that reward fine-tuning controls (Domingo-Enrich et al., ICLR 2025).

For a path x_t = α_t x1 + σ_t x0 (t = 0 noise, t = 1 data) the
memoryless SDE of a model (Domingo-Enrich et al., eq. 11: noise level sqrt(2 η_t), drift
2v - (α̇/α) x) makes X_0 independent of X_1, the condition under which a tilt of the terminal law
is an optimal control of the path. Flow matching: σ(t) = sqrt(2(1-t)/t), b = 2v - x/t, stepped by
Euler-Maruyama on t_k = (k+1)/(K+1): the first step's factor 1 - h/t_0 is 0, so it starts from
fresh noise just after t = 0 where b diverges (measured on a Gaussian: terminal variance 1.03 at
K = 20 and 1.00 at K = 40, where the ancestral form of the same chain gives 0.82 and 0.89). VP
diffusion: DDPM's ancestral transitions (η = 1). Every transition is stochastic:
N(m_k(x), c_k² I), c_k > 0; as h -> 0 the per-step control below is sqrt(h) u with the continuous
u = (2/σ)(v_ft - v_base).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from genmem.generative.process import Process

__all__ = ["Memoryless"]


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

