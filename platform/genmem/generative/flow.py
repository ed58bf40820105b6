"""Conditional flow matching on the straight path (Lipman et al. 2023; Liu et al. 2023).

x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) noise and x1 data; the regression target is
u = x1 - x0, and the learned v_theta(x, t) is itself the sampling velocity (t: 0 noise -> 1 data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genmem.generative.process import ChainCoefficients, PathSample, Process, ScoreFn, per_sample_mse, t_batch


@dataclass(frozen=True)
class FlowMatching(Process):
    """Straight-path conditional flow matching, optionally with minibatch-OT coupling.

    >>> fm = FlowMatching()
    >>> losses = fm.loss(model, torch.randn_like(x1), x1, torch.rand(len(x1)))  # (batch,): noise, data, time
    """

    ot_coupling: bool = False
    t_start: float = 0.0

    def couple(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Reorder the noise so (x0, x1) pairs solve the minibatch OT problem (Tong et al. 2024).

        Exact assignment on squared Euclidean cost: with equal weights the OT plan is a permutation.
        """
        if not self.ot_coupling:
            return x0
        cost = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double()).pow(2).cpu().numpy()
        from scipy.optimize import linear_sum_assignment  # here: scipy costs every Ray worker 0.2 s to import

        _, cols = linear_sum_assignment(cost)
        return x0[torch.as_tensor(np.asarray(cols), device=x0.device)]

    def path(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        tb = t.view(-1, *([1] * (x1.dim() - 1)))
        return PathSample(x_t=(1 - tb) * x0 + tb * x1, target=x1 - x0)

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample ||v(x_t, t) - (x1 - x0)||^2, averaged over dimensions; shape (batch,)."""
        ps = self.path(self.couple(x0, x1), x1, t)
        return per_sample_mse(model(ps.x_t, t), ps.target)

    def velocity(self, model):
        return model

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t, 1 - t

    def score(self, model, t: float) -> ScoreFn:
        """Tweedie on x_t = (1 - t) x0 + t x1, v = E[x1 - x0 | x_t]: E[x0 | x_t] = x - t v, and
        the score is -E[x0 | x_t] / (1 - t) = (t v - x) / (1 - t)."""
        if not 0.0 <= t < 1.0:
            raise ValueError(f"the flow-matching score needs 0 <= t < 1 (the data end has no noise), got {t}")

        def score(x: torch.Tensor) -> torch.Tensor:
            return (t * model(x, t_batch(t, x)) - x) / (1.0 - t)

        return score

    def memoryless(self, steps: int) -> ChainCoefficients:
        """Euler-Maruyama on t_k = (k+1)/(K+1): m = x + h (2v - x/t), c² = 2 h (1-t)/t."""
        t_all = torch.arange(1, steps + 2, dtype=torch.float64) / (steps + 1)
        t, h = t_all[:-1], 1.0 / (steps + 1)
        return ChainCoefficients(t=t_all, a=torch.zeros(steps, dtype=torch.float64), b=1 - h / t,
                                 v=torch.full((steps,), 2 * h, dtype=torch.float64), c=(2 * h * (1 - t) / t).sqrt())

    def chain_mean(self, model, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return b * x + v * model(x, t)
